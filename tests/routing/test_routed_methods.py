"""MIN-Merging, Twin-Merging and EMR: pure tensor functions against loop references, and the bench builders
end-to-end on a tiny BERT suite with LoRA experts."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import pytest
import torch
from torch import nn

from neuromerge.bench import routed_methods as bench_routed
from neuromerge.errors import TaskError
from neuromerge.routing import HierarchicalGates, LowRankExpert, RoutedModel
from neuromerge.routing import build as rm
from neuromerge.routing import min_merging as mm
from neuromerge.routing.emr import emr_experts, emr_storage_bytes, emr_unify
from neuromerge.routing.twin import exclusive_rank, task_arithmetic_state, twin_experts
from neuromerge.tasks.contract import Batch, Budget, Expert, Split, Suite, TaskData, mean_pool, module_output

StateDict = dict[str, torch.Tensor]
VOCAB, SEQ, HIDDEN, RANK = 40, 8, 32, 2


# --- a tiny BERT suite with the tasks contract's forward hooks (neuromerge.tasks.ModelAccess) ----------------------
def tiny_bert(pooler: bool = False) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(cfg, add_pooling_layer=pooler).eval()


class TinySuite(Suite):
    """Inputs: ``(N, SEQ)`` token ids, 0 = padding (the mask)."""

    name = "tiny"
    description = "tiny BERT"

    def budget(self, quick: bool) -> Budget:
        return Budget(quick=quick, eval_examples=64, batch_size=16)

    def tasks(self, budget: Budget) -> list[TaskData]:
        raise NotImplementedError

    def backbone_state(self) -> StateDict:
        return {k: v.clone() for k, v in tiny_bert().state_dict().items()}

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        raise NotImplementedError

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        raise NotImplementedError

    def expert_rank(self) -> int | None:
        return RANK

    def module(self, backbone: StateDict) -> nn.Module:
        m = tiny_bert()
        m.load_state_dict(backbone)
        return m

    def batches(self, task: TaskData, split: Any, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        data: Split = getattr(task, split)
        n = len(data) if limit is None else min(limit, len(data))
        bs = batch_size or 16
        out = []
        for s in range(0, n, bs):
            ids = data.inputs[s:min(n, s + bs)]
            mask = (ids != 0).long()
            out.append(Batch({"input_ids": ids, "attention_mask": mask}, data.labels[s:min(n, s + bs)], mask))
        return out

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        assert head is not None
        return self.pooled(module, batch, "final") @ head["weight"].T + head["bias"]

    def pooled(self, module: nn.Module, batch: Batch, source: Literal["embeddings", "final"]) -> torch.Tensor:
        assert batch.mask is not None
        if source == "final":
            hidden = module(**batch.inputs).last_hidden_state
        else:
            hidden = module_output(module, "embeddings", batch.inputs)
        return mean_pool(hidden.float(), batch.mask)

    def feature_module(self) -> str:
        return "embeddings"

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: Any,
                 budget: Budget) -> float:
        return self.evaluate_module(self.module(backbone), head, task, split, budget)


LORA_MODULES = [f"encoder.layer.{i}.{m}" for i in range(2)
                for m in ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")]


def lora_delta(base: StateDict, seed: int, scale: dict[int, float]) -> StateDict:
    """``base`` with a rank-``RANK`` update ``B A`` on every LoRA module (block ``l`` scaled by ``scale[l]``)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for m in LORA_MODULES:
        w = base[f"{m}.weight"]
        a = torch.randn(RANK, w.shape[1], generator=g)
        b = torch.randn(w.shape[0], RANK, generator=g)
        out[f"{m}.weight"] = w + scale[mm.block_index(m)] * (b @ a) / math.sqrt(w.shape[1])
    return out


