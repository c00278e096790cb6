"""``tensors/ram.py``: RAM and RAM+ (tensor-local) against per-entry float64 loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.ram import contributions, ram_merge_deltas, ramplus_lambdas, ramplus_merge_deltas
from tests.tensors.strategies import FAST, stacks


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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


@FAST
@given(stacks(max_t=4, max_n=12), st.sampled_from([0.0, 1e-5, 0.5]))
def test_contributions_count_the_entries_above_epsilon(taus, eps) -> None:
    kept, count = contributions(list(taus), eps)
    assert torch.equal(count, (taus.abs() > eps).sum(dim=0))
    torch.testing.assert_close(kept, torch.where(taus.abs() > eps, taus, torch.zeros_like(taus)))


@FAST
@given(stacks(max_t=4, max_n=12), st.sampled_from([0.0, 0.1, 1.0]), st.sampled_from([0.0, 0.2, 2.0]))
def test_ramplus_lambdas_lie_between_one_and_one_plus_r_alpha(taus, r, alpha) -> None:
    lambdas = ramplus_lambdas(list(taus), 1e-5, r, alpha)
    assert len(lambdas) == taus.shape[0]
    assert all(1.0 <= lam <= 1.0 + r * alpha + 1e-12 for lam in lambdas)
    # with r = 0 RAM+ is RAM
    torch.testing.assert_close(ramplus_merge_deltas(list(taus), 1e-5, 0.0, alpha), ram_merge_deltas(list(taus), 1e-5))
