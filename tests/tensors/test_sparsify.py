"""``tensors/sparsify.py``: DARE, Model Breadcrumbs, the weighted disjoint merge and the diagnostics, against float64
loops; DARE's rescale keeps the expectation (seeded draws, a tolerance from the variance)."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors import rng
from neuromerge.tensors.consensus import disjoint_merge, elect_sign
from neuromerge.tensors.selection import kept_count
from neuromerge.tensors.sparsify import (
    L1_EPS,
    SIGN_CONFLICT_STRIDE,
    bernoulli_keep_mask,
    breadcrumbs_sparsify,
    count_nonzero,
    dare_drop,
    disjoint_merge_with_conflicts,
    elect_sign_positive,
    l1_rescale,
    nonzero_fraction,
    outlier_mask,
    sampled_sign_conflict_rate,
    sign_conflict_rate,
    sign_conflict_sample,
)
from tests.tensors.strategies import FAST, FEW, arrays, densities, stacks

# ------------------------------------------------------------------------------------------------------------ DARE


@FAST
@given(arrays((50,), ints=False), densities())
def test_bernoulli_keep_mask(u, density) -> None:
    u = u.abs() % 1.0
    assert bernoulli_keep_mask(u, density).tolist() == [v < density for v in u.tolist()]


@FAST
@given(arrays((20,)), arrays((20,)))
def test_l1_rescale(x, kept) -> None:
    """``kept · ‖x‖₁ / ‖kept‖₁``: the result has ``x``'s L1 norm; below ``eps`` either way, ``kept`` unscaled."""
    before, after = float(x.abs().sum()), float(kept.abs().sum())
    out = l1_rescale(x, kept)
    if before < L1_EPS or after < L1_EPS:
        assert out is kept
        return
    torch.testing.assert_close(out, kept * (before / after), rtol=1e-14, atol=0)
    assert math.isclose(float(out.abs().sum()), before, rel_tol=1e-12)


@FAST
@given(arrays((30,), dtype=torch.float32), st.integers(0, 2**31 - 1), densities().filter(lambda d: d > 0),
       st.sampled_from(["inverse", "l1", "none"]))
def test_dare_drop_matches_the_reference(x, seed, density, rescale) -> None:
    u = rng.uniform(seed, 0, x.numel())
    keep = [v < density for v in u.tolist()]
    kept = torch.tensor([v if k else 0.0 for v, k in zip(x.double().tolist(), keep, strict=True)], dtype=torch.float64)
    if rescale == "inverse":
        ref = kept / density
    elif rescale == "none":
        ref = kept
    else:
        b, a = float(x.double().abs().sum()), float(kept.abs().sum())
        ref = kept if b < L1_EPS or a < L1_EPS else kept * (b / a)
    out = dare_drop(x, u, density, rescale)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, rtol=2e-7, atol=0)
    assert torch.equal(out != 0, torch.tensor(keep) & (x != 0))


@FEW
@given(arrays((64,), ints=False), st.sampled_from([0.1, 0.3, 0.5, 0.9]))
def test_dare_rescale_keeps_the_expectation(x, density) -> None:
    """``E[m ⊙ x / d] = x`` for ``m ~ Bernoulli(d)``. Over ``N`` seeded draws (the engine's keyed generator, ``N``
    rows of one stream) the mean of each entry has standard deviation ``|x| √((1−d)/(d N))``; every entry must lie
    within 6 of them (for 64 independent entries a false alarm has probability < 1e-7), and the mean over the entries,
    whose deviation shrinks by another √64, within 6 of its own."""
    n_draws = 2000
    u = rng.draw(0, "dare", "w", 0, 0, (n_draws, x.numel())).double()  # one keyed stream, a row per draw
    draws = dare_drop(x.expand(n_draws, -1), u, density)
    mean = draws.mean(dim=0)
    sd = x.abs() * math.sqrt((1 - density) / (density * n_draws))
    assert bool(((mean - x).abs() <= 6 * sd + 1e-12).all())
    total_sd = math.sqrt(float((sd**2).sum()))
    assert abs(float(mean.sum() - x.sum())) <= 6 * total_sd + 1e-12
    # the dropped share is Bernoulli too: its mean is 1 − d within 6 standard deviations
    kept_share = float((draws != 0).double().mean())
    assert abs(kept_share - density) <= 6 * math.sqrt(density * (1 - density) / draws.numel())


