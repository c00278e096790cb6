"""NuSLERP, Multi-SLERP, Karcher, SCE, RAM / RAM+, DELLA (MAGPRUNE) and Arcee Fusion against direct float64
statements of their formulas on small tensors (numpy loops, independent of the library), plus properties; the methods'
wiring (task vectors vs weights, per-model parameters, chunking) through ``run_method``. mergekit equality: see
``tests/peers/test_mergekit_methods.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neuromerge.errors import NeuromergeError
from neuromerge.methods import get
from neuromerge.tensors.fusion import arcee_fusion
from neuromerge.tensors.magprune import magprune, magprune_keep_probabilities
from neuromerge.tensors.ram import ram_merge_deltas, ramplus_merge_deltas
from neuromerge.tensors.sce import sce_merge_deltas
from neuromerge.tensors.spherical import karcher_mean, multislerp, nuslerp


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def slerp_np(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    om = math.acos(cos)
    if om == 0:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


# ------------------------------------------------------------------------------------------------ NuSLERP
@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp_matches_slerp_per_vector(mode: str) -> None:
    a, b, t = rand((4, 6), 1), rand((4, 6), 2), 0.3
    got = nuslerp(t, a, b, dim=0 if mode == "columns" else -1, flatten=mode == "flatten").numpy()
    A, B = a.numpy(), b.numpy()
    if mode == "flatten":
        want = slerp_np(t, A.ravel(), B.ravel()).reshape(A.shape)
    elif mode == "rows":
        want = np.stack([slerp_np(t, A[i], B[i]) for i in range(4)])
    else:
        want = np.stack([slerp_np(t, A[:, j], B[:, j]) for j in range(6)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_nuslerp_colinear_is_linear_and_endpoints_are_inputs() -> None:
    a = rand((3, 5), 3)
    torch.testing.assert_close(nuslerp(0.25, a, 2 * a, flatten=True), 0.75 * a + 0.5 * a)
    b = rand((3, 5), 4)
    torch.testing.assert_close(nuslerp(0.0, a, b, flatten=True), a)
    torch.testing.assert_close(nuslerp(1.0, a, b, flatten=True), b)


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_method_uses_task_vectors_with_a_base(run_method, with_base: bool) -> None:
    base, m0, m1 = rand((4, 6), 5), rand((4, 6), 6), rand((4, 6), 7)
    x_out, x = run_method("nuslerp", base, [m0, m1], {}, [{"weight": 1.0}, {"weight": 3.0}])
    if not with_base:  # the engine's input without base_model (x.base is then the first model's, and unused)
        x.base_given = False
        x_out = get("nuslerp")().merge(x)
    t = 3.0 / 4.0
    B, A0, A1 = base.numpy(), m0.numpy(), m1.numpy()
    want = (B + slerp_np(t, (A0 - B).ravel(), (A1 - B).ravel()).reshape(B.shape) if with_base
            else slerp_np(t, A0.ravel(), A1.ravel()).reshape(B.shape))
    np.testing.assert_allclose(x_out.numpy(), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- Multi-SLERP
def multislerp_np(xs: list[np.ndarray], w: list[float], eps: float = 1e-8) -> np.ndarray:
    w = np.asarray(w) / sum(w)
    flat = [x.ravel() for x in xs]
    norms = [np.linalg.norm(f) for f in flat]
    units = [f / (n + eps) for f, n in zip(flat, norms, strict=True)]
    mu = sum(wi * u for wi, u in zip(w, units, strict=True))
    mu = mu / np.linalg.norm(mu)
    v = sum(wi * (u - (u @ mu) * mu) for wi, u in zip(w, units, strict=True))
    nv = np.linalg.norm(v) + eps
    out = (math.cos(nv) * mu + math.sin(nv) / nv * v) * sum(wi * n for wi, n in zip(w, norms, strict=True))
    return out.reshape(xs[0].shape)


def test_multislerp_matches_the_formula() -> None:
    xs, w = [rand((3, 4), 10 + i) for i in range(3)], [0.2, 0.5, 1.3]
    got = multislerp(xs, w).numpy()
    np.testing.assert_allclose(got, multislerp_np([x.numpy() for x in xs], w), rtol=1e-12, atol=1e-12)


def test_multislerp_properties() -> None:
    x = rand((3, 4), 20)
    torch.testing.assert_close(multislerp([x, x, x], [1.0, 2.0, 3.0]), x)  # equal inputs: the input itself
    assert multislerp([x], [5.0]) is x
    # two antipodal inputs whose weights cancel: linear fallback; three: an error
    torch.testing.assert_close(multislerp([x, -x], [1.0, 1.0]), torch.zeros_like(x))
    with pytest.raises(ValueError, match="weighted sum"):
        multislerp([x, -x, x, -x], [1.0, 1.0, 1.0, 1.0])


def test_multislerp_method_error_names_the_tensor(run_method) -> None:
    x = rand((3, 4), 21)
    base = torch.zeros_like(x)
    with pytest.raises(NeuromergeError, match=r"^w: multislerp"):
        run_method("multislerp", base, [x, -x, x, -x], {}, [{"weight": 1.0}] * 4)


# ------------------------------------------------------------------------------------------------- Karcher
def test_karcher_mean_is_a_critical_point_of_the_weighted_distance() -> None:
    """At the Karcher mean μ the weighted sum of the log maps vanishes, Σ α_i θ_i/sin θ_i (u_i − cos θ_i μ) = 0, and
    μ is scaled by Σ α_i ‖x_i‖ (checked in float64, independent of the iteration)."""
    xs = [rand((4, 5), 30 + i) + 1.0 for i in range(3)]
    alphas = [0.2, 0.3, 0.5]
    out = karcher_mean(xs, alphas, max_iter=200, tol=1e-12).numpy().ravel()
    scale = sum(a * np.linalg.norm(x.numpy()) for a, x in zip(alphas, xs, strict=True))
    assert np.linalg.norm(out) == pytest.approx(scale, rel=1e-12)
    mu = out / np.linalg.norm(out)
    grad = np.zeros_like(mu)
    for a, x in zip(alphas, xs, strict=True):
        u = x.numpy().ravel() / np.linalg.norm(x.numpy())
        c = float(np.clip(u @ mu, -1, 1))
        th = math.acos(c)
        grad += a * th / math.sin(th) * (u - c * mu)
    assert np.linalg.norm(grad) < 1e-10


def test_karcher_of_two_is_the_geodesic_midpoint() -> None:
    a, b = rand((6,), 40), rand((6,), 41)
    out = karcher_mean([a, b], [0.5, 0.5]).numpy()
    ua, ub = a.numpy() / np.linalg.norm(a.numpy()), b.numpy() / np.linalg.norm(b.numpy())
    mid = slerp_np(0.5, ua, ub)
    np.testing.assert_allclose(out, mid * (np.linalg.norm(a.numpy()) + np.linalg.norm(b.numpy())) / 2, rtol=1e-12)


def test_karcher_method_averages_the_listed_models(run_method) -> None:
    base = rand((3, 4), 42)
    ms = [base + rand((3, 4), 43 + i) for i in range(3)]
    out, _ = run_method("karcher", base, ms, {"max_iter": 50, "tol": 1e-7})
    want = karcher_mean(ms, [1 / 3] * 3, max_iter=50, tol=1e-7)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- SCE
def sce_np(taus: np.ndarray, topk: float) -> np.ndarray:
    T = taus.shape[0]
    flat = taus.reshape(T, -1).copy()
    if topk < 1:
        var = flat.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(flat.shape[1], dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        flat = flat * keep
    energy = (flat**2).mean(axis=1)
    w = energy / energy.sum() if abs(energy.sum()) >= 1e-6 else np.full(T, 1 / T)
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        g = 1.0 if flat[:, j].sum() >= 0 else -1.0
        agree = [t for t in range(T) if flat[t, j] != 0 and np.sign(flat[t, j]) == g]
        num = sum(w[t] * flat[t, j] for t in agree)
        out[j] = num / max(sum(w[t] for t in agree), 1e-6)
    return out.reshape(taus.shape[1:])


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_the_formula(topk: float) -> None:
    taus = torch.stack([rand((5, 6), 50 + i) for i in range(3)])
    np.testing.assert_allclose(sce_merge_deltas(taus, topk).numpy(), sce_np(taus.numpy(), topk), rtol=1e-12,
                               atol=1e-14)


def test_sce_tiny_task_vectors_get_uniform_weights() -> None:
    """mergekit's absolute guard: Σ mean(τ²) < 1e-6 gives weights 1/T (then the erase-and-mean is unweighted)."""
    taus = torch.stack([rand((4, 4), 55 + i) * 1e-4 for i in range(2)])
    np.testing.assert_allclose(sce_merge_deltas(taus).numpy(), sce_np(taus.numpy(), 1.0), rtol=1e-12, atol=1e-18)