def token_split(n: int, g: torch.Generator, offset: int) -> torch.Tensor:
    """Token ids drawn from a task-specific range (so tasks are separable), a padded tail on half the rows."""
    ids = torch.randint(1 + offset, 20 + offset, (n, SEQ), generator=g)
    ids[: n // 2, SEQ - 3:] = 0
    return ids


def make_setup(scales: list[dict[int, float]], n: int = 48, label_from_expert: bool = True
               ) -> tuple[TinySuite, StateDict, list[Expert], list[TaskData]]:
    """A suite, its base, LoRA experts (heads random) and tasks whose labels are the expert's own predictions."""
    suite = TinySuite()
    base = suite.backbone_state()
    g = torch.Generator().manual_seed(7)
    experts, tasks = [], []
    for t, sc in enumerate(scales):
        state = lora_delta(base, 100 + t, sc)
        head = {"weight": torch.randn(3, HIDDEN, generator=g), "bias": torch.zeros(3)}
        splits = {}
        model = suite.module(state)
        for s in ("train", "val", "test"):
            ids = token_split(n, g, offset=15 * t)
            with torch.no_grad():
                mask = (ids != 0).long()
                feats = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
                labels = (feats @ head["weight"].T).argmax(-1) if label_from_expert else torch.zeros(n).long()
            splits[s] = Split(ids, labels)
        tasks.append(TaskData(f"task{t}", ["a", "b", "c"], splits["train"], splits["val"], splits["test"],
                              fingerprint=f"t{t}"))
        experts.append(Expert(f"task{t}", state, head, 1.0))
    return suite, base, experts, tasks


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state


# --- EMR -----------------------------------------------------------------------------------------------------
def emr_reference(deltas: list[dict[str, torch.Tensor]], reduction: str):
    """Element by element, as the official ``emr_merge`` loop reads."""
    names = list(deltas[0])
    uni, masks = {}, [{} for _ in deltas]
    scales = [0.0] * len(deltas)
    kept = [0.0] * len(deltas)
    for n in names:
        flat = [d[n].reshape(-1).tolist() for d in deltas]
        size = len(flat[0])
        u, ms = [], [[] for _ in deltas]
        for i in range(size):
            s = sum(f[i] for f in flat)
            flag = 1.0 if s > 0 else -1.0
            best = 0.0
            for t, f in enumerate(flat):
                agree = f[i] * flag > 0
                ms[t].append(agree)
                if agree:
                    best = max(best, abs(f[i]))
            u.append(best * flag)
        uni[n] = torch.tensor(u, dtype=torch.float64).reshape(deltas[0][n].shape)
        for t, f in enumerate(flat):
            masks[t][n] = torch.tensor(ms[t]).reshape(deltas[0][n].shape)
            red = (lambda xs: sum(xs) / len(xs)) if reduction == "mean" else sum
            scales[t] += red([abs(x) for x in f])
            kept[t] += red([abs(u[i]) if ms[t][i] else 0.0 for i in range(size)])
    return uni, masks, [s / k for s, k in zip(scales, kept, strict=True)], scales, kept


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_emr_unify_matches_loop_reference(reduction: str) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
               "b": torch.randn(5, generator=g, dtype=torch.float64)} for _ in range(3)]
    deltas[0]["b"][0], deltas[1]["b"][0], deltas[2]["b"][0] = 1.0, -1.0, 0.0  # Σ = 0: flag −1 (official)
    uni, masks, resc = emr_unify(deltas, reduction=reduction)
    ref_uni, ref_masks, ref_resc, scales, kept = emr_reference(deltas, reduction)
    for n in ("w", "b"):
        torch.testing.assert_close(uni[n], ref_uni[n])
        for t in range(3):
            assert torch.equal(masks[t][n], ref_masks[t][n])
    assert uni["b"][0] == -1.0 and masks[1]["b"][0] and not masks[0]["b"][0]
    torch.testing.assert_close(resc, torch.tensor(ref_resc, dtype=torch.float64))
    # identity: λ_t · Σ R|M_t ⊙ τ_uni| = Σ R|τ_t|
    for t in range(3):
        red = (lambda x: x.abs().mean()) if reduction == "mean" else (lambda x: x.abs().sum())
        lhs = resc[t] * sum(red(masks[t][n] * uni[n]) for n in uni)
        rhs = sum(red(deltas[t][n]) for n in uni)
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)
        assert float(rhs) == pytest.approx(scales[t], rel=1e-12) and float(lhs / resc[t]) == pytest.approx(kept[t])


