"""``tensors/consensus.py``: sign election and disjoint merge (TIES, arXiv 2306.01708 §3) against per-coordinate
float64 loops, plus the election's invariances (positive scaling, sign flip, stacked vs sequence input)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.consensus import (
    agreement_mask,
    disjoint_merge,
    elect_sign,
    fill_zero_signs,
    sign_score,
    ties_merge,
)
from tests.tensors.strategies import FAST, arrays, stacks

METHODS = st.sampled_from(["sum", "count"])


def _sign(v: float) -> float:
    return 1.0 if v > 0 else -1.0 if v < 0 else 0.0


def _ref_score(x: torch.Tensor, method: str) -> list[float]:
    t, n = x.shape
    rows = x.tolist()
    score = []
    for j in range(n):
        acc = 0.0
        for i in range(t):
            acc += rows[i][j] if method == "sum" else _sign(rows[i][j])
        score.append(acc)
    return score


def _ref_elect(x: torch.Tensor, method: str) -> list[float]:
    gamma = [_sign(s) for s in _ref_score(x, method)]
    fill = 1.0 if sum(gamma) >= 0 else -1.0
    return [g if g != 0 else fill for g in gamma]


def _ref_disjoint(x: torch.Tensor, sign: list[float], reduce: str) -> list[float]:
    out = []
    for j, s in enumerate(sign):
        agree = [v for v in x[:, j].tolist() if v != 0 and _sign(v) == s]
        if reduce == "sum":
            out.append(sum(agree))
        elif reduce == "mean":
            out.append(sum(agree) / max(1, len(agree)))
        else:
            out.append(s * max((abs(v) for v in agree), default=0.0))
    return out


@FAST
@given(stacks(), METHODS)
def test_sign_score_is_the_sum_in_model_order(x, method) -> None:
    """``Σ_t x_t`` (or ``Σ_t sign x_t``) summed in model order: bitwise the float64 loop; a sequence equals a stack."""
    ref = torch.tensor(_ref_score(x, method), dtype=torch.float64)
    assert torch.equal(sign_score(x, method), ref)
    assert torch.equal(sign_score(list(x.unbind(0)), method), ref)
    before = x.clone()
    sign_score(x, method)
    assert torch.equal(x, before)  # a new tensor: the input is untouched


@FAST
@given(stacks(), METHODS)
def test_elect_sign_matches_the_reference(x, method) -> None:
    gamma = elect_sign(x, method)
    assert gamma.tolist() == _ref_elect(x, method)
    assert set(gamma.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(elect_sign(list(x.unbind(0)), method), gamma)


@FAST
@given(stacks(), METHODS, st.integers(-20, 20))
def test_sign_election_is_invariant_to_positive_scaling(x, method, exponent) -> None:
    """``γ(c·x) = γ(x)`` for ``c > 0``: with ``c = 2^e`` every product and partial sum scales exactly (no rounding),
    so the invariance holds bitwise for ``sum``; ``count`` only sees signs, so any ``c > 0`` works."""
    assert torch.equal(elect_sign(x * 2.0**exponent, method), elect_sign(x, method))
    assert torch.equal(elect_sign(x * 0.37, "count"), elect_sign(x, "count"))


@FAST
@given(stacks(), METHODS)
def test_sign_election_flips_with_the_inputs(x, method) -> None:
    """``γ(−x) = −γ(x)`` where the score is non-zero; the zero-score fill flips too unless the majority is a tie."""
    gamma, flipped = elect_sign(x, method), elect_sign(-x, method)
    decided = sign_score(x, method) != 0
    assert torch.equal(flipped[decided], -gamma[decided])
    undecided = ~decided
    if undecided.any():
        majority = float(sign_score(x, method).sign().sum())
        expected = -gamma[undecided] if majority != 0 else torch.ones_like(gamma[undecided])
        assert torch.equal(flipped[undecided], expected)


@FAST
@given(arrays((12,), ints=True), st.sampled_from([1.0, -1.0]))
def test_fill_zero_signs(values, value) -> None:
    gamma = values.clamp(-1, 1)
    expected = torch.where(gamma == 0, torch.tensor(value, dtype=gamma.dtype), gamma)
    out = fill_zero_signs(gamma, value)
    assert out is gamma  # in place
    assert torch.equal(out, expected)


@FAST
@given(stacks())
def test_agreement_mask(x) -> None:
    sign = elect_sign(x)
    ref = [[v != 0 and _sign(v) == s for v, s in zip(row, sign.tolist(), strict=True)] for row in x.tolist()]
    assert agreement_mask(x, sign).tolist() == ref


@FAST
@given(stacks(), st.sampled_from(["mean", "sum", "max"]), st.booleans())
def test_disjoint_merge_matches_the_reference(x, reduce, elected) -> None:
    """Any ±1 sign (the elected one, or an arbitrary one) and each reduction against the per-coordinate loop."""
    g = torch.Generator().manual_seed(x.numel())
    sign = elect_sign(x) if elected else torch.randint(0, 2, x.shape[1:], generator=g).double() * 2 - 1
    ref = torch.tensor(_ref_disjoint(x, sign.tolist(), reduce), dtype=torch.float64)
    torch.testing.assert_close(disjoint_merge(x, sign, reduce), ref, rtol=1e-12, atol=0)


@FAST
@given(stacks(), st.sampled_from(["mean", "sum", "max"]), METHODS)
def test_ties_merge_is_elect_then_disjoint_merge(x, reduce, method) -> None:
    ref = torch.tensor(_ref_disjoint(x, _ref_elect(x, method), reduce), dtype=torch.float64)
    torch.testing.assert_close(ties_merge(x, reduce, method), ref, rtol=1e-12, atol=0)


@FAST
@given(arrays((7,)), st.integers(1, 5), METHODS)
def test_ties_merge_of_identical_vectors_returns_the_vector(v, t, method) -> None:
    """T copies of one (trimmed) task vector merge back to it under the disjoint mean (spec §1.8's last invariant; to
    the rounding of ``(v + … + v) / T``) and exactly under ``max``."""
    x = v.expand(t, -1).clone()
    torch.testing.assert_close(ties_merge(x, "mean", method), v, rtol=1e-15, atol=0)
    assert torch.equal(ties_merge(x, "max", method), v)
