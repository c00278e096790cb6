"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv
2306.01708).

Official code: ``prateeksr/ties-merging``; peers: mergekit ``ties`` (per-tensor trim), PEFT
``merge_utils.ties``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from .. import kernels
from ..numeric import FiniteFloat
from ._common import TrimScope, fused_trim_applies, global_trim_thresholds, trimmed_deltas
from .base import MergeInput
from .registry import method
from .task_arithmetic import ConsensusCombineParams, TaskVectorMerge, require_whole_tensor


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


@method
class Ties(TaskVectorMerge[TiesParams]):
    """TIES: trim, elect sign, disjoint merge.

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

    name = "ties"
    Params = TiesParams
    per_model_params = frozenset({"weight", "density"})
    summary = "trim top-k of |τ_t| (global), elect signs, disjoint mean; θ0 + λ τ_m"
    source = "Yadav et al. 2023, arXiv 2306.01708 (prateeksr/ties-merging); mergekit ties; PEFT ties"
    chunkable = True
    sparsifying = True

    def global_densities(self, params: TiesParams, per_model: Sequence[TiesParams]) -> list[float] | None:
        if params.scope != "global":
            return None
        return [p.density for p in per_model]

    def whole_tensor_reasons(self, params: TiesParams) -> list[str]:
        extra = ["scope='tensor' (per-tensor top-k)"] if params.scope == "tensor" else []
        return [*super().whole_tensor_reasons(params), *extra]

    def sparsify(self, x: MergeInput[TiesParams]) -> list[torch.Tensor]:
        densities = [p.density for p in x.per_model]
        if x.params.scope == "tensor" and x.base.numel() > 0:
            # mergekit: a positive density keeps at least one entry of each tensor, k = max(1, ⌊d·n⌋)
            densities = [max(d, 1.0 / x.base.numel()) for d in densities]
        return trimmed_deltas(x, densities, x.params.scope)

    def fuses(self, params: TiesParams, per_model: Sequence[TiesParams]) -> bool:
        """The fused kernel trims by given thresholds: global ones from the statistics pass (or none, density 1)."""
        return kernels.available() and fused_trim_applies(params.scope, [p.density for p in per_model])

    def merge_fused(self, x: MergeInput[TiesParams], out_dtype: torch.dtype) -> tuple[torch.Tensor, int] | None:
        """:meth:`merge` in one pass (:func:`neuromerge.kernels.ties`)."""
        p = x.params
        for reason in self.whole_tensor_reasons(p):
            require_whole_tensor(x, f"{self.name} with {reason}")
        if not self.fuses(p, x.per_model) or not kernels.supports(x.base, x.models):
            return None
        thresholds = global_trim_thresholds(x, [m.density for m in x.per_model])
        res = kernels.ties(
            x.base, x.models, x.weights, thresholds, p.lam, sign_count=p.sign_method == "count",
            zero_sign=None if p.zero_sign == "majority" else 1.0, variant=p.variant,
            out_dtype=kernels.output_dtype(out_dtype),
        )
        if res.out is None:
            return None
        n = x.base.numel()
        x.report["sign_conflict"] = res.counts["conflicts"] / n if n else 0.0
        if n:
            fractions = [res.counts[f"kept_{t}"] / n for t in range(len(x.models))]
            x.report["kept_density"] = sum(fractions) / len(fractions)
        else:
            x.report["kept_density"] = 0.0
        return res.out, res.nonfinite_out
