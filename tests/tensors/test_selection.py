"""``tensors/selection.py``: top-k counts, thresholds and the trim, against sorting in float64, and the trim's
defining property: it keeps exactly the top ``k`` entries by magnitude plus the ties at the ``k``-th magnitude."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.selection import kept_count, magnitude_prune, magnitude_threshold, threshold_mask, trim
from tests.tensors.strategies import FAST, arrays, densities

SHAPES = st.sampled_from([(1,), (7,), (4, 5), (3, 2, 4)])
FLOATS = st.sampled_from([torch.float64, torch.float32, torch.bfloat16])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    return draw(arrays(draw(SHAPES), dtype=draw(FLOATS)))


@FAST
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_kept_count_is_floor_of_density_times_n(n, k) -> None:
    """``kept_count(n, k/n) = k`` exactly (float noise in ``k/n · n`` is guarded), and ``⌊d·n⌋`` in general."""
    k = min(k, n)
    if n:
        assert kept_count(n, k / n) == k
    for d in (0.0, 0.2, 0.333, 1.0):
        assert kept_count(n, d) == min(n, math.floor(d * n + 1e-9))
        assert 0 <= kept_count(n, d) <= n


@FAST
@given(tensors(), densities())
def test_magnitude_threshold_is_the_kth_largest_magnitude(x, density) -> None:
    n = x.numel()
    k = kept_count(n, density)
    mags = sorted((abs(v) for v in x.double().reshape(-1).tolist()), reverse=True)
    thr = magnitude_threshold(x, density)
    if k == 0:
        assert thr == math.inf
    elif k >= n:
        assert thr == 0.0
    else:
        assert thr == mags[k - 1]


@FAST
@given(tensors(), st.integers(0, 2**31 - 1))
def test_threshold_mask(x, seed) -> None:
    """``|x| >= thr`` for a threshold that is one of the magnitudes (a value of the dtype) and for any float, which
    is compared after rounding to ``x``'s dtype."""
    flat = x.reshape(-1)
    thr = float(flat[seed % flat.numel()].abs())
    assert threshold_mask(x, thr).tolist() == (x.double().abs() >= thr).tolist()
    g = torch.Generator().manual_seed(seed)
    other = float(torch.rand((), generator=g, dtype=torch.float64)) * 3.0
    rounded = float(torch.tensor(other, dtype=x.dtype))
    assert threshold_mask(x, other).tolist() == (x.double().abs() >= rounded).tolist()


@FAST
@given(tensors(), st.integers(0, 2**31 - 1))
def test_trim_is_x_times_the_mask(x, seed) -> None:
    """``x ⊙ [|x| >= thr]`` bitwise, dropped entries ``+0.0``, for thresholds of the dtype, 0, negative and ``inf``;
    any other float is rounded to the dtype first (as the fused kernels, which take it as fp32)."""
    flat = x.reshape(-1)
    g = torch.Generator().manual_seed(seed)
    other = float(torch.rand((), generator=g, dtype=torch.float64)) * 3.0
    for thr in (float(flat[seed % flat.numel()].abs()), 0.0, -1.0, math.inf, other):
        rounded = float(torch.tensor(thr, dtype=x.dtype))
        expected = torch.where(x.double().abs() >= rounded, x.double(), 0.0).to(x.dtype)
        out = trim(x, thr)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert torch.equal(out, expected)
        assert not torch.signbit(out[out == 0]).any() or thr <= 0  # dropped entries are +0.0
        assert out.data_ptr() != x.data_ptr()


def test_trim_of_an_integer_tensor() -> None:
    x = torch.tensor([-3, 0, 2, 5, -1])
    assert trim(x, 2.0).tolist() == [-3, 0, 2, 5, 0]


@FAST
@given(tensors(), densities())
def test_trim_keeps_exactly_the_top_k_plus_ties(x, density) -> None:
    """``magnitude_prune`` (= trim at the ``k``-th magnitude) keeps the entries whose magnitude is at least the
    ``k``-th largest: every kept magnitude >= every dropped one, at least ``k`` kept, and the kept beyond ``k`` are
    exactly ties at the threshold. Kept entries are unchanged."""
    n = x.numel()
    k = kept_count(n, density)
    out = magnitude_prune(x, density)
    flat, kept_flat = x.double().reshape(-1), out.double().reshape(-1)
    kept = (kept_flat != 0) | ((flat == 0) & (k == n))
    mags = flat.abs()
    assert torch.equal(kept_flat[kept], flat[kept])
    assert not kept_flat[~kept].any()
    if k == 0:
        assert not out.any()
        return
    kth = sorted(mags.tolist(), reverse=True)[k - 1]
    if kth == 0:  # the threshold is 0: everything is kept (zeros stay zeros)
        assert torch.equal(out, x)
        return
    assert int(kept.sum()) >= k
    assert int((mags > kth).sum()) < k <= int((mags >= kth).sum())
    assert torch.equal(kept, mags >= kth)  # the top-k plus the ties at the k-th magnitude, nothing else
    if kept.any() and (~kept).any():
        assert float(mags[kept].min()) >= float(mags[~kept].max())
