"""AdaMerging and WEMoE on tiny modules: formulas, the functional path, objective decrease, routing exactness."""

from __future__ import annotations

import torch

from neuromerge.data_aware.access import LogitsCall, entropy, functional_logits
from neuromerge.data_aware.adamerging import (
    AdaMergingParams,
    adamerging_merge_models,
    combine,
    learn_coefficients,
    ties_task_vectors,
)
from neuromerge.data_aware.wemoe import WEMoEParams, build_wemoe, wemoe_merge_models

from .fixtures import bert_setup, mlp_setup


def test_combine_layer_and_task_wise() -> None:
    base = {"a": torch.ones(2), "b": torch.zeros(3)}
    deltas = [{"a": torch.tensor([1.0, 2.0]), "b": torch.ones(3)}, {"a": torch.tensor([3.0, 0.0]), "b": -torch.ones(3)}]
    out = combine(base, deltas, torch.tensor([[0.5, 0.1], [0.2, 0.3]]), ["a", "b"])
    torch.testing.assert_close(out["a"], torch.tensor([1 + 0.5 + 0.6, 1 + 1.0 + 0.0]))
    torch.testing.assert_close(out["b"], torch.full((3,), 0.1 - 0.3))
    out = combine(base, deltas, torch.tensor([[0.5], [0.2]]), ["a", "b"])
    torch.testing.assert_close(out["b"], torch.full((3,), 0.3))


def test_ties_task_vectors_match_an_explicit_loop() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(4, 5, generator=g), "b": torch.randn(6, generator=g)} for _ in range(3)]
    out = ties_task_vectors(deltas, ["a", "b"], 0.4)
    flat = [torch.cat([d["a"].reshape(-1), d["b"]]) for d in deltas]
    k = int(0.4 * 26)
    trimmed = [f * (f.abs() >= f.abs().sort(descending=True).values[k - 1]) for f in flat]
    got = [torch.cat([o["a"].reshape(-1), o["b"]]) for o in out]
    for name_slice in (slice(0, 20), slice(20, 26)):
        total = sum(t[name_slice] for t in trimmed)
        sign = torch.sign(total)
        sign[sign == 0] = 1.0 if float(torch.sign(total).sum()) >= 0 else -1.0
        for t, o in zip(trimmed, got, strict=True):
            want = torch.where(torch.sign(t[name_slice]) == sign, t[name_slice], torch.zeros(()))
            torch.testing.assert_close(o[name_slice], want)


def test_functional_logits_equal_a_loaded_module() -> None:
    access, base, experts, heads, tasks = bert_setup()
    batch = access.batches(tasks[0], "test", None)[0]
    call = LogitsCall(access, access.module(base), heads[0], tasks[0])
    got = functional_logits(call, {k: v for k, v in experts[1].items() if v.is_floating_point()}, batch)
    want = access.logits(access.module(experts[1]), heads[0], tasks[0], batch)
    torch.testing.assert_close(got, want)


def test_adamerging_with_no_steps_is_task_arithmetic_at_init() -> None:
    access, base, experts, heads, tasks = mlp_setup()
    merged = adamerging_merge_models(access, base, experts, heads, tasks, None, AdaMergingParams(steps=0))
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 0.3 * ((experts[0][k] - base[k]) + (experts[1][k] - base[k])))


def test_adamerging_objective_decreases_and_lambdas_stay_clamped() -> None:
    access, base, experts, heads, tasks = mlp_setup()
    for granularity in ("layer", "task"):
        info: dict = {}
        params = AdaMergingParams(steps=40, lr=0.05, granularity=granularity, batch_size=24)
        merged = adamerging_merge_models(access, base, experts, heads, tasks, None, params, info=info)
        assert info["loss_last"] < info["loss_first"] - 1e-3
        assert info["split"] == "test" and info["unlabelled"] and info["examples"] == {"t0": 24, "t1": 24}
        assert all(0.0 <= v <= 1.0 for v in info["lambda_mean_per_task"])
        # the returned state realizes the learned objective: its entropy is below the initial one
        with torch.no_grad():
            after = sum(float(entropy(access.logits(access.module(merged), h, t,
                                                    access.batches(t, "test", None, batch_size=24)[0])))
                        for h, t in zip(heads, tasks, strict=True))
        assert after < info["loss_first"]


