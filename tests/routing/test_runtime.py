"""Routed runtime: RoutedLinear branches, gate policies, router training, KV-cache generation, save/load."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuromerge.errors import CheckpointError, CompatibilityError, ConfigError
from neuromerge.routing import (
    DenseExpert,
    HierarchicalGates,
    LowRankExpert,
    OneHotGates,
    RoutedModel,
    Router,
    RoutingError,
    SoftGates,
    TopKGates,
    load_routed,
    policy_from_dict,
    save_routed,
    train_router,
)
from neuromerge.routing.runtime import final_hidden_mean, pool_features

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- tiny models ------------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def tiny_bert(seed: int = 0, intermediate: int = 64) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


def tiny_llama(seed: int = 0, intermediate: int = 64) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


BERT_MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense",
                "encoder.layer.0.intermediate.dense"]
LLAMA_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.1.mlp.up_proj"]


def lowrank(model: nn.Module, name: str, modules: list[str], rank: int, seed: int, scale: float = 0.3) -> LowRankExpert:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules:
        lin = model.get_submodule(m)
        factors[m] = (torch.randn(rank, lin.in_features, generator=g) * scale,
                      torch.randn(lin.out_features, rank, generator=g) * scale)
    return LowRankExpert(name, factors)


def dense(model: nn.Module, name: str, modules: list[str], seed: int, scale: float = 0.2) -> DenseExpert:
    g = torch.Generator().manual_seed(seed)
    return DenseExpert(name, {m: torch.randn(model.get_submodule(m).weight.shape, generator=g) * scale
                              for m in modules})


def merged(model: nn.Module, experts: list, weights: list[float]) -> nn.Module:
    """Reference: a copy of ``model`` with ``W0 + Σ_j w_j ΔW_j`` written into its weights (explicit loop)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for e, w in zip(experts, weights, strict=True):
            for m in e.modules():
                out.get_submodule(m).weight.add_(w * e.delta(m))
    return out


def ids_batch(b: int = 3, t: int = 7, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(seed))


# --- branches ---------------------------------------------------------------------------------------------
def test_lowrank_gate_one_equals_merged_weights_mlp_and_bert() -> None:
    base = mlp()
    e = lowrank(base, "a", ["0", "2"], rank=3, seed=1)
    ref = merged(base, [e], [1.0])
    routed = RoutedModel(base, [e], router=None, policy=SoftGates(), feature_module=None)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routed.force(torch.ones(1, 1)):
        assert torch.allclose(routed(x), ref(x), atol=1e-5)

    bert = tiny_bert()
    eb = lowrank(bert, "b", BERT_MODULES, rank=4, seed=2, scale=0.1)
    refb = merged(bert, [eb], [1.0])
    rb = RoutedModel(copy.deepcopy(bert), [eb], router=None, policy=SoftGates(), feature_module=None)
    ids = ids_batch()
    with torch.no_grad(), rb.force(torch.ones(3, 1)):
        got = rb(input_ids=ids).last_hidden_state
    want = refb(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, bert(input_ids=ids).last_hidden_state, atol=1e-3)  # the expert matters


