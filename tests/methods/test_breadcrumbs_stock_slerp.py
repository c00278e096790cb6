"""Model Breadcrumbs, Model Stock and SLERP against direct formulas, plus mergekit equality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neuromerge.methods import get
from neuromerge.tensors.sparsify import outlier_mask


def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


BASE = rand((6, 10), 0)
MODELS = [BASE + rand((6, 10), 1 + i) for i in range(3)]
WEIGHTS = [1.0, 0.5, 2.0]
DENSITIES = [0.5, 0.3, 0.9]
GAMMAS = [0.05, 0.1, 0.2]  # the last model has density + gamma > 1
PER_MODEL = [
    {"weight": w, "density": d, "gamma": g} for w, d, g in zip(WEIGHTS, DENSITIES, GAMMAS, strict=True)
]


def mask_by_ranks(values: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Direct statement of the Breadcrumbs mask: sort the magnitudes, drop the smallest n − k − ⌊γn⌋ (at least
    0) and keep the next k = ⌊density·n⌋; equal magnitudes ordered by position."""
    flat = np.abs(values).ravel()
    n = flat.size
    k, n_top = math.floor(density * n + 1e-9), math.floor(gamma * n + 1e-9)
    n_bot = max(0, n - k - n_top)
    ranked = sorted(range(n), key=lambda i: (flat[i], i))
    keep = np.zeros(n, dtype=bool)
    keep[ranked[n_bot : n_bot + k]] = True
    return keep.reshape(values.shape)


# ------------------------------------------------------------------------------------------------ Breadcrumbs


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.2), (0.15, 0.01), (1.0, 0.3), (0.3, 0.0)])
def test_outlier_mask_matches_the_rank_statement(density, gamma):
    x = rand((6, 10), 3)
    mask = outlier_mask(x, density, gamma)
    np.testing.assert_array_equal(mask.numpy(), mask_by_ranks(x.numpy(), density, gamma))
    assert int(mask.sum()) == math.floor(density * 60 + 1e-9)


def test_outlier_mask_drops_the_largest_and_the_smallest():
    x = torch.arange(1.0, 21.0) * torch.tensor([1.0, -1.0] * 10)  # magnitudes 1..20
    mask = outlier_mask(x, density=0.5, gamma=0.1)  # keep 10, drop the 2 largest and the 8 smallest
    assert torch.equal(mask.nonzero().flatten(), torch.arange(8, 18))