# ----------------------------------------------------------------------------------------------------- Breadcrumbs


def _ref_outlier_mask(x: torch.Tensor, density: float, gamma: float) -> list[bool]:
    flat = x.reshape(-1).tolist()
    n = len(flat)
    k, n_top = kept_count(n, density), kept_count(n, gamma)
    n_bot = max(0, n - k - n_top)
    order = sorted(range(n), key=lambda i: (abs(flat[i]), i))  # ascending magnitude, ties by flat position
    keep = set(order[n_bot : n_bot + k])
    return [i in keep for i in range(n)]


@FAST
@given(arrays((4, 6)), densities(), densities())
def test_outlier_mask_matches_the_reference(x, density, gamma) -> None:
    """Keeps exactly ``k = ⌊d·n⌋`` entries: the ranks after the ``n_bot`` smallest; the dropped outliers are at least
    as large as anything kept, the dropped small ones at most as large."""
    mask = outlier_mask(x, density, gamma)
    assert mask.reshape(-1).tolist() == _ref_outlier_mask(x, density, gamma)
    assert int(mask.sum()) == kept_count(x.numel(), density)
    out = breadcrumbs_sparsify(x, density, gamma)
    assert torch.equal(out, torch.where(mask, x, 0.0))


@FAST
@given(arrays((30,)), densities(), densities())
def test_breadcrumbs_drops_the_largest_and_the_smallest(x, density, gamma) -> None:
    mask = outlier_mask(x, density, gamma)
    mags = x.abs()
    kept = mags[mask]
    if not kept.numel():
        return
    lo, hi = float(kept.min()), float(kept.max())
    n, k = x.numel(), int(mask.sum())
    n_top = min(kept_count(n, gamma), n - k)
    dropped = mags[~mask].sort().values
    assert int((dropped >= hi).sum()) >= n_top  # the n_top largest are all dropped (ties may sit either side)
    assert bool((dropped[: dropped.numel() - n_top] <= lo).all())


# --------------------------------------------------------------------------------------- weighted disjoint merge

WEIGHTS = st.sampled_from([-1.0, 0.5, 1.0, 2.0, 0.0])


@FAST
@given(stacks(max_t=4), st.data(), st.sampled_from(["dis-mean", "dis-sum"]))
def test_disjoint_merge_with_conflicts_matches_the_reference(x, data, variant) -> None:
    """``Σ m_t τ'_t`` (dis-sum) or ``Σ m_t τ'_t / Σ m_t w_t`` (dis-mean, divisor 0 → 1), ``m_t = [sign τ'_t = γ]``,
    and the share of coordinates where some ``τ'_t`` opposes ``γ``; weights of either sign, zero included."""
    t, n = x.shape
    weights = data.draw(st.lists(WEIGHTS, min_size=t, max_size=t))
    sign = elect_sign_positive(x)
    out, rate = disjoint_merge_with_conflicts(x, weights, sign, variant)
    ref, conflicts = [], 0
    for j in range(n):
        s = float(sign[j])
        col = x[:, j].tolist()
        agree = [(v, w) for v, w in zip(col, weights, strict=True) if v * s > 0]
        total = sum(v for v, _ in agree)
        if variant == "dis-mean":
            divisor = sum(w for _, w in agree)
            total /= divisor if divisor != 0 else 1.0
        ref.append(total)
        conflicts += any(v * s < 0 for v in col)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-300)
    assert rate == conflicts / n
    seq, seq_rate = disjoint_merge_with_conflicts(list(x.unbind(0)), weights, sign, variant)
    assert torch.equal(seq, out) and seq_rate == rate


@FAST
@given(stacks(max_t=4), st.sampled_from(["sum", "count"]))
def test_disjoint_merge_with_unit_weights_is_the_ties_disjoint_mean(x, method) -> None:
    sign = elect_sign(x, method)
    out, _ = disjoint_merge_with_conflicts(x, [1.0] * x.shape[0], sign, "dis-mean")
    torch.testing.assert_close(out, disjoint_merge(x, sign, "mean"), rtol=1e-14, atol=0)
    out, _ = disjoint_merge_with_conflicts(x, [1.0] * x.shape[0], sign, "dis-sum")
    torch.testing.assert_close(out, disjoint_merge(x, sign, "sum"), rtol=1e-14, atol=0)


