"""Helpers shared by several method modules (not a method itself)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..tensors.selection import magnitude_threshold, trim
from .base import MergeInput

TrimScope = Literal["global", "tensor"]


def trimmed_deltas(x: MergeInput, densities: Sequence[float], scope: TrimScope) -> list[torch.Tensor]:
    """``τ̂_t = τ_t ⊙ [|τ_t| >= thr_t]`` with ``thr_t`` the *global* threshold of model ``t`` from the statistics
    pass (``scope="global"``) or the top-k threshold of this tensor alone (``scope="tensor"``)."""
    out = []
    for t, (delta, density) in enumerate(zip(x.deltas, densities, strict=True)):
        if density >= 1.0:
            out.append(delta)
            continue
        if scope == "global":
            if x.stats is None:  # pragma: no cover - the engine computes stats when global_densities asks
                raise RuntimeError(f"{x.name}: global trim requested but no statistics were computed")
            thr = x.stats.thresholds[t]
        else:
            thr = magnitude_threshold(delta, density)
        out.append(trim(delta, thr))
    return out