def test_outlier_mask_breaks_magnitude_ties_by_position():
    x = torch.tensor([2.0, -1.0, 1.0, 1.0, -1.0, 3.0])
    mask = outlier_mask(x, density=0.5, gamma=0.0)  # keep 3 of 6: the 3 largest by (|x|, position)
    assert mask.tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_matches_the_direct_formula(run_method, normalize):
    out, x = run_method("breadcrumbs", BASE, MODELS, {"lambda": 0.6, "normalize": normalize}, PER_MODEL)
    expected = BASE.double().numpy().copy()
    scale = 0.6 / (sum(WEIGHTS) if normalize else 1.0)
    kept = []
    for m, w, d, g in zip(MODELS, WEIGHTS, DENSITIES, GAMMAS, strict=True):
        delta = (m - BASE).double().numpy()
        mask = mask_by_ranks(delta, d, g)
        kept.append(mask.mean())
        expected += scale * w * np.where(mask, delta, 0.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert x.report["kept_density"] == pytest.approx(np.mean(kept))


@pytest.mark.parametrize("variant", ["dis-mean", "dis-sum"])
def test_breadcrumbs_ties_matches_the_direct_formula(run_method, reference_disjoint_merge, variant):
    out, _ = run_method("breadcrumbs_ties", BASE, MODELS, {"variant": variant}, PER_MODEL)
    masked = []
    for m, d, g in zip(MODELS, DENSITIES, GAMMAS, strict=True):
        delta = (m - BASE).double().numpy()
        masked.append(np.where(mask_by_ranks(delta, d, g), delta, 0.0))
    expected = BASE.double().numpy() + reference_disjoint_merge(masked, WEIGHTS, variant)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_defaults_and_contract():
    params = get("breadcrumbs").Params.model_validate({})
    assert (params.density, params.gamma, params.lam, params.normalize) == (0.15, 0.01, 0.3, False)
    ties_params = get("breadcrumbs_ties").Params.model_validate({})
    assert (ties_params.lam, ties_params.variant) == (1.0, "dis-mean")
    assert not get("breadcrumbs").chunkable and not get("breadcrumbs_ties").chunkable
    with pytest.raises(ValidationError):
        get("breadcrumbs").Params.model_validate({"gamma": 1.0})


@pytest.mark.peers
@pytest.mark.parametrize(("name", "normalize"), [("breadcrumbs", False), ("breadcrumbs_ties", False),
                                                  ("breadcrumbs_ties", True)])
def test_breadcrumbs_matches_mergekit(run_method, name, normalize):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    group = TensorGroup.from_tensors([BASE, *MODELS], base_index=0)
    per_model = {key: {i + 1: p[key] for i, p in enumerate(PER_MODEL)} for key in ("weight", "density", "gamma")}
    (theirs,) = mk_get(name)([group], parameters={**per_model, "lambda": 0.8, "normalize": normalize})
    params: dict = {"lambda": 0.8, "normalize": normalize}
    if name == "breadcrumbs_ties":
        params["zero_sign"] = "positive"
    ours, _ = run_method(name, BASE, MODELS, params, PER_MODEL)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ Model Stock


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_model_stock_two_models_matches_the_formula(run_method):
    out, _ = run_method("model_stock", BASE, MODELS[:2], {})
    d0, d1 = ((m - BASE).double().numpy().ravel() for m in MODELS[:2])
    cos = cosine(d0, d1)
    t = 2 * cos / (1 + cos)
    mean = (MODELS[0] + MODELS[1]).double().numpy() / 2
    np.testing.assert_allclose(out.numpy(), t * mean + (1 - t) * BASE.double().numpy(), rtol=1e-5, atol=1e-6)


def test_model_stock_three_models_uses_the_mean_pairwise_cosine(run_method):
    shared = rand((6, 10), 20)
    models = [BASE + shared + 0.7 * rand((6, 10), 21 + i) for i in range(3)]  # positively correlated
    out, _ = run_method("model_stock", BASE, models, {})
    deltas = [(m - BASE).double().numpy().ravel() for m in models]
    cos = np.mean([cosine(deltas[i], deltas[j]) for i in range(3) for j in range(i + 1, 3)])
    t = 3 * cos / (1 + 2 * cos)
    assert 0.3 < t < 1
    mean = sum(m.double().numpy() for m in models) / 3
    np.testing.assert_allclose(out.numpy(), t * mean + (1 - t) * BASE.double().numpy(), rtol=1e-5, atol=1e-6)


def test_model_stock_filter_wise_uses_one_ratio_per_row(run_method):
    out, _ = run_method("model_stock", BASE, MODELS[:2], {"filter_wise": True})
    for r in range(BASE.shape[0]):
        d0, d1 = ((m[r] - BASE[r]).double().numpy() for m in MODELS[:2])
        cos = cosine(d0, d1)
        t = 2 * cos / (1 + cos)
        expected = t * (MODELS[0][r] + MODELS[1][r]).double().numpy() / 2 + (1 - t) * BASE[r].double().numpy()
        np.testing.assert_allclose(out[r].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_model_stock_opposite_task_vectors_keep_the_base(run_method):
    delta = rand((6, 10), 30)
    out, _ = run_method("model_stock", BASE, [BASE + delta, BASE - delta], {})  # cos = −1 -> 1 + cos = 0
    torch.testing.assert_close(out, BASE)


def test_model_stock_contract():
    cls = get("model_stock")
    assert cls.min_models == 2 and not cls.chunkable
    with pytest.raises(ValidationError, match="weight"):
        cls.Params.model_validate({"weight": 2.0})


@pytest.mark.peers
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(run_method, filter_wise):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    for models in (MODELS[:2], MODELS):
        group = TensorGroup.from_tensors([BASE, *models], base_index=0)
        (theirs,) = mk_get("model_stock")([group], parameters={"filter_wise": filter_wise})
        ours, _ = run_method("model_stock", BASE, models, {"filter_wise": filter_wise})
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ SLERP


def test_slerp_endpoints_are_the_two_models(run_method):
    a, b = MODELS[:2]
    start, _ = run_method("slerp", BASE, [a, b], {"t": 0.0})
    end, _ = run_method("slerp", BASE, [a, b], {"t": 1.0})
    torch.testing.assert_close(start, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(end, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_slerp_matches_the_spherical_formula(run_method, t):
    a, b = (m.double().numpy() for m in MODELS[:2])
    omega = math.acos(cosine(a.ravel(), b.ravel()))
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    out, _ = run_method("slerp", BASE, MODELS[:2], {"t": t})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_slerp_falls_back_to_lerp_for_parallel_vectors(run_method, factor):
    a = MODELS[0]
    b = factor * a + 1e-4 * rand((6, 10), 40)  # |cos Ω| > 0.9995
    out, _ = run_method("slerp", BASE, [a, b], {"t": 0.3})
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-6)


def test_slerp_contract():
    cls = get("slerp")
    assert (cls.min_models, cls.max_models, cls.chunkable) == (2, 2, False)
    assert cls.Params.model_validate({}).t == 0.5
    with pytest.raises(ValidationError):
        cls.Params.model_validate({"t": 1.5})


@pytest.mark.peers
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(run_method, t):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    pairs = [(BASE, MODELS[0]), (MODELS[0], 2.0 * MODELS[0]), (torch.zeros(6, 10), MODELS[1])]
    for a, b in pairs:
        group = TensorGroup.from_tensors([a, b], base_index=0)
        (theirs,) = mk_get("slerp")([group], parameters={"t": t})
        ours, _ = run_method("slerp", a, [a, b], {"t": t})
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
