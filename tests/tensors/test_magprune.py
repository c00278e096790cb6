"""``tensors/magprune.py``: DELLA's MAGPRUNE keep probabilities and drop against float64 statements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuromerge.tensors.magprune import check_density_epsilon, magprune, magprune_keep_probabilities


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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


def test_check_density_epsilon() -> None:
    assert check_density_epsilon(0.5, 0.15) is None
    assert check_density_epsilon(1.0, 0.9) is None  # no drop: any ε
    assert "density ± epsilon" in (check_density_epsilon(0.1, 0.15) or "")
    assert "density ± epsilon" in (check_density_epsilon(0.9, 0.1) or "")
