"""Helpers shared by several method modules (not a method itself)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..tensors.selection import magnitude_threshold, trim
from .base import MergeInput

TrimScope = Literal["global", "tensor"]


def global_trim_thresholds(x: MergeInput, densities: Sequence[float]) -> list[float]:
    """``thr_t`` of every model for a global trim: the statistics pass's threshold, or 0 (keep everything) for a
    model of density 1."""
    if any(d < 1.0 for d in densities) and x.stats is None:  # pragma: no cover - the engine computes them
        raise RuntimeError(f"{x.name}: global trim requested but no statistics were computed")
    return [0.0 if d >= 1.0 else x.stats.thresholds[t] for t, d in enumerate(densities)]  # type: ignore[union-attr]


def trimmed_deltas(x: MergeInput, densities: Sequence[float], scope: TrimScope) -> list[torch.Tensor]:
    """``τ̂_t = τ_t ⊙ [|τ_t| >= thr_t]`` with ``thr_t`` the *global* threshold of model ``t`` from the statistics
    pass (``scope="global"``, :func:`global_trim_thresholds`) or the top-k threshold of this tensor alone
    (``scope="tensor"``)."""
    thresholds = global_trim_thresholds(x, densities) if scope == "global" else None
    out = []
    for t, (delta, density) in enumerate(zip(x.deltas, densities, strict=True)):
        if density >= 1.0:
            out.append(delta)
            continue
        thr = thresholds[t] if thresholds is not None else magnitude_threshold(delta, density)
        out.append(trim(delta, thr))
    return out
