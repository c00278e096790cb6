"""TSV-Merge, PCB and Consensus (TALL masks) against independent numpy references and properties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from neuromerge.methods import MergeInput, get
from neuromerge.methods.pcb import pcb_merge, pcb_scores
from neuromerge.methods.tsv import tsv_merge_matrix


def make_x(method: str, base: torch.Tensor, models: list[torch.Tensor], params: dict[str, Any],
           rows: tuple[int, int] | None = None) -> MergeInput:
    cls = get(method)
    a, b = rows if rows is not None else (0, base.shape[0])
    return MergeInput(
        name="w", kind="neuronal" if base.dim() == 2 else "point", base=base[a:b].clone(),
        models=[m[a:b].clone() for m in models], params=cls.Params.model_validate(params),
        per_model=[cls.Params.model_validate(params) for _ in models], rows=(a, b), full_shape=tuple(base.shape),
    )


def run(method: str, base: torch.Tensor, models: list[torch.Tensor], params: dict[str, Any],
        rows: tuple[int, int] | None = None) -> torch.Tensor:
    return get(method)().merge(make_x(method, base, models, params, rows))


def experts(seed: int, t: int, shape: tuple[int, ...], scale: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + scale * torch.randn(shape, generator=gen) for _ in range(t)]


# ------------------------------------------------------------------------------------------------------- TSV


def ref_tsv(taus: list[np.ndarray]) -> np.ndarray:
    """TSV with explicit column placement and Procrustes by numpy SVD (float64)."""
    t = len(taus)
    rows, cols = taus[0].shape
    k = min(rows, cols) // t
    u_cat, s_cat, v_cat = np.zeros((rows, t * k)), np.zeros(t * k), np.zeros((cols, t * k))
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        for j in range(k):
            u_cat[:, i * k + j], s_cat[i * k + j], v_cat[:, i * k + j] = u[:, j], s[j], vh[j]

    def polar(a: np.ndarray) -> np.ndarray:
        p, _, qh = np.linalg.svd(a, full_matrices=False)
        return p @ qh

    return polar(u_cat) @ np.diag(s_cat) @ polar(v_cat).T


@pytest.mark.parametrize(("shape", "t"), [((7, 10), 3), ((12, 9), 2), ((6, 6), 4)])
def test_tsv_matches_numpy_reference(shape: tuple[int, int], t: int) -> None:
    base, models = experts(10, t, shape)
    expected = base.double().numpy() + 0.7 * ref_tsv([(m - base).double().numpy() for m in models])
    got = run("tsv", base, models, {"lambda": 0.7})
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_tsv_single_task_is_identity_and_point_tensors_are_averaged() -> None:
    base, models = experts(11, 1, (9, 5))
    torch.testing.assert_close(run("tsv", base, models, {}), models[0], rtol=1e-5, atol=1e-5)
    base1, models1 = experts(12, 3, (8,))
    expected = base1 + 0.5 * torch.stack([m - base1 for m in models1]).mean(0)
    torch.testing.assert_close(run("tsv", base1, models1, {"lambda": 0.5}), expected)


def test_tsv_rank_below_task_count_gives_no_update() -> None:
    base, models = experts(13, 4, (3, 20))
    assert float(tsv_merge_matrix(torch.stack([m - base for m in models])).abs().max()) == 0.0
    torch.testing.assert_close(run("tsv", base, models, {}), base)


# ------------------------------------------------------------------------------------------------------- PCB


def ref_pcb(tau: np.ndarray, ratio: float, clip: float) -> np.ndarray:
    """PCB-Merging (official ``PCB_merge``) on a T × d array with full sorts and explicit index arithmetic."""
    t, d = tau.shape

    def clamp_rows(x: np.ndarray, lo_ratio: float, hi_ratio: float) -> np.ndarray:
        srt = np.sort(x, axis=1)
        lo = srt[:, int(d * lo_ratio)][:, None]
        hi = srt[:, int(d * (1 - hi_ratio) - 1)][:, None]
        return np.minimum(np.maximum(x, lo), hi)

    def norm_rows(x: np.ndarray) -> np.ndarray:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        return (x - lo) / (hi - lo)

    mag = clamp_rows(np.abs(tau), clip, clip)
    score = np.exp(t * norm_rows(mag) ** 2) * np.tanh(tau * tau.sum(axis=0))
    weight = norm_rows(clamp_rows(score, 1 - ratio, 0))
    return (np.sign(tau) * mag * weight).sum(axis=0) / np.maximum(weight.sum(axis=0), 1e-12)


@pytest.mark.parametrize(("t", "d", "ratio", "clip"), [(3, 200, 0.1, 1e-4), (4, 50, 0.3, 0.02), (2, 31, 1.0, 0.0)])
def test_pcb_matches_numpy_reference(t: int, d: int, ratio: float, clip: float) -> None:
    gen = torch.Generator().manual_seed(20 + t)
    tau = torch.randn(t, d, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(pcb_merge(tau, ratio, clip).numpy(), ref_pcb(tau.numpy(), ratio, clip), rtol=1e-10)


def test_pcb_method_is_per_tensor_pcb() -> None:
    base, models = experts(21, 3, (6, 11))
    tau = torch.stack([(m - base).reshape(-1) for m in models]).double()
    expected = base.double().numpy() + 0.8 * ref_pcb(tau.numpy(), 0.2, 1e-4).reshape(6, 11)
    got = run("pcb", base, models, {"density": 0.2, "lambda": 0.8})
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pcb_constant_task_gets_zero_weight_instead_of_nan() -> None:
    tau = torch.randn(3, 40, generator=torch.Generator().manual_seed(22))
    tau[1] = 0.0  # a task that did not change this tensor
    _, weights = pcb_scores(tau, 0.1, 1e-4)
    assert bool(torch.isfinite(weights).all())
    assert float(weights[1].abs().max()) == 0.0 and float(weights[0].max()) == 1.0


# ------------------------------------------------------------------------------------------------ Consensus


def ref_consensus(base: np.ndarray, taus: list[np.ndarray], lam: float, tall: float, k: int) -> np.ndarray:
    """Consensus merging entry by entry: count the tasks whose TALL mask selects the entry."""
    multi = sum(taus)
    out = base.copy().ravel()
    flat_multi = multi.ravel()
    for i in range(out.size):
        used = sum(1 for tau in taus if abs(tau.ravel()[i]) > tall * abs(flat_multi[i] - tau.ravel()[i]))
        if used >= k:
            out[i] += lam * flat_multi[i]
    return out.reshape(base.shape)


@pytest.mark.parametrize(("tall", "k"), [(0.6, 2), (0.3, 1), (1.0, 3), (0.6, 0)])
def test_consensus_matches_loop_reference(tall: float, k: int) -> None:
    base, models = experts(30, 4, (5, 8))
    expected = ref_consensus(base.double().numpy(), [(m - base).double().numpy() for m in models], 0.4, tall, k)
    got = run("consensus", base, models, {"lambda": 0.4, "tall_lambda": tall, "k": k})
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_consensus_limits_and_chunks() -> None:
    base, models = experts(31, 3, (10, 4))
    multi = torch.stack([m - base for m in models]).sum(0)
    torch.testing.assert_close(run("consensus", base, models, {"k": 0}), base + 0.3 * multi)  # k=0: TA
    torch.testing.assert_close(run("consensus", base, models, {"k": 4}), base)  # k > T: zero-shot
    whole = run("consensus", base, models, {})
    parts = torch.cat([run("consensus", base, models, {}, rows=r) for r in ((0, 3), (3, 10))])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
