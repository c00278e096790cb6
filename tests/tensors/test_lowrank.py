"""``tensors/lowrank.py``: truncated-SVD LoRA factors (Eckart–Young) and exact factor concatenation, against float64
references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.lowrank import concat_factors, discarded_energy, truncated_svd_factors
from tests.tensors.strategies import FAST, arrays


@FAST
@given(arrays((6,), ints=True), st.integers(0, 7))
def test_discarded_energy(values, rank) -> None:
    """``Σ_{i>r} σ_i² / Σ σ_i²`` (0 for a zero matrix) for non-negative descending singular values."""
    s = values.abs().sort(descending=True).values
    sq = [v * v for v in s.tolist()]
    expected = sum(sq[rank:]) / sum(sq) if sum(sq) > 0 else 0.0
    assert discarded_energy(s, rank) == pytest.approx(expected, rel=1e-15, abs=0)


@st.composite
def low_rank(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A float64 ``m × n`` matrix of rank at most ``true``, and ``true``."""
    m, n, true = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    left, right = draw(arrays((m, true), ints=False)), draw(arrays((true, n), ints=False))
    return left @ right, min(true, m, n)


@FAST
@given(low_rank(), st.integers(1, 8))
def test_truncated_svd_factors(case, rank) -> None:
    """``B A`` is the best rank-``r`` approximation: its relative squared error is the discarded energy of the
    singular values (and 0 from the true rank on); the factors share each ``√σ_i`` (balanced columns of B and rows of
    A); shapes ``(r, n)`` and ``(m, r)`` with ``r = min(rank, m, n)``."""
    delta, true = case
    a, b, discarded = truncated_svd_factors(delta, rank)
    m, n = delta.shape
    r = min(rank, m, n)
    assert a.shape == (r, n) and b.shape == (m, r) and a.dtype == b.dtype == torch.float64
    s = torch.linalg.svdvals(delta)
    assert discarded == pytest.approx(discarded_energy(s, r), abs=1e-12)
    norm = float(delta.norm()) ** 2
    if norm > 0:
        assert float((delta - b @ a).norm()) ** 2 / norm == pytest.approx(discarded, abs=1e-10)
    if rank >= true:
        torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-10 * max(1.0, float(delta.abs().max())))
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-10, atol=1e-12 * max(1.0, float(s[0])))


def test_truncated_svd_factors_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd_factors(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        truncated_svd_factors(torch.zeros(3, 3), 0)


@FAST
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.data())
def test_concat_factors_is_the_linear_combination(t, m, n, data) -> None:
    """``B_cat A_cat = Σ_t c_t B_t A_t`` with the ranks stacked (``A`` along dim 0, ``B`` along dim 1)."""
    factors, coefs = [], []
    for _ in range(t):
        r = data.draw(st.integers(1, 3))
        factors.append((data.draw(arrays((r, n))), data.draw(arrays((m, r)))))
        coefs.append(data.draw(st.sampled_from([-1.0, 0.25, 0.5, 2.0])))
    a_cat, b_cat = concat_factors(factors, coefs)
    ranks = sum(a.shape[0] for a, _ in factors)
    assert a_cat.shape == (ranks, n) and b_cat.shape == (m, ranks)
    expected = sum(c * (b @ a) for (a, b), c in zip(factors, coefs, strict=True))
    torch.testing.assert_close(b_cat @ a_cat, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max() + 1))


def test_concat_factors_of_conv_shapes_and_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)) for _ in range(2)]
    a_cat, b_cat = concat_factors(factors, [0.5, 2.0])
    assert a_cat.shape == (4, 3, 3, 3) and b_cat.shape == (4, 4, 1, 1)
    with pytest.raises(ValueError, match="one coefficient per factor pair"):
        concat_factors(factors, [1.0])
    with pytest.raises(ValueError, match="one coefficient per factor pair"):
        concat_factors([], [])
