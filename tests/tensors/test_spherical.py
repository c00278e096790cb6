"""``tensors/spherical.py``: NuSLERP, Multi-SLERP and the Karcher mean against float64 statements of their formulas
(numpy) and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuromerge.tensors.spherical import karcher_mean, multislerp, nuslerp


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def slerp_np(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    om = math.acos(cos)
    if om == 0:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


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


def test_multislerp_of_unchanged_tensors_is_the_base() -> None:
    """Task vectors that are all zero (a tensor no expert changes) merge to zero, so the output is the base; three
    zero vectors with one non-zero still raise nothing and give a finite result."""
    from neuromerge.functional import merge_state_dicts

    base = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    experts = [{"w": base["w"].clone()} for _ in range(3)]
    out = merge_state_dicts("multislerp", base, experts)
    assert torch.equal(out["w"], base["w"])
    zeros = [torch.zeros(5) for _ in range(3)]
    assert torch.equal(multislerp(zeros, [1.0, 1.0, 1.0]), torch.zeros(5))
