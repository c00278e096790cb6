"""``tensors/sce.py``: SCE's select mask, model weights and merge against a float64 loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.sce import sce_merge_deltas, sce_select_mask, sce_weights
from tests.tensors.strategies import FAST, stacks


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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


@FAST
@given(stacks(max_t=4, max_n=12), st.sampled_from([0.0, 0.25, 0.5, 0.99, 1.0]))
def test_sce_select_mask_keeps_the_largest_variances(taus, topk) -> None:
    mask = sce_select_mask(taus, topk)
    assert mask.shape == taus.shape[1:] and mask.dtype == torch.bool
    var = taus.var(dim=0, unbiased=False)
    k = taus.shape[1] if topk >= 1 else int(int((var != 0).sum()) * topk)
    assert int(mask.sum()) == k
    if 0 < k < taus.shape[1]:
        assert float(var[mask].min()) >= float(var[~mask].max())


@FAST
@given(stacks(max_t=4, max_n=12))
def test_sce_weights_are_the_normalised_mean_squares(taus) -> None:
    w = sce_weights(taus)
    energy = (taus**2).mean(dim=1)
    if float(energy.sum()) < 1e-6:
        torch.testing.assert_close(w, torch.full_like(w, 1 / taus.shape[0]))
    else:
        torch.testing.assert_close(w, energy / energy.sum())
        assert float(w.sum()) == pytest.approx(1.0)
