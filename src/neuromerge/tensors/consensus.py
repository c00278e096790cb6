"""Sign election and disjoint merging (TIES-Merging, Yadav et al. 2023, arXiv 2306.01708, §3).

All functions take a stacked tensor ``x`` of shape ``(T, ...)`` (one slice per task) and reduce over dim 0; the
sign election also takes a sequence of ``T`` tensors (no stacking copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

SignMethod = Literal["sum", "count"]


def sign_score(x: torch.Tensor | Sequence[torch.Tensor], method: SignMethod = "sum") -> torch.Tensor:
    """``Σ_t x_t`` (``sum``) or ``Σ_t sign(x_t)`` (``count``) over a stacked ``(T, ...)`` tensor or a sequence,
    summed in model order into a new tensor."""
    xs = list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)
    if method == "sum":
        score = xs[0].clone()
        for t in xs[1:]:
            score.add_(t)
        return score
    score = torch.sign(xs[0])
    for t in xs[1:]:
        score.add_(torch.sign(t))
    return score


def elect_sign(x: torch.Tensor | Sequence[torch.Tensor], method: SignMethod = "sum") -> torch.Tensor:
    """Elected sign per coordinate, ``γ = sign(Σ_t x_t)`` (``method="sum"``, TIES) or the sign held by the
    most tasks (``method="count"``). Coordinates whose elected sign is 0 take the majority sign of the whole
    slice, ``sign(Σ γ)`` (again ``+1`` if that is 0), as in the official TIES code and PEFT's
    ``calculate_majority_sign_mask``.

    ``x``: stacked ``(T, ...)`` or a sequence of ``T`` tensors. Returns a float tensor of ``x_t``'s shape holding
    ``±1``.
    """
    if method not in ("sum", "count"):  # pragma: no cover - validated by the parameter models
        raise ValueError(f"unknown sign method {method!r}")
    gamma = sign_score(x, method).sign_()
    return fill_zero_signs(gamma, 1.0 if float(gamma.sum()) >= 0 else -1.0)


def fill_zero_signs(gamma: torch.Tensor, value: float) -> torch.Tensor:
    """``gamma`` (entries in {-1, 0, 1}) with its zeros set to ``value`` (±1), in place: ``γ + value·(1 − |γ|)``
    (float arithmetic, exact on these values; faster on CPU than a boolean mask)."""
    return gamma.sub_(gamma.abs().sub_(1.0), alpha=value)


def agreement_mask(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Boolean ``(T, ...)`` mask of the entries that are non-zero and agree with the elected ``sign``."""
    return (torch.sign(x) == sign.unsqueeze(0)) & (x != 0)


def disjoint_merge(
    x: torch.Tensor, sign: torch.Tensor, reduce: Literal["mean", "sum", "max"] = "mean"
) -> torch.Tensor:
    """Disjoint merge: combine only the entries that agree with the elected sign.

    ``mean`` (TIES "dis-mean"): ``Σ_t m_t x_t / max(1, Σ_t m_t)``; ``sum`` ("dis-sum"): ``Σ_t m_t x_t``;
    ``max``: the agreeing entry of largest magnitude (signed).
    """
    mask = agreement_mask(x, sign)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    if reduce == "sum":
        return kept.sum(dim=0)
    if reduce == "mean":
        return kept.sum(dim=0) / mask.sum(dim=0).clamp(min=1).to(x.dtype)
    if reduce == "max":
        return kept.abs().max(dim=0).values * sign
    raise ValueError(f"unknown reduce {reduce!r}")  # pragma: no cover


def ties_merge(
    x: torch.Tensor, reduce: Literal["mean", "sum", "max"] = "mean", sign_method: SignMethod = "sum"
) -> torch.Tensor:
    """TIES elect + disjoint merge of already-trimmed task vectors stacked as ``(T, ...)``."""
    return disjoint_merge(x, elect_sign(x, sign_method), reduce)
