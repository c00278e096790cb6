"""TIES and DARE against loop references: trims, global thresholds, ties, masks, chunking, mergekit equality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neuromerge.errors import ConfigError
from neuromerge.methods import GlobalStats, get
from neuromerge.tensors.sparsify import bernoulli_keep_mask


def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


BASE = rand((5, 8), 0)
MODELS = [BASE + rand((5, 8), 1 + i) for i in range(3)]
WEIGHTS = [1.0, 0.5, 2.0]
DENSITIES = [0.3, 0.5, 0.2]
PER_MODEL = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES, strict=True)]


def deltas_np(base: torch.Tensor = BASE, models: list[torch.Tensor] = MODELS) -> list[np.ndarray]:
    return [(m - base).double().numpy() for m in models]


def brute_threshold(values: np.ndarray, density: float) -> float:
    """k-th largest magnitude by sorting everything (k = floor(density·n))."""
    mags = sorted(np.abs(values).ravel().tolist(), reverse=True)
    k = math.floor(density * len(mags) + 1e-9)
    return mags[k - 1] if k > 0 else math.inf


def trim_np(delta: np.ndarray, thr: float) -> np.ndarray:
    out = np.zeros_like(delta)
    for idx in np.ndindex(delta.shape):
        out[idx] = delta[idx] if abs(delta[idx]) >= thr else 0.0
    return out


# ----------------------------------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("variant", ["dis-mean", "dis-sum"])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_ties_tensor_scope_matches_the_loop_reference(run_method, reference_disjoint_merge, variant, sign_method):
    params = {"scope": "tensor", "variant": variant, "sign_method": sign_method, "lambda": 0.8}
    out, _ = run_method("ties", BASE, MODELS, params, PER_MODEL)
    trimmed = [trim_np(d, brute_threshold(d, p)) for d, p in zip(deltas_np(), DENSITIES, strict=True)]
    merged = reference_disjoint_merge(trimmed, WEIGHTS, variant, sign_method)
    np.testing.assert_allclose(out.numpy(), BASE.double().numpy() + 0.8 * merged, rtol=1e-5, atol=1e-6)


def test_ties_dis_mean_with_unit_weights_is_the_plain_disjoint_mean(run_method):
    out, _ = run_method("ties", BASE, MODELS, {"scope": "tensor", "density": 0.4})
    trimmed = [trim_np(d, brute_threshold(d, 0.4)) for d in deltas_np()]
    expected = np.zeros(BASE.shape)
    for idx in np.ndindex(BASE.shape):
        vals = [t[idx] for t in trimmed]
        sign = np.sign(sum(vals)) or 1.0
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        expected[idx] = sum(agree) / len(agree) if agree else 0.0
    np.testing.assert_allclose((out - BASE).numpy(), expected, rtol=1e-5, atol=1e-6)


def fake_model_stats(densities: list[float], other_seed: int = 50) -> tuple[GlobalStats, list[torch.Tensor]]:
    """Global statistics of a 2-tensor 'model' (the test tensor ``w`` + a tensor ``other`` of different scale),
    by brute force: sort all entries of both tensors per model."""
    others = [3.0 * rand((13,), other_seed + t) for t in range(len(densities))]
    thresholds, removed, total, kept, count = [], [], [], [], []
    for d, other, density in zip(deltas_np(), others, densities, strict=True):
        everything = np.concatenate([d.ravel(), other.double().numpy()])
        thr = brute_threshold(everything, density)
        mags = np.abs(everything)
        thresholds.append(thr)
        removed.append(float(mags[mags < thr].sum()))
        total.append(float(mags.sum()))
        kept.append(int((mags >= thr).sum()))
        count.append(everything.size)
    stats = GlobalStats(tuple(thresholds), tuple(removed), tuple(total), tuple(kept), tuple(count))
    return stats, others


def test_ties_global_scope_trims_with_the_whole_model_threshold(run_method, reference_disjoint_merge):
    stats, _ = fake_model_stats(DENSITIES)
    per_tensor = [brute_threshold(d, p) for d, p in zip(deltas_np(), DENSITIES, strict=True)]
    assert all(g != t for g, t in zip(stats.thresholds, per_tensor, strict=True))  # scope matters here
    out, _ = run_method("ties", BASE, MODELS, {}, PER_MODEL, stats=stats)
    trimmed = [trim_np(d, thr) for d, thr in zip(deltas_np(), stats.thresholds, strict=True)]
    expected = BASE.double().numpy() + reference_disjoint_merge(trimmed, WEIGHTS)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ties_global_densities_are_the_per_model_densities():
    ties = get("ties")()
    params = get("ties").Params.model_validate({})
    per_model = [get("ties").Params.model_validate(p) for p in PER_MODEL]
    assert ties.global_densities(params, per_model) == DENSITIES
    tensor_params = get("ties").Params.model_validate({"scope": "tensor"})
    assert ties.global_densities(tensor_params, per_model) is None
    assert params.density == 0.2 and params.lam == 1.0 and params.variant == "dis-mean"


def test_ties_keeps_every_entry_tied_at_the_threshold(run_method):
    base = torch.zeros(2, 5)
    delta = torch.tensor([[5.0, -3.0, 3.0, 0.5, 0.1], [3.0, 1.0, -0.2, 0.3, 0.0]])
    # k = floor(0.2 · 10) = 2 -> threshold 3: the 5 and all three entries of magnitude 3 survive
    out, x = run_method("ties", base, [delta], {"scope": "tensor", "density": 0.2})
    expected = torch.tensor([[5.0, -3.0, 3.0, 0, 0], [3.0, 0, 0, 0, 0]])
    torch.testing.assert_close(out, expected)
    assert x.report["kept_density"] == pytest.approx(0.4)
    stats = GlobalStats((3.0,), (0.0,), (0.0,), (4,), (10,))
    out_global, _ = run_method("ties", base, [delta], {}, stats=stats)
    torch.testing.assert_close(out_global, expected)


def test_ties_tensor_scope_keeps_at_least_one_entry_like_mergekit(run_method):
    base = torch.zeros(3)
    delta = torch.tensor([0.5, -2.0, 1.0])  # ⌊0.2 · 3⌋ = 0, but a positive density keeps the largest entry
    out, _ = run_method("ties", base, [delta], {"scope": "tensor", "density": 0.2})
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 0.0]))


def test_ties_normalize_is_an_alias_of_the_variant():
    params = get("ties").Params
    assert params.model_validate({"normalize": False}).variant == "dis-sum"
    assert params.model_validate({"normalize": True}).variant == "dis-mean"
    assert params.model_validate({"normalize": True, "variant": "dis-mean"}).variant == "dis-mean"
    with pytest.raises(ValidationError, match="contradicts"):
        params.model_validate({"normalize": False, "variant": "dis-mean"})
    with pytest.raises(ValidationError):
        params.model_validate({"density": 1.5})


def test_ties_identical_task_vectors_merge_back(run_method):
    delta = rand((5, 8), 7)
    out, _ = run_method("ties", BASE, [BASE + delta] * 3, {"scope": "tensor", "density": 1.0})
    torch.testing.assert_close(out - BASE, delta, rtol=1e-6, atol=1e-6)


def test_ties_zero_sign_rule(run_method):
    base = torch.zeros(1, 4)
    models = [torch.tensor([[1.0, -2.0, -3.0, 4.0]]), torch.tensor([[-1.0, -1.0, -1.0, 0.0]])]
    # coordinate 0 cancels exactly (Σ = 0); the tensor's majority elected sign is negative
    params = {"scope": "tensor", "density": 1.0}
    majority, _ = run_method("ties", base, models, params)
    positive, _ = run_method("ties", base, models, {**params, "zero_sign": "positive"})
    assert majority[0, 0] == -1.0 and positive[0, 0] == 1.0
    torch.testing.assert_close(majority[0, 1:], positive[0, 1:])


def test_ties_global_scope_is_chunk_invariant(run_method):
    stats, _ = fake_model_stats(DENSITIES)
    whole, _ = run_method("ties", BASE, MODELS, {}, PER_MODEL, stats=stats)
    parts = [run_method("ties", BASE, MODELS, {}, PER_MODEL, stats=stats, rows=r)[0] for r in [(0, 2), (2, 5)]]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


@pytest.mark.parametrize(
    "params", [{"scope": "tensor"}, {"sign_method": "count"}], ids=["tensor-scope", "count-majority"]
)
def test_ties_choices_needing_whole_tensors_refuse_chunks(run_method, params):
    stats, _ = fake_model_stats(DENSITIES)
    ties = get("ties")()
    assert ties.chunkable_for(get("ties").Params.model_validate(params)) is False
    assert ties.chunkable_for(get("ties").Params.model_validate({})) is True
    with pytest.raises(ConfigError, match="whole tensor"):
        run_method("ties", BASE, MODELS, params, PER_MODEL, stats=stats, rows=(0, 2))
    run_method("ties", BASE, MODELS, params, PER_MODEL, stats=stats)  # the whole tensor is fine


def test_ties_report_matches_brute_force(run_method):
    _, x = run_method("ties", BASE, MODELS, {"scope": "tensor"}, PER_MODEL)
    trimmed = [trim_np(d, brute_threshold(d, p)) for d, p in zip(deltas_np(), DENSITIES, strict=True)]
    kept = np.mean([np.count_nonzero(t) / t.size for t in trimmed])
    assert x.report["kept_density"] == pytest.approx(kept)
    weighted = [w * t for w, t in zip(WEIGHTS, trimmed, strict=True)]
    conflict = np.mean(
        [any(v[i] > 0 for v in weighted) and any(v[i] < 0 for v in weighted) for i in np.ndindex(BASE.shape)]
    )
    assert conflict > 0 and x.report["sign_conflict"] == pytest.approx(conflict)


# ----------------------------------------------------------------------------------------------------- DARE


def keep_masks(x) -> list[np.ndarray]:
    return [
        bernoulli_keep_mask(x.random_uniform(t), p.density).numpy() for t, p in enumerate(x.per_model)
    ]


def test_dare_keeps_about_density_of_the_entries(make_input):
    base = torch.zeros(100, 100)
    x = make_input("dare_linear", base, [base + 1.0, base - 1.0], {"density": 0.3})
    masks = keep_masks(x)
    for mask in masks:
        assert abs(mask.mean() - 0.3) < 0.02  # binomial sd ≈ 0.0046
    assert (masks[0] != masks[1]).mean() > 0.3  # independent streams per model


def test_dare_masks_are_deterministic_per_seed_method_tensor_and_model(make_input):
    def mask(seed: int = 0, name: str = "w", method: str = "dare_linear") -> np.ndarray:
        return keep_masks(make_input(method, BASE, MODELS[:1], {"density": 0.5}, seed=seed, name=name))[0]

    np.testing.assert_array_equal(mask(), mask())
    for other in (mask(seed=1), mask(name="v"), mask(method="dare_ties")):
        assert (mask() != other).any()


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", ["inverse", "none"])
def test_dare_is_chunk_invariant(run_method, name, rescale):
    params = {"rescale": rescale}
    whole, _ = run_method(name, BASE, MODELS, params, PER_MODEL, seed=3)
    parts = [run_method(name, BASE, MODELS, params, PER_MODEL, seed=3, rows=r)[0] for r in [(0, 3), (3, 5)]]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert get(name).chunkable and get(name).random


def test_dare_l1_rescale_needs_whole_tensors(run_method):
    dare = get("dare_linear")()
    assert dare.chunkable_for(get("dare_linear").Params.model_validate({"rescale": "l1"})) is False
    assert dare.chunkable_for(get("dare_linear").Params.model_validate({})) is True
    with pytest.raises(ConfigError, match="whole tensor"):
        run_method("dare_linear", BASE, MODELS, {"rescale": "l1"}, rows=(0, 2))


def test_dare_rescale_variants(make_input, run_method):
    delta = rand((5, 8), 9)
    x = make_input("dare_linear", BASE, [BASE + delta], {"density": 0.4})
    mask = torch.from_numpy(keep_masks(x)[0])
    kept = torch.where(mask, delta, 0.0)
    inverse, _ = run_method("dare_linear", BASE, [BASE + delta], {"density": 0.4})
    torch.testing.assert_close(inverse - BASE, kept / 0.4, rtol=1e-5, atol=1e-6)
    none, _ = run_method("dare_linear", BASE, [BASE + delta], {"density": 0.4, "rescale": "none"})
    torch.testing.assert_close(none - BASE, kept, rtol=1e-5, atol=1e-6)
    l1, _ = run_method("dare_linear", BASE, [BASE + delta], {"density": 0.4, "rescale": "l1"})
    got = (l1 - BASE).double()
    assert float(got.abs().sum()) == pytest.approx(float(delta.double().abs().sum()), rel=1e-5)
    torch.testing.assert_close(got != 0, mask)
    ratio = got[mask] / delta.double()[mask]
    assert float(ratio.std()) < 1e-5  # one scale factor for the whole tensor


def test_dare_accepts_mergekit_boolean_rescale():
    params = get("dare_ties").Params
    assert params.model_validate({"rescale": True}).rescale == "l1"
    assert params.model_validate({"rescale": False}).rescale == "none"
    assert params.model_validate({}).rescale == "inverse"
    with pytest.raises(ValidationError):
        params.model_validate({"density": 0.0})


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_matches_the_loop_reference(make_input, run_method, normalize):
    params = {"lambda": 0.9, "normalize": normalize}
    x = make_input("dare_linear", BASE, MODELS, params, PER_MODEL, seed=5)
    masks = keep_masks(x)
    out, report_x = run_method("dare_linear", BASE, MODELS, params, PER_MODEL, seed=5)
    expected = BASE.double().numpy().copy()
    scale = 0.9 / (sum(WEIGHTS) if normalize else 1.0)
    for idx in np.ndindex(BASE.shape):
        for w, d, m, p in zip(WEIGHTS, deltas_np(), masks, DENSITIES, strict=True):
            expected[idx] += scale * w * (d[idx] / p if m[idx] else 0.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert report_x.report["kept_density"] == pytest.approx(np.mean([m.mean() for m in masks]))


@pytest.mark.parametrize("variant", ["dis-mean", "dis-sum"])
def test_dare_ties_matches_the_loop_reference(make_input, run_method, reference_disjoint_merge, variant):
    params = {"variant": variant}
    masks = keep_masks(make_input("dare_ties", BASE, MODELS, params, PER_MODEL, seed=2))
    out, _ = run_method("dare_ties", BASE, MODELS, params, PER_MODEL, seed=2)
    dropped = [np.where(m, d / p, 0.0) for d, m, p in zip(deltas_np(), masks, DENSITIES, strict=True)]
    expected = BASE.double().numpy() + reference_disjoint_merge(dropped, WEIGHTS, variant)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ mergekit peers


def mergekit_merge(name: str, parameters: dict) -> torch.Tensor:
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    group = TensorGroup.from_tensors([BASE, *MODELS], base_index=0)
    per_model = {
        "weight": {i + 1: w for i, w in enumerate(WEIGHTS)},
        "density": {i + 1: d for i, d in enumerate(DENSITIES)},
    }
    (out,) = mk_get(name)([group], parameters={**per_model, **parameters})
    return out


@pytest.mark.peers
@pytest.mark.parametrize("sign_method", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_tensor_scope_matches_mergekit(run_method, sign_method, normalize):
    """mergekit trims per tensor, weights after the trim, elects on the weighted sum, breaks 0 to +1 and divides
    by Σ m_t w_t: our scope=tensor, zero_sign=positive is the same computation."""
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod

    if sign_method == "sum":
        theirs = mergekit_merge("ties", {"normalize": normalize, "lambda": 0.7})
    else:  # mergekit registers no count variant: build the configured instance
        from mergekit.merge_methods.base import TensorGroup

        count_ties = GeneralizedTaskArithmeticMerge(
            ConsensusMethod.count, SparsificationMethod.magnitude, True, False, "ties_count", None, None
        )
        group = TensorGroup.from_tensors([BASE, *MODELS], base_index=0)
        weights = {i + 1: w for i, w in enumerate(WEIGHTS)}
        densities = {i + 1: d for i, d in enumerate(DENSITIES)}
        params = {"weight": weights, "density": densities, "normalize": normalize, "lambda": 0.7}
        (theirs,) = count_ties([group], parameters=params)
    params = {"scope": "tensor", "normalize": normalize, "lambda": 0.7, "sign_method": sign_method}
    ours, _ = run_method("ties", BASE, MODELS, {**params, "zero_sign": "positive"}, PER_MODEL)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.peers
@pytest.mark.parametrize(
    ("name", "normalize"), [("dare_ties", False), ("dare_ties", True), ("dare_linear", False)]
)
def test_dare_l1_matches_mergekit_given_the_same_masks(make_input, run_method, monkeypatch, name, normalize):
    """mergekit draws ``torch.bernoulli(density)`` per model in order; we hand it our masks instead."""
    masks = keep_masks(make_input(name, BASE, MODELS, {}, PER_MODEL, seed=4))
    queue = [torch.from_numpy(m).to(torch.float32) for m in masks]

    def fake_bernoulli(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = queue.pop(0)
        assert torch.all(probs == probs.reshape(-1)[0]) and mask.shape == probs.shape
        return mask

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    theirs = mergekit_merge(name, {"normalize": normalize, "rescale": True})
    assert not queue
    params = {"rescale": True, "normalize": normalize}
    if name == "dare_ties":
        params["zero_sign"] = "positive"
    ours, _ = run_method(name, BASE, MODELS, params, PER_MODEL, seed=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