@pytest.mark.peers
def test_lowrank_equals_peft_lora_merge() -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    bert = tiny_bert(seed=3)
    peft_model = get_peft_model(copy.deepcopy(bert), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                init_lora_weights=False))
    factors = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            a = mod.lora_A["default"].weight.detach().clone()
            b = mod.lora_B["default"].weight.detach().clone() * mod.scaling["default"]
            factors[name.removeprefix("base_model.model.")] = (a, b)
    assert len(factors) == 4
    ids = ids_batch(2, 6)
    with torch.no_grad():
        want = peft_model.merge_and_unload()(input_ids=ids).last_hidden_state
        routed = RoutedModel(bert, [LowRankExpert("peft", factors)], router=None, policy=SoftGates(),
                             feature_module=None)
        with routed.force(torch.ones(1, 1)):
            got = routed(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_forced_one_hot_equals_that_expert_lowrank_and_dense() -> None:
    base = mlp()
    experts = [lowrank(base, "a", ["0", "2"], 2, seed=1), dense(base, "b", ["0"], seed=2),
               lowrank(base, "c", ["2"], 5, seed=3)]
    routed = RoutedModel(copy.deepcopy(base), experts, router=None, policy=OneHotGates(), feature_module=None)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for j in range(3):
            probs = torch.full((1, 3), 0.1)
            probs[0, j] = 0.8
            with routed.force(probs):
                got = routed(x)
            weights = [float(i == j) for i in range(3)]
            assert torch.allclose(got, merged(base, experts, weights)(x), atol=1e-5)


def test_soft_mixture_matches_weighted_merge_and_zero_gates_equal_base_exactly() -> None:
    base = mlp()
    experts = [lowrank(base, "a", ["0", "2"], 2, seed=1), dense(base, "b", ["0", "2"], seed=2)]
    routed = RoutedModel(copy.deepcopy(base), experts, router=None, policy=SoftGates(), feature_module=None)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with routed.force(torch.tensor([[0.3, 0.7]])):
            assert torch.allclose(routed(x), merged(base, experts, [0.3, 0.7])(x), atol=1e-5)
        with routed.force(torch.zeros(1, 2)):
            assert torch.equal(routed(x), base(x))
    bert = tiny_bert()
    rb = RoutedModel(copy.deepcopy(bert), [lowrank(bert, "a", BERT_MODULES, 4, seed=1)], router=None,
                     policy=SoftGates(), feature_module=None)
    ids = ids_batch()
    with torch.no_grad(), rb.force(torch.zeros(3, 1)):
        assert torch.equal(rb(input_ids=ids).last_hidden_state, bert(input_ids=ids).last_hidden_state)


def test_per_sample_routing_in_one_batch_equals_each_sample_alone() -> None:
    bert = tiny_bert()
    experts = [lowrank(bert, f"e{i}", BERT_MODULES, 3, seed=10 + i, scale=0.2) for i in range(2)]
    experts.append(dense(bert, "d", BERT_MODULES[:2], seed=20, scale=0.05))
    router = Router(32, 3, hidden=16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        router.net[-1].weight.mul_(40)  # sharp, sample-dependent probabilities
    routed = RoutedModel(bert, experts, router=router, policy=SoftGates(), feature_module="embeddings")
    ids = ids_batch(3, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # sample 1 is padded
    with torch.no_grad():
        out = routed(input_ids=ids, attention_mask=mask).last_hidden_state
        probs = routed.last_probs
        assert probs.shape == (3, 3) and not torch.allclose(probs[0], probs[2], atol=1e-2)
        for i in range(3):
            n = int(mask[i].sum())
            alone = routed(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).last_hidden_state
            assert torch.allclose(routed.last_probs[0], probs[i], atol=1e-5)
            assert torch.allclose(alone[0], out[i, :n], atol=1e-4)
        # the same with forced per-sample probabilities through a per-module policy
        routed.policy = HierarchicalGates(k=2, core={0: {BERT_MODULES[0]}, 2: {BERT_MODULES[1]}})
        forced = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
        with routed.force(forced):
            out = routed(input_ids=ids).last_hidden_state
            for i in range(3):
                with routed.force(forced[i : i + 1]):
                    assert torch.allclose(routed(input_ids=ids[i : i + 1]).last_hidden_state[0], out[i], atol=1e-4)


def test_router_features_pooled_over_mask_and_final_source() -> None:
    bert = tiny_bert()
    router = Router(32, 2, hidden=8)
    ids = ids_batch(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        emb = bert.embeddings(input_ids=ids)
        want = torch.stack([emb[0, :3].mean(0), emb[1].mean(0)])
        routed = RoutedModel(copy.deepcopy(bert), [lowrank(bert, "a", BERT_MODULES, 2, 1), lowrank(bert, "b",
                             BERT_MODULES, 2, 2)], router=router, policy=SoftGates(), feature_module="embeddings")
        routed(input_ids=ids, attention_mask=mask)
        assert torch.allclose(routed.last_probs, router(want).softmax(-1), atol=1e-5)
        final = RoutedModel(copy.deepcopy(bert), [lowrank(bert, "a", BERT_MODULES, 2, 1), lowrank(bert, "b",
                            BERT_MODULES, 2, 2)], router=router, policy=SoftGates(), feature_module=None,
                            feature_fn=final_hidden_mean)
        final(input_ids=ids, attention_mask=mask)
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state  # base features: all gates zero
        want = torch.stack([h[0, :3].mean(0), h[1].mean(0)])
        assert torch.allclose(final.last_probs, router(want).softmax(-1), atol=1e-5)
    img = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.allclose(pool_features(img, None), img.reshape(2, 3, -1).mean(-1))


def test_router_gradient_reaches_router_parameters() -> None:
    base = mlp()
    router = Router(8, 2, hidden=8)
    routed = RoutedModel(base, [lowrank(base, "a", ["2"], 2, 1), dense(base, "b", ["2"], 2)], router=router,
                         policy=SoftGates(), feature_module="1")
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    routed(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


# --- policies ---------------------------------------------------------------------------------------------
def test_gate_policies_on_hand_made_probs() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(SoftGates().gates(p, "m"), p)
    assert torch.allclose(TopKGates(2).gates(p, "m"), torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    assert torch.allclose(TopKGates(2, renormalize=False).gates(p, "m"), torch.tensor([[0.5, 0.3, 0, 0],
                                                                                         [0, 0, 0.3, 0.4]]))
    assert torch.equal(OneHotGates().gates(p, "m"), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    h = HierarchicalGates(k=2, core={0: {"attn"}, 3: {"mlp"}})
    # row 0: e1 = 0, core {attn}; row 1: e1 = 3, core {mlp}
    assert torch.allclose(h.gates(p, "attn"), torch.tensor([[1.0, 0, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    assert torch.allclose(h.gates(p, "mlp"), torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0, 1.0]]))
    assert torch.allclose(h.gates(p, "other"), TopKGates(2).gates(p, "other"))
    for pol in (SoftGates(), TopKGates(3, False), h, OneHotGates()):
        assert policy_from_dict(json.loads(json.dumps(pol.to_dict()))) == pol
    with pytest.raises(Exception, match="unknown gate policy"):
        policy_from_dict({"name": "nope"})


# --- router -----------------------------------------------------------------------------------------------
def test_router_training_is_accurate_deterministic_and_leaves_global_rng() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(40)
    feats = centers[labels] + torch.randn(120, 10, generator=g) + 50.0  # offset: standardization matters
    state = torch.get_rng_state()
    r1, info1 = train_router(feats, labels, 3, epochs=15, lr=5e-3, hidden=32)
    assert torch.equal(state, torch.get_rng_state())
    r2, info2 = train_router(feats, labels, 3, epochs=15, lr=5e-3, hidden=32)
    assert info1["train_acc"] >= 0.95 and info1["loss"][-1] < info1["loss"][0]
    assert info1["loss"] == info2["loss"]
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values(), strict=True))
    assert torch.allclose(r1.mean, feats.mean(0))
    r3, _ = train_router(feats, labels, 3, epochs=15, lr=5e-3, hidden=32, seed=1)
    assert not torch.equal(r1.net[0].weight, r3.net[0].weight)


# --- generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["embeddings", "final"])
def test_generate_with_kv_cache_keeps_prompt_gates(source: str) -> None:
    llama = tiny_llama()
    experts = [lowrank(llama, f"e{i}", LLAMA_MODULES, 4, seed=30 + i, scale=0.5) for i in range(2)]
    router = Router(32, 2, hidden=16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        router.net[-1].weight.mul_(30)
    feature = {"feature_module": "model.embed_tokens"} if source == "embeddings" else {
        "feature_module": None, "feature_fn": final_hidden_mean}
    routed = RoutedModel(llama, experts, router=router, policy=SoftGates(), **feature)
    ids = ids_batch(2, 5, seed=9)
    with torch.no_grad():
        routed(input_ids=ids)
        prompt_probs = routed.last_probs
        out = routed.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert torch.allclose(routed.last_probs, prompt_probs)  # continuation calls did not re-route
        seq = ids
        with routed.force(prompt_probs):
            for _ in range(6):
                nxt = routed(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
    assert out.shape == (2, 11) and torch.equal(out, seq)
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        routed(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(RoutingError, match="batch size"):
            routed(input_ids=ids[:1, :1], past_key_values=cache, use_cache=True)


# --- storage, save / load ---------------------------------------------------------------------------------
def test_storage_bytes_dedupes_identical_tensors() -> None:
    base = mlp()
    a = lowrank(base, "a", ["0", "2"], 2, seed=1)
    b = LowRankExpert("b", {"0": a.factors["0"], "2": (a.factors["2"][0] * 2, a.factors["2"][1])})
    router = Router(6, 2, hidden=4)
    routed = RoutedModel(base, [a, b], router=router, policy=SoftGates(), feature_module="0")
    unique = [*a.factors["0"], *a.factors["2"], b.factors["2"][0]]
    sizes = routed.storage_bytes()
    assert sizes["experts"] == sum(t.numel() * 4 for t in unique)
    assert sizes["router"] == 4 * (6 * 4 + 4 + 4 * 4 + 4 + 4 * 2 + 2 + 6 + 6)


def _save_llama_family(tmp_path: Path) -> tuple[Path, RoutedModel]:
    base_dir = tmp_path / "llama"
    tiny_llama().save_pretrained(base_dir)
    import transformers as tf

    llama = tf.LlamaForCausalLM.from_pretrained(base_dir).eval()
    shared = lowrank(llama, "e0", LLAMA_MODULES[:2], 3, seed=40)
    experts = [shared, LowRankExpert("e1", dict(shared.factors)), dense(llama, "d", LLAMA_MODULES[2:], seed=41)]
    router = Router(32, 3, hidden=16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        router.net[-1].weight.mul_(20)
    policy = HierarchicalGates(k=2, core={1: {LLAMA_MODULES[0]}})
    return base_dir, RoutedModel(llama, experts, router=router, policy=policy, feature_module="model.embed_tokens")


def test_save_load_round_trip_base_by_path_and_embedded(tmp_path: Path) -> None:
    base_dir, routed = _save_llama_family(tmp_path)
    ids = ids_batch(3, 6)
    folder = save_routed(routed, tmp_path / "routed", base_ref=str(base_dir), tasks=["a", "b", "c"], method="test")
    assert sorted(p.name for p in folder.iterdir()) == ["experts.safetensors", "manifest.json", "router.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["storage_bytes"] == routed.storage_bytes()
    assert manifest["experts"][0]["modules"] == manifest["experts"][1]["modules"]  # e1 stored by reference
    loaded = load_routed(folder)
    with torch.no_grad():
        want = routed(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(loaded.last_probs, routed.last_probs)
    for model in (routed, loaded):  # e0 and e1 share their factors: one rank segment, gated by g0 + g1
        assert [m for m, _, _ in model.routed_layers[LLAMA_MODULES[0]].segments] == [(0, 1)]
    reference = merged(tiny_llama(), routed.experts, [0.2, 0.5, 0.3])
    loaded.policy = SoftGates()
    with torch.no_grad(), loaded.force(torch.tensor([[0.2, 0.5, 0.3]])):
        want = reference(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-4)
    loaded.policy = routed.policy
    assert loaded.policy == routed.policy and loaded.expert_names == ["e0", "e1", "d"]

    bert = tiny_bert()
    experts = [lowrank(bert, "a", BERT_MODULES, 2, seed=1), dense(bert, "b", BERT_MODULES[1:], seed=2)]
    rb = RoutedModel(bert, experts, router=Router(32, 2, hidden=8), policy=TopKGates(1),
                     feature_module=None, feature_fn=final_hidden_mean)
    folder = save_routed(rb, tmp_path / "bert", embed_base=True, tasks=["x", "y"], method="test")
    assert (folder / "base" / "config.json").is_file()
    lb = load_routed(folder)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        assert torch.allclose(lb(input_ids=ids, attention_mask=mask).last_hidden_state,
                              rb(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5)
    with pytest.raises(Exception, match="exists"):
        save_routed(rb, folder, embed_base=True, tasks=["x", "y"], method="test")


def test_bad_inputs_raise_named_errors(tmp_path: Path) -> None:
    base_dir, routed = _save_llama_family(tmp_path)
    folder = save_routed(routed, tmp_path / "r", base_ref=str(base_dir), tasks=["a", "b", "c"], method="m")
    manifest = json.loads((folder / "manifest.json").read_text())

    def variant(name: str, edit: dict | None = None, drop: str | None = None) -> Path:
        out = tmp_path / name
        out.mkdir()
        for p in folder.iterdir():
            if p.name != drop:
                (out / p.name).write_bytes(p.read_bytes())
        if edit is not None:
            (out / "manifest.json").write_text(json.dumps(edit))
        return out

    with pytest.raises(CheckpointError, match=r"experts\.safetensors"):
        load_routed(variant("no_experts", drop="experts.safetensors"))
    with pytest.raises(CheckpointError, match=r"router\.safetensors"):
        load_routed(variant("no_router", drop="router.safetensors"))
    with pytest.raises(CheckpointError, match="version"):
        load_routed(variant("version", {**manifest, "version": 99}))
    bad_router = copy.deepcopy(manifest)
    bad_router["router"]["config"]["n_out"] = 2
    with pytest.raises(CompatibilityError, match="2 outputs"):
        load_routed(variant("router", bad_router))
    with pytest.raises(CompatibilityError, match="3 outputs"):
        RoutedModel(mlp(), [lowrank(mlp(), "a", ["0"], 1, 1)], router=Router(6, 3), policy=SoftGates(),
                    feature_module="0")
    other = tmp_path / "other"
    tiny_llama(intermediate=48).save_pretrained(other)
    with pytest.raises(CompatibilityError, match="header hash"):
        load_routed(folder, base=other)
    with pytest.raises(CompatibilityError, match=r"down_proj\.weight has shape"):
        load_routed(folder, base=other, check_hash=False)
    with pytest.raises(RoutingError, match="no router"):
        RoutedModel(mlp(), [lowrank(mlp(), "a", ["0"], 1, 1)], router=None, policy=SoftGates(),
                    feature_module=None)(torch.zeros(1, 6))
    with pytest.raises(ConfigError, match="embed_base needs a transformers model"):
        save_routed(RoutedModel(mlp(), [lowrank(mlp(), "a", ["0"], 1, 1)], router=None, policy=SoftGates(),
                                feature_module=None), tmp_path / "mlp", embed_base=True, tasks=["a"], method="m")
    assert not [p for p in tmp_path.iterdir() if "mlp" in p.name]  # atomic: nothing left behind
    plain = mlp()
    bad = LowRankExpert("a", {"0": (torch.ones(1, 6), torch.ones(8, 1)), "2": (torch.ones(1, 7), torch.ones(5, 1))})
    with pytest.raises(CompatibilityError, match="module '2'"):
        RoutedModel(plain, [bad], router=None, policy=SoftGates(), feature_module=None)
    assert type(plain[0]) is nn.Linear  # a refused expert leaves the base untouched
    with pytest.raises(CompatibilityError, match="not in the base"):
        RoutedModel(mlp(), [LowRankExpert("a", {"9": (torch.ones(1, 6), torch.ones(8, 1))})], router=None,
                    policy=SoftGates(), feature_module=None)


def test_route_cli_info_and_build(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neuromerge.routing.cli import BUILDERS, route_app

    base_dir, routed = _save_llama_family(tmp_path)
    folder = save_routed(routed, tmp_path / "r", base_ref=str(base_dir), tasks=["a", "b", "c"], method="m")
    runner = CliRunner()
    res = runner.invoke(route_app, ["info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["method"] == "m" and [e["kind"] for e in doc["experts"]] == ["lowrank", "lowrank", "dense"]
    assert doc["experts"][0]["ranks"] == [3] and doc["storage_bytes"] == routed.storage_bytes()
    text = runner.invoke(route_app, ["info", str(folder)]).output
    assert "experts (3)" in text and "hierarchical" in text
    res = runner.invoke(route_app, ["build", "nosuch", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no routed-model builder for 'nosuch'" in res.output
    calls = []
    (tmp_path / "p.yaml").write_text("k: 2\n")
    BUILDERS["fake"] = lambda params, out, *, force: calls.append((params, out, force)) or out
    try:
        res = runner.invoke(route_app, ["build", "fake", "-o", str(tmp_path / "y"), "--config",
                                        str(tmp_path / "p.yaml"), "--force"])
    finally:
        del BUILDERS["fake"]
    assert res.exit_code == 0, res.output
    assert calls == [({"k": 2}, tmp_path / "y", True)]


def test_conv_experts_dense_and_lowrank_with_spatial_features() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                        nn.Conv2d(4, 6, 1)).eval()
    g = torch.Generator().manual_seed(3)
    low = LowRankExpert("l", {"0": (torch.randn(2, 27, generator=g), torch.randn(4, 2, generator=g) * 0.3)})
    den = DenseExpert("d", {"2": torch.randn(4, 2, 3, 3, generator=g) * 0.3, "3": torch.randn(6, 4, generator=g)})
    ref = copy.deepcopy(cnn)
    with torch.no_grad():  # reference: 0.25 · expert l + 0.75 · expert d written into the kernels
        ref[0].weight.add_(0.25 * low.delta("0").reshape(4, 3, 3, 3))
        ref[2].weight.add_(0.75 * den.deltas["2"])
        ref[3].weight.add_(0.75 * den.deltas["3"].reshape(6, 4, 1, 1))
    routed = RoutedModel(copy.deepcopy(cnn), [low, den], router=None, policy=SoftGates(), feature_module=None)
    x = torch.randn(2, 3, 5, 5, generator=g)
    with torch.no_grad(), routed.force(torch.tensor([[0.25, 0.75]])):
        assert torch.allclose(routed(x), ref(x), atol=1e-5)
    router = Router(4, 2, hidden=8)
    by_router = RoutedModel(copy.deepcopy(cnn), [den, DenseExpert("e", {"3": -den.deltas["3"]})], router=router,
                            policy=SoftGates(), feature_module="1")  # routed by the spatial mean of the ReLU
    with torch.no_grad():
        by_router(x)
        feats = torch.relu(cnn[0](x)).mean(dim=(2, 3))
        assert torch.allclose(by_router.last_probs, router(feats).softmax(-1), atol=1e-5)
    with pytest.raises(CompatibilityError, match="groups=1"):
        RoutedModel(copy.deepcopy(cnn), [LowRankExpert("x", {"2": (torch.ones(1, 18), torch.ones(4, 1))})],
                    router=None, policy=SoftGates(), feature_module=None)


class _SamePaddedConv(nn.Conv2d):
    """EfficientNet's ``Conv2dStaticSamePadding``: pads in ``forward`` (TF "same", stride 2), then a plain conv."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def test_conv_experts_keep_a_padding_done_in_forward() -> None:
    torch.manual_seed(1)
    cnn = nn.Sequential(_SamePaddedConv(3, 4, 3, stride=2)).eval()
    g = torch.Generator().manual_seed(4)
    den = DenseExpert("d", {"0": torch.randn(4, 3, 3, 3, generator=g) * 0.3})
    low = LowRankExpert("l", {"0": (torch.randn(2, 27, generator=g), torch.randn(4, 2, generator=g) * 0.3)})
    ref = copy.deepcopy(cnn)
    with torch.no_grad():
        ref[0].weight.add_(0.5 * den.deltas["0"] + 0.5 * low.delta("0").reshape(4, 3, 3, 3))
    routed = RoutedModel(copy.deepcopy(cnn), [den, low], router=None, policy=SoftGates(), feature_module=None)
    x = torch.randn(2, 3, 16, 16, generator=g)  # the padded (8×8) and unpadded (7×7) outputs differ in size
    with torch.no_grad(), routed.force(torch.tensor([[0.5, 0.5]])):
        out = routed(x)
    assert out.shape == ref(x).shape == (2, 4, 8, 8)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
