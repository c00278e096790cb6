"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv
2306.01708).

Official code: ``prateeksr/ties-merging``; peers: mergekit ``ties`` (per-tensor trim), PEFT
``merge_utils.ties``. The trim (:data:`MAGNITUDE`) and the parameters; the method is a row of
:mod:`neuromerge.methods.variants`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from ._common import TrimScope, trimmed_deltas
from .base import MergeInput
from .task_arithmetic import ConsensusCombineParams, Sparsifier


def density_field(default: float, note: str) -> Any:
    """The per-model ``density`` field (kept fraction, ``0 < density <= 1``)."""
    return Field(default, gt=0, le=1, description=f"kept fraction of each task vector, per model ({note})")


class TiesParams(ConsensusCombineParams):
    density: FiniteFloat = density_field(0.2, "TIES paper k = 20 %; mergekit's default is 1.0 = no trim")
    scope: TrimScope = Field(
        "global",
        description="trim threshold over the whole model per task (global, TIES paper) or per tensor "
        "(tensor, mergekit / PEFT)",
    )


def magnitude_densities(params: TiesParams, per_model: Sequence[TiesParams]) -> list[float] | None:
    """The densities of the global trim (``scope: global``), whose thresholds the statistics pass computes."""
    if params.scope != "global":
        return None
    return [p.density for p in per_model]


def magnitude_whole_tensor_reasons(params: TiesParams) -> list[str]:
    return ["scope='tensor' (per-tensor top-k)"] if params.scope == "tensor" else []


def magnitude_trim(x: MergeInput[TiesParams]) -> list[torch.Tensor]:
    """``τ̂_t = τ_t ⊙ [|τ_t| >= thr_t]`` (global threshold, or this tensor's top-k as mergekit)."""
    densities = [p.density for p in x.per_model]
    if x.params.scope == "tensor" and x.base.numel() > 0:
        # mergekit: a positive density keeps at least one entry of each tensor, k = max(1, ⌊d·n⌋)
        densities = [max(d, 1.0 / x.base.numel()) for d in densities]
    return trimmed_deltas(x, densities, x.params.scope)


#: TIES' trim as a sparsifier of the variants table
MAGNITUDE = Sparsifier(magnitude_trim, per_model=frozenset({"density"}), global_densities=magnitude_densities,
                       whole_tensor_reasons=magnitude_whole_tensor_reasons)

TIES_DOC = """TIES: trim, elect sign, disjoint merge.

1. Trim: ``τ̂_t = τ_t ⊙ [|τ_t| >= thr_t]``, ``thr_t`` the ``⌊density_t · n⌋``-th largest ``|τ_t|`` over
   the whole model (``scope: global``, from the engine's statistics pass) or over this tensor (``scope:
   tensor``, keeping ``max(1, ⌊density_t · n⌋)`` entries as mergekit); ties at the threshold are kept.
2. Weight: ``τ'_t = w_t τ̂_t`` (mergekit's order: weights after the trim, before the election).
3. Elect: ``γ = sign(Σ_t τ'_t)`` (``sign_method: count``: the majority of ``sign(τ'_t)``); a coordinate
   whose elected sign is 0 takes the majority sign of the tensor (``zero_sign: majority``, the official
   TIES rule applied per tensor) or ``+1`` (``zero_sign: positive``, mergekit / PEFT).
4. Disjoint merge, ``m_t = [sign(τ'_t) = γ]``: ``dis-mean`` ``τ_m = Σ_t m_t τ'_t / Σ_t m_t w_t`` (the
   plain disjoint mean when all ``w_t = 1``), ``dis-sum`` ``τ_m = Σ_t m_t τ'_t``.
5. ``θ = θ0 + λ τ_m`` (λ default 1).
"""
