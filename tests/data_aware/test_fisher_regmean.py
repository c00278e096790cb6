"""Fisher and RegMean: pure formulas against independent references, data loops on tiny modules."""

from __future__ import annotations

import torch
from torch import nn

from neuromerge.data_aware.access import SimpleBatch
from neuromerge.data_aware.fisher import FisherParams, diagonal_fisher, fisher_merge, fisher_merge_models
from neuromerge.data_aware.regmean import (
    RegMeanParams,
    accumulate_grams,
    reduce_non_diagonal,
    regmean_merge_linear,
    regmean_merge_models,
)

from .fixtures import bert_setup, mlp_setup


def _rand_states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def test_fisher_with_equal_fishers_is_the_average() -> None:
    states = _rand_states(3)
    g = torch.Generator().manual_seed(1)
    f = {"a": torch.rand(3, 4, generator=g), "b": torch.rand(5, generator=g)}
    for normalize in (False, True):
        merged = fisher_merge(states, [f, f, f], normalize=normalize)
        for k in ("a", "b"):
            torch.testing.assert_close(merged[k], torch.stack([s[k] for s in states]).mean(0))


def test_fisher_merge_matches_an_explicit_entrywise_formula() -> None:
    states = _rand_states(2, seed=2)
    g = torch.Generator().manual_seed(3)
    fishers = [{k: torch.rand(v.shape, generator=g) * (i + 1) for k, v in states[0].items()} for i in range(2)]
    eps = 1e-6
    norms = [sum(float((f[k] ** 2).sum()) for k in f) ** 0.5 for f in fishers]
    coeffs = [(1 / (nm + eps)) / sum(1 / (m + eps) for m in norms) for nm in norms]
    merged = fisher_merge(states, fishers, normalize=True, min_weight=eps)
    a = merged["a"]
    for i in range(3):
        for j in range(4):
            w = [c * (float(f["a"][i, j]) + eps) for c, f in zip(coeffs, fishers, strict=True)]
            want = sum(wi * float(s["a"][i, j]) for wi, s in zip(w, states, strict=True)) / sum(w)
            assert abs(float(a[i, j]) - want) < 1e-5


def test_diagonal_fisher_of_softmax_regression_matches_the_closed_form() -> None:
    # logits = W x: ∂ log p_c / ∂W = (e_c − p) xᵀ, so F = mean_n Σ_c p_c ((e_c − p) xᵀ)²
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
    x = torch.randn(5, 4, generator=g)
    batch = SimpleBatch({"x": x}, torch.zeros(5, dtype=torch.long))
    fisher, n = diagonal_fisher(lin, lambda b: lin(b.inputs["x"]), [batch], ["weight"])
    assert n == 5
    want = torch.zeros(3, 4)
    for xn in x:
        p = torch.softmax(lin.weight.detach() @ xn, -1)
        for c in range(3):
            e = torch.zeros(3)
            e[c] = 1
            want += p[c] * torch.outer(e - p, xn) ** 2
    torch.testing.assert_close(fisher["weight"], want / 5)


def test_fisher_driver_reads_train_examples_and_keeps_excluded_tensors() -> None:
    access, base, experts, heads, tasks = mlp_setup()
    info: dict = {}
    merged = fisher_merge_models(access, base, experts, heads, tasks, None, FisherParams(examples=10, batch_size=4),
                                 exclude=["fc2.bias"], info=info)
    assert info["examples"] == {"t0": 10, "t1": 10} and info["split"] == "train"
    torch.testing.assert_close(merged["fc2.bias"], base["fc2.bias"])
    lo = torch.minimum(experts[0]["fc1.weight"], experts[1]["fc1.weight"])
    hi = torch.maximum(experts[0]["fc1.weight"], experts[1]["fc1.weight"])
    assert bool(((merged["fc1.weight"] >= lo - 1e-6) & (merged["fc1.weight"] <= hi + 1e-6)).all())
    assert not torch.allclose(merged["fc1.weight"], (experts[0]["fc1.weight"] + experts[1]["fc1.weight"]) / 2)


def test_regmean_equals_least_squares_of_the_concatenated_regression() -> None:
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(20, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    merged = regmean_merge_linear(ws, grams, alpha=1.0)
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    want = torch.linalg.lstsq(x_all, y_all).solution.T
    torch.testing.assert_close(merged, want)
    # identical inputs: the least-squares solution is the plain average
    same = regmean_merge_linear(ws, [grams[0]] * 3, alpha=1.0)
    torch.testing.assert_close(same, torch.stack(ws).mean(0))


def test_reduce_non_diagonal() -> None:
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    torch.testing.assert_close(reduce_non_diagonal(gram, 0.25), torch.tensor([[2.0, 0.25], [0.25, 3.0]]))


def test_accumulate_grams_skips_padding_and_matches_explicit_inputs() -> None:
    access, _base, experts, _heads, tasks = bert_setup()
    module = access.module(experts[0])
    batches = access.batches(tasks[0], "train", None, batch_size=4)
    captured: list[torch.Tensor] = []
    h = module.encoder.layer[0].intermediate.dense.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    grams, rows = accumulate_grams(module, batches, ["encoder.layer.0.intermediate.dense"])
    h.remove()
    x = torch.cat([c[b.mask.bool()] for c, b in zip(captured, batches, strict=True)]).double()
    assert rows["encoder.layer.0.intermediate.dense"] == int(sum(int(b.mask.sum()) for b in batches))
    torch.testing.assert_close(grams["encoder.layer.0.intermediate.dense"], x.T @ x / x.shape[0])


def test_regmean_of_one_model_returns_it() -> None:
    access, base, experts, heads, tasks = bert_setup(tasks=1)
    merged = regmean_merge_models(access, base, experts[:1], heads[:1], tasks[:1], None, RegMeanParams(alpha=0.9))
    for k, v in experts[0].items():
        torch.testing.assert_close(merged[k], v, atol=1e-4, rtol=1e-4)


def test_regmean_driver_solves_linears_and_averages_the_rest() -> None:
    access, base, experts, heads, tasks = bert_setup()
    info: dict = {}
    merged = regmean_merge_models(access, base, experts, heads, tasks, None, RegMeanParams(examples=4), info=info)
    assert info["examples"] == {"b0": 4, "b1": 4} and info["linear_layers"] == 12
    ln = "encoder.layer.0.output.LayerNorm.weight"
    torch.testing.assert_close(merged[ln], (experts[0][ln] + experts[1][ln]) / 2)
    avg = (experts[0]["encoder.layer.1.output.dense.weight"] + experts[1]["encoder.layer.1.output.dense.weight"]) / 2
    assert not torch.allclose(merged["encoder.layer.1.output.dense.weight"], avg, atol=1e-4)
    assert set(merged) == set(base)