def test_emr_one_task_is_the_expert_and_compact_bytes() -> None:
    tau = {"w": torch.tensor([[0.5, -2.0], [0.0, 1.0]])}
    experts, info = emr_experts([tau], ["t"])
    torch.testing.assert_close(experts[0].deltas["w"], tau["w"])
    assert info["rescalers"] == [1.0]
    assert emr_storage_bytes({"w": torch.zeros(4, 5)}, 3) == 80 + 3 * 3 + 12


# --- Twin ----------------------------------------------------------------------------------------------------
def test_twin_rank_and_shared_expert() -> None:
    assert exclusive_rank((32, 48), 0.1) == 4 and exclusive_rank((3, 100), 0.1) == 1
    assert exclusive_rank((8, 4, 3, 3), 0.5) == 4
    base = {"w": torch.zeros(2, 2), "n": torch.ones(2), "i": torch.tensor([1])}
    e = [{"w": torch.ones(2, 2), "n": torch.full((2,), 3.0), "i": torch.tensor([5])},
         {"w": -torch.ones(2, 2) * 3, "n": torch.ones(2), "i": torch.tensor([5])}]
    s = task_arithmetic_state(base, e, 0.5, exclude=["^n$"])
    torch.testing.assert_close(s["w"], torch.full((2, 2), -1.0))
    assert torch.equal(s["n"], base["n"]) and torch.equal(s["i"], base["i"])


def test_twin_one_task_full_rank_is_the_expert() -> None:
    suite, base, experts, tasks = make_setup([{0: 1.0, 1: 1.0}], n=24, label_from_expert=False)
    shared = task_arithmetic_state(base, [experts[0].backbone], 0.3)
    low, lost = twin_experts(shared, [experts[0].backbone], ["t"], LORA_MODULES, rank_fraction=1.0)
    assert lost["t"] < 1e-10
    for m in LORA_MODULES:
        torch.testing.assert_close(shared[f"{m}.weight"] + low[0].delta(m), experts[0].backbone[f"{m}.weight"],
                                   atol=1e-5, rtol=1e-5)
    built = rm.build_twin(suite, base, experts, tasks, Budget(eval_examples=24), {"rank_fraction": 1.0,
                                                                               "router_epochs": 2})
    ids = tasks[0].test.inputs[:6]
    torch.testing.assert_close(forward(built.model, ids), forward(suite.module(experts[0].backbone), ids),
                               atol=1e-4, rtol=1e-4)
    assert built.meta["feature_source"] == "final" and built.storage_bytes > 0


# --- MIN-Merging: pure parts -------------------------------------------------------------------------------
def test_block_index_and_grouping() -> None:
    assert mm.block_index("encoder.layer.3.attention.self.query") == 3
    assert mm.block_index("model.layers.11.mlp.up_proj") == 11
    assert mm.block_index("_blocks.5._expand_conv") == 5
    assert mm.block_index("embeddings.word_embeddings") is None and mm.block_index("lm_head") is None
    assert mm.group_by_block(["encoder.layer.1.a", "embeddings.x", "encoder.layer.0.b", "encoder.layer.1.c"]) == {
        0: ["encoder.layer.0.b"], 1: ["encoder.layer.1.a", "encoder.layer.1.c"]}


def test_layer_importance_core_and_harmful_on_callback_toy() -> None:
    perf = {None: 0.8, 0: 0.5, 1: 0.8, 2: 0.9, 3: 0.79}  # dropping 0 hurts, dropping 2 helps
    full, imp = mm.layer_importance(lambda skip: perf[skip], [0, 1, 2, 3])
    assert full == 0.8 and imp == pytest.approx({0: 0.3, 1: 0.0, 2: -0.1, 3: 0.01})
    assert mm.core_layers(imp) == {0, 3} and mm.core_layers(imp, delta=0.05) == {0}
    assert mm.core_layers(imp, top_fraction=0.25) == {0}
    assert mm.harmful_layers(imp, 0.05) == {2} and mm.harmful_layers(imp, 0.2) == set()