@FAST
@given(stacks(), st.sampled_from(["sum", "count"]), st.integers(0, 12))
def test_elect_sign_positive_is_elementwise(x, method, cut) -> None:
    """``sign(Σ_t x_t)`` with 0 → +1, coordinate by coordinate: electing on two slices gives the whole election."""
    score = x.sum(0) if method == "sum" else x.sign().sum(0)
    expected = torch.where(score == 0, 1.0, score.sign()).to(x.dtype)
    gamma = elect_sign_positive(x, method)
    assert torch.equal(gamma, expected)
    cut = min(cut, x.shape[1])
    parts = [elect_sign_positive(x[:, :cut], method), elect_sign_positive(x[:, cut:], method)]
    assert torch.equal(torch.cat(parts), gamma)
    assert torch.equal(elect_sign_positive(list(x.unbind(0)), method), gamma)


# ------------------------------------------------------------------------------------------------------ diagnostics


@FAST
@given(arrays((5, 7)), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_count_nonzero(x, dtype) -> None:
    x = x.to(dtype)
    assert count_nonzero(x) == sum(v != 0 for v in x.double().reshape(-1).tolist())


def _ref_conflicts(rows: list[list[float]]) -> float:
    if not rows or not rows[0]:
        return 0.0
    cols = list(zip(*rows, strict=True))
    return sum(any(v > 0 for v in c) and any(v < 0 for v in c) for c in cols) / len(cols)


@FAST
@given(stacks(max_t=4))
def test_sign_conflict_rate(x) -> None:
    """Share of coordinates with both a positive and a negative entry; 0 for one model."""
    ref = _ref_conflicts(x.tolist()) if x.shape[0] >= 2 else 0.0
    assert sign_conflict_rate(x) == ref
    assert sign_conflict_rate(list(x.unbind(0))) == ref


@FAST
@given(st.integers(1, 3), st.integers(1, 200), st.integers(0, 199), st.integers(1, 150), st.sampled_from([1, 2]))
def test_sign_conflict_sample(stride_div, total_rows, first_row, rows, ndim) -> None:
    """``(first, step)``: the chunk's rows whose global index is a multiple of the stride, or every row (``(0, 1)``)
    for 1-D tensors, tensors under ``4 · stride`` rows and chunks holding no sampled row."""
    stride = 16 // stride_div
    first_row = min(first_row, total_rows - 1)
    rows = min(rows, total_rows - first_row)
    start, step = sign_conflict_sample(ndim, rows, first_row, total_rows, stride)
    sampled = [i for i in range(first_row, first_row + rows) if i % stride == 0]
    if ndim < 2 or total_rows < 4 * stride or not sampled:
        assert (start, step) == (0, 1)
    else:
        assert step == stride
        assert [first_row + i for i in range(start, rows, step)] == sampled


@FEW
@given(arrays((3, 80, 6)), st.integers(0, 79), st.integers(1, 80))
def test_sampled_sign_conflict_rate_reads_the_same_rows_whatever_the_chunking(x, first, rows) -> None:
    """On a row chunk, the rate over the sampled rows (global index a multiple of the stride), else over all rows."""
    rows = min(rows, 80 - first)
    chunk = [m[first : first + rows] for m in x.unbind(0)]
    got = sampled_sign_conflict_rate(chunk, first, 80)
    sampled = [i - first for i in range(first, first + rows) if i % SIGN_CONFLICT_STRIDE == 0]
    picked = sampled if sampled else list(range(rows))
    ref = _ref_conflicts([m[picked].reshape(-1).tolist() for m in chunk])
    assert got == ref
    assert sampled_sign_conflict_rate([]) == 0.0
    flat = [m.reshape(-1) for m in x.unbind(0)]  # 1-D: exact
    assert sampled_sign_conflict_rate(flat) == sign_conflict_rate(flat)


@FAST
@given(st.lists(arrays((4,), ints=True), max_size=4), st.booleans())
def test_nonzero_fraction(xs, with_empty) -> None:
    """Mean over tensors of each one's non-zero share; empty tensors are skipped; 0 for none."""
    if with_empty:
        xs = [*xs, torch.zeros(0)]
    fractions = [float(np.count_nonzero(x.numpy())) / x.numel() for x in xs if x.numel()]
    expected = sum(fractions) / len(fractions) if fractions else 0.0
    assert nonzero_fraction(xs) == expected