# ----------------------------------------------------------------------------------------------------- RAM
def sparse_taus(seed: int, shape: tuple[int, ...] = (6, 7), T: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.5)
            for _ in range(T)]


def test_ram_matches_the_formula() -> None:
    taus, eps = sparse_taus(60), 1e-5
    arr = np.stack([t.numpy() for t in taus])
    want = np.zeros(arr.shape[1:])
    for c in np.ndindex(arr.shape[1:]):
        vals = [v for v in arr[(slice(None), *c)] if abs(v) > eps]
        want[c] = sum(vals) / len(vals) if vals else 0.0
    np.testing.assert_allclose(ram_merge_deltas(taus, eps).numpy(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("r", "alpha"), [(0.1, 0.2), (0.5, 5.0)])
def test_ramplus_matches_the_formula(r: float, alpha: float) -> None:
    taus, eps = sparse_taus(61), 1e-5
    arr = np.stack([t.numpy() for t in taus])
    nz = np.abs(arr) > eps
    count = nz.sum(axis=0)
    lam = []
    for t in range(arr.shape[0]):
        shared, unique = int((nz[t] & (count > 1)).sum()), int((nz[t] & (count == 1)).sum())
        lam.append(1 + r * min(max(shared / max(unique, eps), 0), alpha))
    want = np.zeros(arr.shape[1:])
    for c in np.ndindex(arr.shape[1:]):
        for t in range(arr.shape[0]):
            if nz[(t, *c)]:
                want[c] += arr[(t, *c)] * lam[t] if count[c] == 1 else arr[(t, *c)] / count[c]
    np.testing.assert_allclose(ramplus_merge_deltas(taus, eps, r, alpha).numpy(), want, rtol=1e-12, atol=0)
    assert max(lam) > 1  # the amplification is exercised


def test_ram_method_is_chunk_invariant(run_method) -> None:
    base = rand((8, 5), 62)
    models = [base + t for t in sparse_taus(63, (8, 5))]
    whole, _ = run_method("ram", base, models, {})
    parts = [run_method("ram", base, models, {}, rows=(a, b))[0] for a, b in ((0, 3), (3, 8))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- DELLA / MAGPRUNE
def test_magprune_probabilities_follow_the_row_ranks() -> None:
    x = rand((3, 5), 70)
    p = magprune_keep_probabilities(x, 0.5, 0.2).numpy()
    for i, row in enumerate(np.abs(x.numpy())):
        ranks = np.argsort(np.argsort(row, kind="stable"), kind="stable")  # 0 = smallest
        np.testing.assert_allclose(p[i], 0.3 + 0.4 * ranks / 4, rtol=0, atol=1e-7)
        assert p[i].mean() == pytest.approx(0.5, abs=1e-7)
    one_d = magprune_keep_probabilities(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.1).numpy()
    np.testing.assert_allclose(one_d, [0.6, 0.4, 0.5], atol=1e-7)


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
def test_magprune_matches_the_formula(rescale: str) -> None:
    x, u = rand((4, 6), 71), torch.rand((4, 6), generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    got = magprune(x, u, 0.5, 0.15, rescale).numpy()
    X = x.numpy()
    p = np.empty_like(X)
    for i, row in enumerate(np.abs(X)):
        p[i] = 0.35 + 0.3 * np.argsort(np.argsort(row, kind="stable"), kind="stable") / 5
    kept = np.where(u.numpy() < p, X, 0.0)
    want = {"l1": kept * np.abs(X).sum() / np.abs(kept).sum(), "inverse": kept / p, "none": kept}[rescale]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert 0 < np.count_nonzero(kept) < X.size


def test_della_inverse_rescale_is_unbiased_and_chunk_invariant(run_method) -> None:
    """``rescale: inverse`` (the paper's 1/p_i) is chunkable: row chunks give the same draws and ranks; averaged over
    many seeds, θ − θ0 estimates τ."""
    base = rand((8, 40), 73)
    model = base + rand((8, 40), 74)
    params = {"density": 0.5, "epsilon": 0.2, "rescale": "inverse", "lambda": 1.0}
    whole, _ = run_method("della_linear", base, [model], params)
    parts = [run_method("della_linear", base, [model], params, rows=r)[0] for r in ((0, 5), (5, 8))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    mean = sum(run_method("della_linear", base, [model], params, seed=s)[0].double() for s in range(200)) / 200
    tau = (model - base).double()
    # per entry the estimate has variance τ²(1 − p)/p / 200 <= τ² · 2.33/200: check the mean error over entries
    assert float(((mean - base.double() - tau).abs() / tau.abs()).mean()) < 0.1


def test_della_ties_combine_matches_the_disjoint_reference(run_method, reference_disjoint_merge) -> None:
    base = rand((4, 6), 75)
    models = [base + rand((4, 6), 76 + i) for i in range(3)]
    weights = [0.5, 1.0, 1.5]
    per_model = [{"weight": w, "density": 0.5, "epsilon": 0.1} for w in weights]
    out, x = run_method("della", base, models, {"rescale": False}, per_model)
    taus = []
    for t, m in enumerate(models):
        d = (m - base).double()
        u = x.random_uniform(t).double()
        taus.append(np.where(u.numpy() < magprune_keep_probabilities(d, 0.5, 0.1).numpy(), d.numpy(), 0.0))
    want = base.double().numpy() + reference_disjoint_merge(taus, weights, zero_sign="positive")
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_della_rescale_l1_is_refused_on_a_row_chunk(run_method) -> None:
    base = rand((8, 5), 77)
    with pytest.raises(NeuromergeError, match="needs the whole tensor"):
        run_method("della", base, [base + 1], {"density": 0.5}, rows=(0, 4))


# --------------------------------------------------------------------------------------------- Arcee Fusion
def test_arcee_fusion_matches_the_formula() -> None:
    base, model = rand((10, 8), 80), rand((10, 8), 81) * 0.2
    model = base + model
    B, M = base.numpy(), model.numpy()

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(M) + 1e-8, softmax(B) + 1e-8
    imp = np.abs(M - B) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(imp.ravel())
    n = s.size
    q1, q2, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    want = np.where(imp >= q2 + 1.5 * (q3 - q1), M, B)
    got = arcee_fusion(base, model).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert 0 < np.count_nonzero(got != B) < n // 2


@pytest.mark.parametrize("name", ["sce", "karcher", "ram", "ramplus_tl", "arcee_fusion"])
def test_methods_without_weights_refuse_a_weight(name: str) -> None:
    with pytest.raises(ValidationError, match="does not use per-model weights"):
        get(name).Params.model_validate({"weight": 2.0})
    assert get(name).Params.model_validate({"weight": 1.0}).weight == 1.0