def test_neuron_pruning_keeps_top_rows_by_score_formula() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 7, generator=g), torch.randn(10, 3, generator=g)
    act = torch.rand(10, generator=g)
    delta = b @ a
    ref = []
    for i in range(10):
        ref.append(math.sqrt(sum(float(delta[i, j]) ** 2 for j in range(7))) * float(act[i]))
    torch.testing.assert_close(mm.neuron_scores(a, b, act), torch.tensor(ref, dtype=torch.float64))
    for keep in (0.0, 0.25, 0.5, 1.0):
        new_b, mask = mm.keep_top_rows(b, torch.tensor(ref), keep)
        k = math.ceil(keep * 10)
        top = set(sorted(range(10), key=lambda i: -ref[i])[:k])
        assert {i for i in range(10) if mask[i]} == top
        for i in range(10):
            assert torch.equal(new_b[i], b[i] if i in top else torch.zeros(3))
    pruned, frac = mm.prune_neurons({"m": (a, b)}, {"m": act}, 0.5)
    assert frac == {"m": 0.5} and int(pruned["m"][1].ne(0).any(1).sum()) == 5


def test_mean_abs_outputs_skips_padding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    got = mm.mean_abs_outputs(Wrap(), ["inner.0"], [({"x": x}, mask)])["inner.0"]
    y = model(x).detach()
    ref = torch.zeros(3)
    count = 0
    for bi, ti in itertools.product(range(2), range(5)):
        if mask[bi, ti]:
            ref += y[bi, ti].abs()
            count += 1
    torch.testing.assert_close(got, ref / count)


# --- hierarchical gates end to end -----------------------------------------------------------------------------
def test_hierarchical_gates_core_everywhere_is_the_top_expert() -> None:
    suite, base, experts, _ = make_setup([{0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}], n=8, label_from_expert=False)
    from neuromerge.routing.lora_factors import lora_factors

    factors = [lora_factors(base, e.backbone, RANK) for e in experts]
    low = [LowRankExpert(f"e{i}", f) for i, f in enumerate(factors)]
    ids = token_split(5, torch.Generator().manual_seed(3), 0)
    core_all = {0: set(LORA_MODULES), 1: set(LORA_MODULES)}
    model = RoutedModel(suite.module(base), low, router=None, policy=HierarchicalGates(2, core_all),
                        feature_module="embeddings")
    e1 = forward(suite.module(experts[0].backbone), ids)
    with model.force(torch.tensor([[1.0, 0.0]])):
        torch.testing.assert_close(forward(model, ids), e1, atol=1e-4, rtol=1e-4)
    with model.force(torch.tensor([[0.7, 0.3]])):  # not one-hot: core layers still take e1 alone
        torch.testing.assert_close(forward(model, ids), e1, atol=1e-4, rtol=1e-4)
    mixed = RoutedModel(suite.module(base), low, router=None, policy=HierarchicalGates(2, {0: set(), 1: set()}),
                        feature_module="embeddings")
    static = rm.static_state(base, {m: (torch.cat([factors[0][m][0], factors[1][m][0]]),
                                        torch.cat([0.7 * factors[0][m][1], 0.3 * factors[1][m][1]], 1))
                                    for m in LORA_MODULES})
    with mixed.force(torch.tensor([[0.7, 0.3]])):
        torch.testing.assert_close(forward(mixed, ids), forward(suite.module(static), ids), atol=1e-4, rtol=1e-4)


# --- builders end to end ----------------------------------------------------------------------------------------
ROUTER_FAST = {"router_epochs": 5, "router_examples": 32, "router_val_examples": 16}
FAST = {**ROUTER_FAST, "importance_examples": 32, "calib_examples": 16}