def test_learn_coefficients_shapes_and_plus_plus_runs() -> None:
    base = {"w": torch.zeros(3)}
    deltas = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0])}]

    def loss(tensors: dict, t: int, step: int) -> torch.Tensor:  # minimized at w = (1, 1, 0) within the box
        return ((tensors["w"] - torch.tensor([2.0, 2.0, 0.0])) ** 2).sum() / 2

    lam, hist = learn_coefficients(loss, base, deltas, ["w"], AdaMergingParams(steps=200, lr=0.05))
    assert lam.shape == (2, 1) and hist[-1] < hist[0]
    torch.testing.assert_close(lam, torch.ones(2, 1))  # clamped at the upper bound
    access, b, e, h, tasks = mlp_setup()
    merged = adamerging_merge_models(access, b, e, h, tasks, None, AdaMergingParams(steps=2, ties=True))
    assert set(merged) == set(b)


def _forced_reference(base: dict, experts: list, gates: torch.Tensor, mlp: set[str], lam: float) -> list[dict]:
    """Per-sample explicit states: TA(λ) outside the MLPs, W0 + Σ_t g[b,t] τ_t inside."""
    out = []
    for row in gates:
        s = {}
        for k, v in base.items():
            if not v.is_floating_point():
                s[k] = v
            elif k in mlp:
                s[k] = v + sum(float(row[t]) * (e[k] - v) for t, e in enumerate(experts))
            else:
                s[k] = v + lam * sum(e[k] - v for e in experts)
        out.append(s)
    return out


def test_wemoe_forced_gates_equal_per_sample_merged_models() -> None:
    access, base, experts, _heads, tasks = bert_setup()
    model = build_wemoe(access.module, base, experts, WEMoEParams())
    mlp = {f"{lin}.{p}" for g in model.groups for lin in g.linears for p in ("weight", "bias")}
    batch = access.batches(tasks[0], "test", None)[0]
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, -0.2], [0.0, 0.0], [2.0, 1.0]])
    with model.forced(gates), torch.no_grad():
        got = model(**batch.inputs).last_hidden_state
    for b, state in enumerate(_forced_reference(base, experts, gates, mlp, 0.3)):
        with torch.no_grad():
            want = access.module(state)(**{k: v[b:b + 1] for k, v in batch.inputs.items()}).last_hidden_state
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


def test_wemoe_one_hot_router_is_the_expert_mlp() -> None:
    access, base, experts, _heads, tasks = bert_setup()
    probe = build_wemoe(access.module, base, experts)
    mlp = {f"{lin}.{p}" for g in probe.groups for lin in g.linears for p in ("weight", "bias")}
    # experts that differ from the base only in their MLPs: the one-hot routed model is the expert itself
    only_mlp = [{k: (e[k] if k in mlp else base[k]) for k in base} for e in experts]
    model = build_wemoe(access.module, base, only_mlp, WEMoEParams(gate="softmax"))
    batch = access.batches(tasks[1], "test", None)[0]
    for k in range(2):
        with model.forced(torch.nn.functional.one_hot(torch.tensor(k), 2).float()), torch.no_grad():
            got = model(**batch.inputs).last_hidden_state
        with torch.no_grad():
            want = access.module(only_mlp[k])(**batch.inputs).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_wemoe_depth0_router_at_init_is_task_arithmetic_and_training_lowers_entropy() -> None:
    access, base, experts, heads, tasks = bert_setup()
    model = build_wemoe(access.module, base, experts, WEMoEParams(router_hidden_layers=0))
    batch = access.batches(tasks[0], "test", None)[0]
    ta = {k: (v + 0.3 * sum(e[k] - v for e in experts) if v.is_floating_point() else v) for k, v in base.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch.inputs).last_hidden_state,
                                   access.module(ta)(**batch.inputs).last_hidden_state, atol=1e-5, rtol=1e-5)
    info: dict = {}
    trained = wemoe_merge_models(access, base, experts, heads, tasks, None, WEMoEParams(steps=15, lr=0.02), seed=1,
                                 info=info)
    assert info["loss_last"] < info["loss_first"] and info["routed_mlps"] == 2 and info["split"] == "test"
    assert trained.embeddings is trained.backbone.embeddings  # attribute lookups reach the backbone
    assert trained.storage_bytes() > 0


def test_wemoe_refuses_experts_that_change_no_mlp_weight() -> None:
    """LoRA experts on attention only (the llm suite's): nothing to route, a clear NotApplicable, not a KeyError."""
    import pytest

    from neuromerge.errors import NotApplicable

    access, base, experts, _heads, _tasks = bert_setup()
    probe = build_wemoe(access.module, base, experts)
    mlp = {f"{lin}.{p}" for g in probe.groups for lin in g.linears for p in ("weight", "bias")}
    attention_only = [{k: (base[k] if k in mlp else e[k]) for k in base} for e in experts]
    with pytest.raises(NotApplicable, match="no expert changes an MLP weight"):
        build_wemoe(access.module, base, attention_only)
