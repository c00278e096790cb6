"""Arcee Fusion (Arcee AI, arcee.ai; mergekit 0.1.5 ``merge_methods/arcee_fusion``): keep only the changes of a
model whose importance is an outlier.

Importance of each entry: ``|θ1 − θ0|`` times the KL divergence between the softmax of the model's and the base's
row (last axis); the changes whose importance reaches ``median + 1.5 · IQR`` (Tukey's upper fence) are applied.
"""

from __future__ import annotations

import torch

#: added to both softmax distributions before the KL divergence (mergekit)
KL_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|θ1 − θ0| · KL(p ‖ q)`` with ``p = softmax(θ1) + 1e-8`` and ``q = softmax(θ0) + 1e-8`` over the last axis
    (one KL value per row, broadcast over it)."""
    p = torch.softmax(model, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def lower_quantiles(x: torch.Tensor, qs: tuple[float, ...] = QUANTILES) -> list[torch.Tensor]:
    """Order statistics ``sorted(x)[⌊q (n − 1)⌋]`` for each ``q`` (no interpolation, as mergekit), computed exactly
    with ``kthvalue`` on every entry (mergekit sorts a 1 M random sample instead when ``n > 10⁶``)."""
    flat = x.reshape(-1)
    n = flat.numel()
    return [torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in qs]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence ``Q2 + 1.5 (Q3 − Q1)`` of the importance values (:func:`lower_quantiles`)."""
    q1, median, q3 = lower_quantiles(importance)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``θ0 + (θ1 − θ0) ⊙ [importance >= threshold]`` (:func:`fusion_importance`, :func:`fusion_threshold`)."""
    importance = fusion_importance(model, base)
    mask = importance >= fusion_threshold(importance)
    return base + (model - base) * mask.to(base.dtype)