def test_min_merging_layer_importance_finds_the_layer_that_matters() -> None:
    # block 1 carries the task (large update), block 0 almost nothing: dropping block 1 must hurt
    suite, base, experts, tasks = make_setup([{0: 1e-4, 1: 3.0}, {0: 1e-4, 1: 3.0}])
    memo = rm.Memo()
    budget = Budget(eval_examples=48)
    built = rm.build_min_merging(suite, base, experts, tasks, budget, {**FAST, "core_delta": 0.05,
                                                                       "neuron_keep": 0.5}, memo=memo)
    for t in ("task0", "task1"):
        imp = built.meta["layer_importance"][t]
        assert imp["1"] > 0.1 and abs(imp["0"]) <= 0.05
        assert built.meta["core_layers"][t] == [1]
        assert built.meta["full_val"][t] == 1.0
        assert built.meta["pruned_neuron_fraction"][t] == pytest.approx(0.5, abs=0.05)
    assert set(built.meta["router_val_acc"]) == {"embeddings", "final"}
    assert built.meta["feature_source"] in ("embeddings", "final")
    policy = built.model.policy
    assert isinstance(policy, HierarchicalGates)
    assert policy.core[0] == {m for m in LORA_MODULES if m.startswith("encoder.layer.1.")}
    assert built.meta["nonzero_bytes"] < built.storage_bytes
    # the ablations reuse the analysis (memo) and differ where they should
    plain = rm.build_variant("min_merging:no_enhancement", suite, base, experts, tasks, budget, FAST, memo=memo)
    assert plain.meta["pruned_neuron_fraction"] == {}
    flat = rm.build_variant("min_merging:no_hierarchy", suite, base, experts, tasks, budget, FAST, memo=memo)
    assert flat.model.policy.to_dict() == {"name": "topk", "k": 2, "renormalize": True}
    uni = rm.build_variant("min_merging:uniform_router", suite, base, experts, tasks, budget, FAST, memo=memo)
    forward(uni.model, tasks[0].test.inputs[:4])
    torch.testing.assert_close(uni.model.last_probs, torch.full((4, 2), 0.5))
    oracle = rm.build_variant("min_merging:oracle", suite, base, experts, tasks, budget, FAST, memo=memo)
    assert oracle.oracle
    scores = rm.score_routed(suite, oracle.model, experts, tasks, budget, oracle=True)
    assert set(scores) == {"task0", "task1"} and all(0 <= v <= 1 for v in scores.values())
    lat = rm.measure_latency(suite, oracle.model, experts[0].head, tasks[0], budget, sizes=(1, 8))
    assert set(lat) == {"batch_1", "batch_8"} and all(v > 0 for v in lat.values())


def test_emr_builder_oracle_equals_the_reconstructed_expert() -> None:
    suite, base, experts, tasks = make_setup([{0: 1.0, 1: 1.0}, {0: 1.0, 1: 0.5}], n=24, label_from_expert=False)
    built = rm.build_variant("emr:oracle", suite, base, experts, tasks, Budget(eval_examples=24), ROUTER_FAST)
    assert built.oracle and built.meta["oracle"]
    deltas = [{m: e.backbone[f"{m}.weight"] - base[f"{m}.weight"] for m in LORA_MODULES} for e in experts]
    uni, masks, resc = emr_unify(deltas)
    ids = tasks[1].test.inputs[:5]
    static = dict(base)
    for m in LORA_MODULES:
        static[f"{m}.weight"] = base[f"{m}.weight"] + float(resc[1]) * masks[1][m] * uni[m]
    with built.model.force(torch.tensor([[0.0, 1.0]])):
        torch.testing.assert_close(forward(built.model, ids), forward(suite.module(static), ids), atol=1e-4,
                                   rtol=1e-4)
    assert built.storage_bytes < built.meta["runtime_bytes"]
    assert bench_routed.runners().keys() == rm.VARIANTS.keys()
    with pytest.raises(TaskError, match="calib_examples"):
        rm.resolve_params("emr:router", FAST)


