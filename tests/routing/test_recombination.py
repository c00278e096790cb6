"""MERGE: component maps, 8-bit per-channel quantization, the module library, chain routing, suite glue."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from neuromerge import functional
from neuromerge.errors import CheckpointError, ConfigError
from neuromerge.routing.components import component_map, components
from neuromerge.routing.recombination import (
    ChainRoutedModel,
    Configuration,
    Library,
    build_library,
    canonical_labels,
    label_groups,
    load_chain_routed,
    safetensors_size,
    save_chain_routed,
)
from neuromerge.routing.router import train_router
from neuromerge.tensors.quant import dequantize, quant_error, quantize_per_channel, row_percentile

from .test_runtime import tiny_bert, tiny_llama  # the same tiny models as the runtime tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- tiny experts -----------------------------------------------------------------------------------------
def experts_of(base: dict[str, torch.Tensor], n: int, seed: int = 1, scale: float = 0.02) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in base.items()} for _ in range(n)]


@pytest.fixture(scope="module")
def bert_family() -> tuple[nn.Module, dict, list[dict], dict[str, str]]:
    base = tiny_bert()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    return base, sd, experts_of(sd, 3), component_map(sd, "bert")


def reference_component(name: str) -> str:
    """BERT component by plain string tests (independent of the regex rules)."""
    parts = name.split(".")
    if parts[0] == "encoder":
        i = parts[2]
        return f"layer.{i}.attention" if parts[3] == "attention" else f"layer.{i}.mlp"
    return "embeddings"


# --- component maps ---------------------------------------------------------------------------------------
def test_component_map_bert_covers_every_tensor_once() -> None:
    names = list(tiny_bert().state_dict())
    cmap = component_map(names, "bert")
    assert list(cmap) == names
    assert cmap == {n: reference_component(n) for n in names}
    assert cmap["encoder.layer.1.attention.output.LayerNorm.weight"] == "layer.1.attention"
    assert cmap["encoder.layer.0.output.LayerNorm.bias"] == "layer.0.mlp"
    assert cmap["encoder.layer.0.intermediate.dense.weight"] == "layer.0.mlp"
    assert cmap["pooler.dense.weight"] == "embeddings"
    assert components(cmap) == ["embeddings", "layer.0.attention", "layer.0.mlp", "layer.1.attention", "layer.1.mlp"]
    # a model prefix (BertForSequenceClassification's backbone) is accepted
    assert component_map(["bert.encoder.layer.3.attention.self.query.weight"], "bert") == {
        "bert.encoder.layer.3.attention.self.query.weight": "layer.3.attention"}


def test_component_map_llama() -> None:
    names = list(tiny_llama().state_dict())
    cmap = component_map(names, "llama")
    assert set(cmap) == set(names)
    expected = {}
    for n in names:
        p = n.split(".")
        if p[:2] == ["model", "layers"]:
            expected[n] = f"layer.{p[2]}." + ("attention" if p[3] in ("self_attn", "input_layernorm") else "mlp")
        else:
            expected[n] = "embeddings"
    assert cmap == expected
    assert cmap["model.layers.1.post_attention_layernorm.weight"] == "layer.1.mlp"
    assert cmap["lm_head.weight"] == "embeddings" and cmap["model.norm.weight"] == "embeddings"
    assert len(components(cmap)) == 5
    assert component_map(names) == cmap  # model_type=None finds the same layout


def test_component_map_efficientnet_vision_suite_names() -> None:
    from neuromerge.bench.vision import _pretrained

    names = list(_pretrained())
    cmap = component_map(names, "efficientnet")
    assert set(cmap) == set(names) and len(names) == 294
    comps = components(cmap)
    assert comps == ["embeddings"] + [f"block.{i}" for i in range(16)]
    for n, c in cmap.items():
        assert c == (f"block.{n.split('.')[1]}" if n.startswith("_blocks.") else "embeddings")
    assert component_map(names) == cmap  # the vision suite's model_type() is None


def test_component_map_unknown_names_and_overrides() -> None:
    names = ["encoder.layer.0.attention.self.query.weight", "adapter.mix.weight", "gate.3.proj.bias"]
    with pytest.raises(ConfigError, match=r"adapter\.mix\.weight, gate\.3\.proj\.bias"):
        component_map(names, "bert")
    cmap = component_map(names, "bert", overrides={r"^adapter\.": "embeddings", r"^gate\.(\d+)\.": r"gate.\1"})
    assert cmap == {names[0]: "layer.0.attention", names[1]: "embeddings", names[2]: "gate.3"}
    # overrides win over the built-in rules
    assert component_map(names[:1], "bert", overrides={r"query": "q"}) == {names[0]: "q"}
    with pytest.raises(ConfigError, match="unknown model type"):
        component_map(names, "gpt-neox")


# --- quantization -----------------------------------------------------------------------------------------
def test_row_percentile_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=g).abs()
    for p in (0.0, 50.0, 99.9, 100.0):
        ref = np.percentile(a.numpy(), p, axis=1)
        assert np.allclose(row_percentile(a, p).numpy(), ref, rtol=1e-6, atol=1e-7)


def test_quant_round_trip_bounds_and_clipping() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, 50, generator=g)
    w[2, 0, 0] = 40.0  # an outlier
    w[5] = 0.0  # an all-zero channel
    q, s = quantize_per_channel(w, percentile=99.0)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (16,)
    assert int(q.abs().max()) <= 127
    rows, deq = w.reshape(16, -1), dequantize(q, s).reshape(16, -1)
    for o in range(16):
        c = float(np.percentile(rows[o].abs().numpy(), 99.0))
        assert float(s[o]) == pytest.approx(c / 127, rel=1e-6)
        inside = rows[o].abs() <= c
        assert torch.all((rows[o] - deq[o])[inside].abs() <= s[o] / 2 + 1e-6)
        # clipping only affects the entries above the percentile: they come back as ±c
        outside = ~inside
        assert torch.allclose(deq[o][outside], rows[o][outside].sign() * c, atol=1e-5)
    assert torch.equal(deq[5], torch.zeros(200))
    assert float(deq[2].max()) < 5.0  # the outlier was clipped
    stats = quant_error(w, q, s)
    assert stats["clipped"] == pytest.approx(float((rows.abs() > (s * 127)[:, None]).float().mean()))
    q100, s100 = quantize_per_channel(w, percentile=100.0)
    assert quant_error(w, q100, s100)["clipped"] == 0.0
    assert float((w - dequantize(q100, s100)).abs().max()) <= float(s100.max()) / 2 + 1e-6


def test_safetensors_size_formula_matches_writer(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"b.q": torch.zeros(3, 5, dtype=torch.int8), "a": torch.ones(7), "n": torch.zeros((), dtype=torch.int64),
               "z": torch.zeros(0, 4), "h": torch.ones(3, dtype=torch.float16)}
    meta = {"k": 'a "quoted" {json}', "format": "pt"}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata=meta)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert safetensors_size(specs, meta) == os.path.getsize(tmp_path / "x.safetensors")


# --- configurations ---------------------------------------------------------------------------------------
def test_configuration_canonical_and_from_search() -> None:
    from neuromerge.search.encoding import Configuration as SearchConfig
    from neuromerge.search.encoding import SearchSpace

    assert canonical_labels([2, 2, 0, 2, 1]) == (0, 0, 1, 0, 2)
    assert label_groups([1, 0, 1]) == [[0, 2], [1]]
    c = Configuration({"a": (3, 3, 1), "b": (0, 1, 2)}, {"a": "ties"}, 0.5)
    assert c.partitions == {"a": (0, 0, 1), "b": (0, 1, 2)}
    assert c.operators == {"a": "ties", "b": "task_arithmetic"} and c.coefficients == {"a": 0.5, "b": 0.5}
    assert Configuration.from_dict(c.to_dict()) == c
    space = SearchSpace(("x", "y", "z"), ("a", "b"), ("average", "ties"), (0.3, 1.0))
    sc = SearchConfig(((0, 1, 0), (0, 0, 0)), (1, 0), (0, 1))
    got = Configuration.from_search(space, sc)
    assert got.partitions == {"a": (0, 1, 0), "b": (0, 0, 0)}
    assert got.operators == {"a": "ties", "b": "average"} and got.coefficients == {"a": 0.3, "b": 1.0}
    with pytest.raises(ConfigError):
        Configuration({"a": (0, 1), "b": (0, 1, 2)})


# --- library ----------------------------------------------------------------------------------------------
def test_all_merged_task_arithmetic_equals_functional_merge(bert_family) -> None:
    _, sd, exps, cmap = bert_family
    comps = components(cmap)
    ref = functional.task_arithmetic(sd, exps, lam=0.5)
    lib = build_library(sd, exps, cmap, Configuration.all_merged(comps, 3, coefficient=0.5), quantize=False)
    for t in range(3):
        chain = lib.chain(t)
        assert chain.keys() == sd.keys()
        assert all(torch.equal(chain[k], ref[k]) for k in sd)
    # independent formula on a merged tensor: θ0 + λ Σ τ_t
    k = "encoder.layer.0.attention.self.query.weight"
    direct = sd[k] + 0.5 * sum(e[k] - sd[k] for e in exps)
    assert torch.allclose(lib.chain(1)[k], direct, atol=1e-6)
    # quantized: within half a step of each row's scale (no clipping at percentile 100)
    libq = build_library(sd, exps, cmap, Configuration.all_merged(comps, 3, coefficient=0.5), percentile=100.0)
    for name, t in libq.chain(0).items():
        if t.dim() >= 2:
            step = ref[name].abs().reshape(t.shape[0], -1).amax(dim=1) / 127
            err = (t - ref[name]).reshape(t.shape[0], -1).abs()
            assert torch.all(err <= step[:, None] / 2 + 1e-6), name
        else:
            assert torch.equal(t, ref[name]), name  # 1-D tensors are stored exactly (float32)


def test_all_separate_reproduces_each_expert(bert_family) -> None:
    _, sd, exps, cmap = bert_family
    sep = Configuration.all_separate(components(cmap), 3)
    exact = build_library(sd, exps, cmap, sep, quantize=False)
    quant = build_library(sd, exps, cmap, sep)
    report = quant.quant_report()
    # rows hold ≥ 32 entries and the 99.9th percentile lies between the two largest: at most 1 clipped per row
    assert 0 < report["rel_fro"] < 0.05 and 0 < report["clipped"] <= 1 / 32
    for t in range(3):
        assert all(torch.equal(exact.chain(t)[k], exps[t][k]) for k in sd)
        for k, v in quant.chain(t).items():
            w = exps[t][k]
            if v.dim() >= 2:
                rows = w.abs().reshape(w.shape[0], -1)
                clip = torch.from_numpy(np.percentile(rows.numpy(), 99.9, axis=1)).float()
                # inside the clip range half a step; a clipped entry moves to ±clip
                bound = torch.maximum(clip / 127 / 2, rows.max(dim=1).values - clip) + 1e-6
                assert torch.all((v - w).abs().reshape(w.shape[0], -1).amax(dim=1) <= bound), k
            else:
                assert torch.equal(v, w)


def test_mixed_partition_operators_and_chain_references(bert_family) -> None:
    _, sd, exps, cmap = bert_family
    comps = components(cmap)
    parts = {c: (0, 0, 1) if "attention" in c else (0, 1, 0) for c in comps}
    cfg = Configuration(parts, {c: "average" if "mlp" in c else "task_arithmetic" for c in comps}, 1.0)
    lib = build_library(sd, exps, cmap, cfg, quantize=False)
    att, mlp = "encoder.layer.1.attention.output.dense.weight", "encoder.layer.0.intermediate.dense.weight"
    # tasks 0, 1 share attention = θ0 + 1.0 (τ0 + τ1); task 2 keeps its own
    assert torch.allclose(lib.chain(0)[att], sd[att] + (exps[0][att] - sd[att]) + (exps[1][att] - sd[att]),
                          atol=1e-6)
    assert torch.equal(lib.chain(2)[att], exps[2][att])
    # tasks 0, 2 share an averaged MLP; task 1 keeps its own
    assert torch.allclose(lib.chain(2)[mlp], (exps[0][mlp] + exps[2][mlp]) / 2, atol=1e-6)
    assert torch.equal(lib.chain(1)[mlp], exps[1][mlp])
    # chains are references to one cached tensor per module (no arithmetic when assembling)
    assert lib.chain(0)[att] is lib.chain(1)[att] and lib.chain(0)[mlp] is lib.chain(2)[mlp]
    assert lib.chain_id(0) != lib.chain_id(1)
    assert lib.n_modules() == 2 * len(comps)


def test_ties_group_matches_functional_on_the_component(bert_family) -> None:
    _, sd, exps, cmap = bert_family
    comps = components(cmap)
    cfg = Configuration.uniform(comps, (0, 0, 1), "ties", 1.0)
    lib = build_library(sd, exps, cmap, cfg, {"ties": {"density": 0.3}}, quantize=False)
    names = [n for n in sd if cmap[n] == "layer.0.mlp"]
    ref = functional.ties({n: sd[n] for n in names}, [{n: e[n] for n in names} for e in exps[:2]], density=0.3,
                          lam=1.0)
    assert all(torch.equal(lib.chain(1)[n], ref[n]) for n in names)
    # sparsified: some coordinates stay at the base
    n = names[0]
    assert bool((lib.chain(0)[n] == sd[n]).any())


def test_dedup_storage_bytes_and_file_round_trip(bert_family, tmp_path: Path) -> None:
    _, sd, exps, cmap = bert_family
    comps = components(cmap)
    exps = copy.deepcopy(exps)
    for k in sd:  # experts 1 and 2 agree on layer 0's attention
        if cmap[k] == "layer.0.attention":
            exps[2][k] = exps[1][k].clone()
    sep = Configuration.all_separate(comps, 3)
    lib = build_library(sd, exps, cmap, sep)
    # independent count of distinct stored contents
    distinct: list[torch.Tensor] = []
    for e in exps:
        for v in e.values():
            if not any(v.dtype == d.dtype and v.shape == d.shape and torch.equal(v, d) for d in distinct):
                distinct.append(v)
    stored = lib.tensors()
    n_entries = sum(2 if v.dim() >= 2 and v.is_floating_point() else 1 for v in distinct)
    assert len(stored) == n_entries
    # layer 0 attention of tasks 1 and 2 is the same stored module
    assert lib.groups["layer.0.attention"][1] == lib.groups["layer.0.attention"][2]
    path = lib.save(tmp_path / "lib.safetensors")
    assert os.path.getsize(path) == lib.storage_bytes()
    merged = build_library(sd, exps, cmap, Configuration.all_merged(comps, 3))
    assert merged.storage_bytes() < lib.storage_bytes() < 3 * merged.storage_bytes() + 10_000
    back = Library.load(path)
    assert back.tasks == lib.tasks and back.config == lib.config and back.storage_bytes() == lib.storage_bytes()
    for t in range(3):
        a, b = lib.chain(t), back.chain(t)
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in sd)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(CheckpointError):
        Library.load(tmp_path / "bad.safetensors")


def test_build_library_rejects_mismatches(bert_family) -> None:
    _, sd, exps, cmap = bert_family
    comps = components(cmap)
    with pytest.raises(ConfigError, match="tasks"):
        build_library(sd, exps[:2], cmap, Configuration.all_merged(comps, 3))
    with pytest.raises(ConfigError, match="components"):
        build_library(sd, exps, cmap, Configuration.all_merged(comps[:2], 3))


# --- chain-routed model -----------------------------------------------------------------------------------
def _inputs(n: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _plain(base: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(base)
    m.load_state_dict(state)
    return m.eval()


@pytest.fixture(scope="module")
def routed_bert(bert_family):
    base, sd, exps, cmap = bert_family
    comps = components(cmap)
    cfg = Configuration({c: (0, 0, 1) if "attention" in c else (0, 1, 2) for c in comps}, "task_arithmetic", 0.4)
    lib = build_library(sd, exps, cmap, cfg)
    return base, lib


def test_forced_routing_equals_each_chain_run_alone(routed_bert) -> None:
    base, lib = routed_bert
    model = ChainRoutedModel(base, lib, feature_module="embeddings")
    x = _inputs()
    tasks = [0, 2, 1, 0, 2, 1]
    with torch.no_grad(), model.force(tasks):
        out = model(**x)
    assert model.last_tasks.tolist() == tasks
    assert out.last_hidden_state.shape == (6, 7, 32) and out.pooler_output.shape == (6, 32)
    with torch.no_grad():
        for i, t in enumerate(tasks):  # per-sample runs of the plain module holding the chain
            one = {k: v[i:i + 1] for k, v in x.items()}
            ref = _plain(base, lib.chain(t))(**one)
            assert torch.allclose(out.last_hidden_state[i:i + 1], ref.last_hidden_state, atol=1e-5)
            assert torch.allclose(out.pooler_output[i:i + 1], ref.pooler_output, atol=1e-5)
        # one task for the whole batch = the plain module on the whole batch
        with model.force(2):
            whole = model(**x).last_hidden_state
        assert torch.allclose(whole, _plain(base, lib.chain(2))(**x).last_hidden_state, atol=1e-6)
    # the backbone's own weights are untouched (the feature pass uses the frozen base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in _plain(base, base.state_dict()).state_dict().items())


def test_router_routing_save_and_load(routed_bert, tmp_path: Path) -> None:
    base, lib = routed_bert
    x = _inputs(9, seed=5)
    feats = base.embeddings(input_ids=x["input_ids"]).mean(dim=1).detach()
    labels = torch.tensor([0, 1, 2] * 3)
    router, info = train_router(feats, labels, 3, epochs=60, lr=1e-2, batch_size=None, hidden=16)
    model = ChainRoutedModel(base, lib, router, feature_module="embeddings")
    with torch.no_grad():
        out = model(**x)
        predicted = model.last_tasks.clone()
        with model.force(predicted):
            forced = model(**x)
    assert torch.equal(out.last_hidden_state, forced.last_hidden_state)
    assert float((predicted == labels).float().mean()) == pytest.approx(info["train_acc"])
    folder = save_chain_routed(model, tmp_path / "routed", embed_base=True)
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == "merge" and manifest["tasks"] == list(lib.tasks)
    assert manifest["library"]["storage_bytes"] == os.path.getsize(folder / "library.safetensors")
    loaded = load_chain_routed(folder)  # backbone rebuilt from base/
    with torch.no_grad():
        again = loaded(**x)
    assert torch.equal(loaded.last_tasks, predicted)
    assert torch.allclose(again.last_hidden_state, out.last_hidden_state, atol=1e-6)
    with_module = load_chain_routed(folder, module=tiny_bert())
    with torch.no_grad():
        assert torch.allclose(with_module(**x).last_hidden_state, out.last_hidden_state, atol=1e-6)


def test_conv_backbone_with_batchnorm_chains_and_per_task_tensors() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    exps = experts_of(sd, 2, seed=7, scale=0.1)
    cmap = component_map(sd, overrides={r"^([0-9]+)\.": r"block.\1"})
    cfg = Configuration.uniform(components(cmap), (0, 1))
    cfg = Configuration({**cfg.partitions, "block.0": (0, 0)}, "task_arithmetic", 1.0)
    lib = build_library(sd, exps, cmap, cfg, exclude=[r"running_(mean|var)$"], quantize=False)
    assert torch.equal(lib.chain(0)["1.running_mean"], exps[0]["1.running_mean"])  # singleton: expert's own
    stats = {"1.running_mean": torch.full((4,), 0.5), "1.running_var": torch.full((4,), 2.0)}
    lib.set_task_tensors(1, stats)
    assert torch.equal(lib.chain(1)["1.running_var"], stats["1.running_var"])
    model = ChainRoutedModel(base, lib)
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.force([1, 0, 1, 1, 0]):
        out = model(input=x)
    with torch.no_grad():
        for i, t in enumerate([1, 0, 1, 1, 0]):
            assert torch.allclose(out[i:i + 1], _plain(base, lib.chain(t))(x[i:i + 1]), atol=1e-6)


# --- suite glue -------------------------------------------------------------------------------------------
class FakeSuite:
    """A duck-typed suite: stem → 2 blocks → head on random features; counts evaluate() calls."""

    def __init__(self) -> None:
        self.calls = 0

    def model_type(self) -> None:
        return None

    def merge_exclude(self) -> list[str]:
        return []

    @staticmethod
    def logits(backbone: dict, head: dict, x: torch.Tensor) -> torch.Tensor:
        h = x @ backbone["_conv_stem.weight"].T
        for i in range(2):
            h = torch.relu(h @ backbone[f"_blocks.{i}.fc.weight"].T)
        return h @ head["weight"].T

    def evaluate(self, backbone, head, task, split, budget) -> float:
        self.calls += 1
        data = getattr(task, split)
        n = budget.eval_examples
        pred = self.logits(backbone, head, data.inputs[:n]).argmax(dim=1)
        return float((pred == data.labels[:n]).float().mean())


@pytest.fixture(scope="module")
def fake_problem_parts():
    from neuromerge.tasks.contract import Budget, Expert, Split, TaskData

    g = torch.Generator().manual_seed(11)
    base = {"_conv_stem.weight": torch.randn(8, 6, generator=g), "_blocks.0.fc.weight": torch.randn(8, 8, generator=g),
            "_blocks.1.fc.weight": torch.randn(8, 8, generator=g)}
    experts, tasks = [], []
    for t in range(3):
        bb = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        head = {"weight": torch.randn(4, 8, generator=g)}
        x = torch.randn(40, 6, generator=g)
        y = FakeSuite.logits(bb, head, x).argmax(dim=1)
        y[::5] = (y[::5] + 1) % 4  # the expert gets 80 %
        split = Split(x, y)
        tasks.append(TaskData(f"t{t}", ["a", "b", "c", "d"], split, split, split))
        experts.append(Expert(f"t{t}", bb, head, 0.8))
    tasks.append(TaskData("ood", ["a"], split, split, split, in_domain=False))
    return base, experts, tasks, Budget(eval_examples=40)


def test_merge_problem_objectives(fake_problem_parts, tmp_path: Path) -> None:
    from neuromerge.search.merge_problem import MergeProblem

    base, experts, tasks, budget = fake_problem_parts
    suite = FakeSuite()
    problem = MergeProblem(suite, base, experts, tasks, budget, quantize=False, val_limit=30)
    space = problem.space
    assert space.tasks == ("t0", "t1", "t2") and space.components == ("embeddings", "block.0", "block.1")
    assert problem.evaluate(space.all_separate()) == pytest.approx(100.0)
    assert suite.calls == 6  # 3 expert accuracies (cached from now on) + 3 chains
    merged = space.all_merged()
    ta = functional.task_arithmetic(base, [e.backbone for e in experts], lam=0.3)
    ref = []
    for e, t in zip(experts, tasks[:3], strict=True):
        pred = FakeSuite.logits(ta, e.head, t.val.inputs[:30]).argmax(dim=1)
        mine = FakeSuite.logits(e.backbone, e.head, t.val.inputs[:30]).argmax(dim=1)
        ref.append(100 * float((pred == t.val.labels[:30]).float().mean()) / float((mine == t.val.labels[:30])
                                                                                   .float().mean()))
    assert problem.evaluate(merged) == pytest.approx(sum(ref) / 3)
    assert suite.calls == 9
    sep_bytes, merged_bytes = problem.storage(space.all_separate()), problem.storage(merged)
    assert merged_bytes < sep_bytes
    path = problem.library(merged).save(tmp_path / "m.safetensors")
    assert os.path.getsize(path) == merged_bytes


def test_representative_table(fake_problem_parts) -> None:
    from neuromerge.search.archive import Evaluation
    from neuromerge.search.encoding import Configuration as SearchConfig
    from neuromerge.search.merge_problem import MergeProblem, representative_points, representative_table

    base, experts, tasks, budget = fake_problem_parts
    problem = MergeProblem(FakeSuite(), base, experts, tasks, budget, ops=("task_arithmetic", "average"))
    configs = [problem.space.all_merged(), problem.space.all_separate(),
               SearchConfig(((0, 0, 0), (0, 1, 2), (0, 0, 1)), (0, 1, 0), (0, 0, 0)),
               SearchConfig(((0, 1, 2), (0, 0, 0), (0, 0, 0)), (1, 1, 1), (0, 0, 0))]
    archive = [Evaluation(c, problem.evaluate(c), problem.storage(c)) for c in configs]
    points = representative_points(archive)
    assert points["low storage"].f2 <= 1.01 * min(e.f2 for e in archive)
    assert points["high accuracy"].f1 == max(e.f1 for e in archive)
    rows = representative_table(problem, archive)
    names = [r["row"] for r in rows]
    assert names == ["high accuracy", "mid", "low storage", "static task_arithmetic", "static average",
                     "all separate"]
    static = rows[3]
    assert static["backbones"] == 1.0 and static["bytes"] == problem.storage(problem.space.all_merged())
    assert rows[-1]["score"] == pytest.approx(problem.evaluate(problem.space.all_separate()))
    sep = problem.storage(problem.space.all_separate())
    assert rows[-1]["bytes"] == sep and rows[-1]["backbones"] == pytest.approx(sep / static["bytes"])
    assert sep > static["bytes"]


def test_low_storage_point_ignores_header_byte_differences() -> None:
    from types import SimpleNamespace as P

    from neuromerge.search.merge_problem import representative_points

    archive = [P(f1=90.0, f2=1000), P(f1=95.0, f2=1005), P(f1=99.0, f2=1100), P(f1=100.0, f2=2000)]
    points = representative_points(archive)
    assert points["low storage"].f1 == 95.0  # 1005 bytes is "the smallest" up to 1 %
    assert points["high accuracy"].f1 == 100.0 and points["mid"].f1 == 99.0
