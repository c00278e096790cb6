"""DELLA's MAGPRUNE: drop task-vector entries with a keep probability that grows with their magnitude rank.

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling", arXiv
2406.11617; mergekit 0.1.5 ``sparsify.della_magprune``. Pure functions: the uniform draws are an input (the engine's
counter-based generator), so a mask does not depend on threads or chunking.
"""

from __future__ import annotations

from typing import Literal

import torch

from .sparsify import l1_rescale

DellaRescale = Literal["l1", "inverse", "none"]


def magprune_keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of each entry: ``p = (density − ε) + 2ε · (r − 1)/(n − 1)``, ``r ∈ 1..n`` the rank of
    ``|x|`` (ascending) within its row of ``n`` entries (a 1-D tensor is one row). So ``p`` runs linearly from
    ``density − ε`` (smallest) to ``density + ε`` (largest) and its mean over a row is ``density``. A row of one entry
    gets ``density − ε`` (mergekit divides 0 by 0 there). Equal magnitudes are ranked by position (stable sort)."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
    rank_norm = ranks.to(torch.float32) / (n - 1) if n > 1 else torch.zeros(rows.shape, device=x.device)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(x.shape)


def magprune(x: torch.Tensor, u: torch.Tensor, density: float, epsilon: float,
             rescale: DellaRescale = "l1") -> torch.Tensor:
    """MAGPRUNE of a task vector ``x`` with uniform draws ``u ∈ [0, 1)``: ``m = [u < p]`` with ``p`` from
    :func:`magprune_keep_probabilities`, then ``rescale``: ``"l1"`` scales ``m ⊙ x`` to the L1 norm of ``x`` over the
    tensor (mergekit's ``rescale: true``), ``"inverse"`` divides each kept entry by its own ``p`` (the DELLA paper's
    ``1/p_i``, an unbiased estimate of ``x``), ``"none"`` keeps ``m ⊙ x``. ``density >= 1`` returns ``x``."""
    if density >= 1:
        return x
    p = magprune_keep_probabilities(x, density, epsilon)
    kept = torch.where(u < p, x, torch.zeros((), dtype=x.dtype))
    if rescale == "l1":
        return l1_rescale(x, kept)
    if rescale == "inverse":
        return kept / p
    if rescale == "none":
        return kept
    raise ValueError(f"unknown rescale {rescale!r}")  # pragma: no cover - validated by the parameter models


def check_density_epsilon(density: float, epsilon: float) -> str | None:
    """Why ``(density, ε)`` is not a valid MAGPRUNE choice (the keep probabilities must stay in (0, 1)), or None.
    ``density >= 1`` drops nothing and accepts any ε, as mergekit."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return f"density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
    return None
