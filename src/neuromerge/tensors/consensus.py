"""Sign election and disjoint merging (TIES-Merging, Yadav et al. 2023, arXiv 2306.01708, §3).

All functions take a stacked tensor ``x`` of shape ``(T, ...)`` (one slice per task) and reduce over dim 0.
"""

from __future__ import annotations

from typing import Literal

import torch

SignMethod = Literal["sum", "count"]


def elect_sign(x: torch.Tensor, method: SignMethod = "sum") -> torch.Tensor:
    """Elected sign per coordinate, ``γ = sign(Σ_t x_t)`` (``method="sum"``, TIES) or the sign held by the
    most tasks (``method="count"``). Coordinates whose elected sign is 0 take the majority sign of the whole
    slice, ``sign(Σ γ)`` (again ``+1`` if that is 0), as in the official TIES code and PEFT's
    ``calculate_majority_sign_mask``.

    Returns a float tensor of shape ``x.shape[1:]`` holding ``±1``.
    """
    if method == "sum":
        gamma = torch.sign(x.sum(dim=0))
    elif method == "count":
        gamma = torch.sign(torch.sign(x).sum(dim=0))
    else:  # pragma: no cover - validated by the parameter models
        raise ValueError(f"unknown sign method {method!r}")
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


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