# --- route build from a config: HF base folder + PEFT adapters + task files -----------------------------------
def word_tokenizer(vocab: list[str]) -> Any:
    """A BERT tokenizer over ``vocab`` (``[PAD] [UNK] [CLS] [SEP] [MASK]`` first): whole words, ``[CLS] … [SEP]``.
    Built from a ``tokenizers`` WordPiece model: transformers 5's ``BertTokenizerFast(vocab_file=…)`` keeps only the
    special tokens (every word became ``[UNK]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def hf_fixture(tmp_path, targets: tuple[str, ...] = ("query", "value")) -> tuple[dict[str, Any], list[nn.Module]]:
    """A tiny BERT folder with a word-level tokenizer, two PEFT LoRA adapters (random B), a task file."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    words = [f"w{i}" for i in range(30)]
    base_dir = tmp_path / "base"
    tiny_bert(pooler=True).save_pretrained(base_dir)
    word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]).save_pretrained(base_dir)
    merged = []
    entries = []
    g = torch.Generator().manual_seed(5)
    for t in range(2):
        model = BertModel.from_pretrained(base_dir)
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)))
        with torch.no_grad():
            for n, prm in peft_model.named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
        peft_model.save_pretrained(tmp_path / f"ad{t}")
        merged.append(peft_model.merge_and_unload().eval())
        rows = []
        for i in range(30):
            toks = [words[(15 * t + 7 * i + j * (i % 5 + 1)) % 15 + 15 * t] for j in range(4)]
            rows.append({"text": " ".join(toks) + f" w{i % 10}", "label": i % 2})
        (tmp_path / f"t{t}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        entries.append(f"  - {{name: t{t}, suite: text, file: t{t}.jsonl}}")
    (tmp_path / "tasks.yaml").write_text("tasks:\n" + "\n".join(entries) + "\n")
    cfg = {"base": str(base_dir), "tasks": str(tmp_path / "tasks.yaml"),
           "experts": {"t0": str(tmp_path / "ad0"), "t1": str(tmp_path / "ad1")}, "probe_steps": 10,
           "params": {**FAST, "enhancement": False, "core_delta": -1.0}}
    return cfg, merged


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices seen through PEFT
def test_route_build_config_round_trip_equals_the_peft_expert(tmp_path) -> None:
    from neuromerge.routing import load_routed
    from neuromerge.routing.cli import find_builder

    cfg, merged = hf_fixture(tmp_path)
    out = find_builder("min_merging")(cfg, tmp_path / "routed", force=False)
    model = load_routed(out)
    ids = torch.tensor([[2, 20, 21, 22, 3, 0], [2, 7, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        for j in range(2):
            probs = torch.zeros(1, 2)
            probs[0, j] = 1.0
            with model.force(probs):
                got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            ref = merged[j](input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        model(input_ids=ids, attention_mask=mask)  # routes with the saved router
    assert model.last_probs is not None and model.last_probs.shape == (2, 2)
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "min_merging" and manifest["tasks"] == ["t0", "t1"]
    assert manifest["extra"]["meta"]["factors_exact"] is True
    with pytest.raises(TaskError, match="bench ablation"):
        find_builder("emr")({**cfg, "variant": "emr:oracle", "params": ROUTER_FAST}, tmp_path / "x")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_route_build_wemoe_trains_routers_and_round_trips(tmp_path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from neuromerge.cli import app
    from neuromerge.routing import load_routed
    from neuromerge.routing.cli import find_builder

    cfg, _ = hf_fixture(tmp_path, ("query", "value", "intermediate.dense"))  # WEMoE routes the MLPs
    cfg = {**cfg, "params": {"steps": 5, "batch_size": 4}}
    (tmp_path / "wemoe.yaml").write_text(yaml.safe_dump({"method": "wemoe", **cfg}))
    res = CliRunner().invoke(app, ["route", "build", str(tmp_path / "wemoe.yaml"), "-o", str(tmp_path / "wemoe")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "wemoe"
    (tmp_path / "nomethod.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["route", "build", str(tmp_path / "nomethod.yaml"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "method:" in res.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "wemoe" and manifest["tasks"] == ["t0", "t1"]
    meta = manifest["extra"]["meta"]
    assert meta["split"] == "test" and meta["unlabelled"] is True and meta["steps"] == 5
    model = load_routed(out)
    ids = torch.tensor([[2, 20, 21, 22, 3, 0], [2, 7, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = load_routed(out)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(TaskError, match=r"^route build config: params\.nope: unknown key$"):  # before any fitting
        find_builder("wemoe")({**cfg, "params": {"nope": 1}}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bench_runner_produces_a_scored_module_with_storage_and_latency() -> None:
    import contextlib
    from types import SimpleNamespace

    suite, base, experts, tasks = make_setup([{0: 1.0, 1: 1.0}, {0: 1.0, 1: 0.5}], n=40, label_from_expert=False)
    ctx = SimpleNamespace(suite=suite, base=base, in_domain=tasks, experts={e.task: e for e in experts},
                          budget=Budget(quick=True, eval_examples=40), seed=0,
                          clock=lambda _phase: contextlib.nullcontext())
    runner, transductive = bench_routed.runners()["emr:router"]
    produced = runner(ctx, "emr:router")
    assert not transductive and not produced.oracle and isinstance(produced.module, RoutedModel)
    numels = [base[f"{m}.weight"].numel() for m in LORA_MODULES]
    compact = sum(4 * n + 2 * ((n + 7) // 8) for n in numels) + 2 * 4  # τ_uni fp32 + 2 bit masks + 2 rescalers
    assert produced.storage_bytes == compact + produced.module.storage_bytes()["router"]
    assert set(produced.latency_ms) == {"batch_1", "batch_32"}
    assert set(produced.info["latency_static_ms"]) == {"batch_1", "batch_32"}
    assert produced.params["router_examples"] == rm.QUICK_CAPS["router_examples"]
    oracle = runner(ctx, "min_merging:oracle")
    assert oracle.oracle and oracle.info["method"] == "min_merging:oracle"


def test_final_feature_fn_drops_control_keywords() -> None:
    seen = {}

    class Probe(TinySuite):
        def pooled(self, module, batch, source):  # type: ignore[override]
            seen.update(keys=set(batch.inputs), source=source, mask=batch.mask)
            return torch.zeros(1, 3)

    fn = rm.SuiteFinalFeatures(Probe())
    mask = torch.ones(1, 4, dtype=torch.long)
    fn(nn.Identity(), {"input_ids": torch.ones(1, 4), "attention_mask": mask, "logits_to_keep": 1, "use_cache": False})
    assert seen["keys"] == {"input_ids", "attention_mask"} and seen["source"] == "final" and seen["mask"] is mask


def test_full_rank_experts_fall_back_to_a_truncated_svd() -> None:
    suite, base, experts, _ = make_setup([{0: 1.0, 1: 1.0}], n=8, label_from_expert=False)
    g = torch.Generator().manual_seed(0)
    full = dict(experts[0].backbone)
    m = LORA_MODULES[0]
    full[f"{m}.weight"] = full[f"{m}.weight"] + 0.01 * torch.randn(full[f"{m}.weight"].shape, generator=g)
    with pytest.warns(UserWarning, match="approximating"):
        factors, meta = rm.expert_factors(suite, base, [Expert("e", full, None, 1.0)], LORA_MODULES,
                                          rm.FactorParams())
    assert (meta["factor_rank"], meta["factors_exact"], meta["factor_ranks"]) == (16, False, {"e": 16})
    assert factors[0][m][0].shape[0] == 16
    # the reported discarded energy is Σ‖ΔW − BA‖² / Σ‖ΔW‖² of the truncated factors (a random ΔW loses some)
    lost = total = 0.0
    for mod, (a, b) in factors[0].items():
        d = (full[f"{mod}.weight"] - base[f"{mod}.weight"]).double()
        total += float(d.square().sum())
        lost += float((d - b.double() @ a.double()).square().sum())
    assert meta["discarded_energy"]["e"] == pytest.approx(lost / total) and 0 < lost / total < 1
    exact, meta = rm.expert_factors(suite, base, experts, LORA_MODULES, rm.FactorParams())
    assert meta["factors_exact"] and exact[0][m][0].shape[0] == RANK
