"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, arXiv 2405.07813; official code ``nik-dim/tall_masks``). Reference implementation:
FusionBench ``fusion_bench.method.tall_mask`` (``generate_task_masks``, ``construct_consensus_mask``).
docs/methods/spec.md §4.

With the multi-task vector ``τ_MTL = Σ_t τ_t`` (Task Arithmetic's sum):

* TALL mask of task ``t``: ``m_t = [|τ_t| > λ_tall · |τ_MTL − τ_t|]`` (the reference writes it
  ``|θ0 − θ_t| > λ_tall · |θ_MTL − θ_t|`` with ``θ_MTL = θ0 + τ_MTL``);
* consensus mask: ``m = [Σ_t m_t >= k]`` (``k = 2`` drops "catastrophic" and "selfish" weights);
* ``θ = θ0 + λ · (m ⊙ τ_MTL)``.

Elementwise, hence chunkable.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class ConsensusParams(MethodParams):
    """Parameters of Consensus / TALL-mask merging."""

    lam: FiniteFloat = Field(
        0.3, alias="lambda", description="scale λ of the masked multi-task vector (Task Arithmetic's 0.3)"
    )
    tall_lambda: FiniteFloat = Field(
        0.6, ge=0, description="λ_tall of the TALL masks (FusionBench tall_mask_lambda default 0.6)"
    )
    k: int = Field(2, ge=0, description="keep weights activated by at least k TALL masks (prun_thre_k)")


def tall_masks(tau: torch.Tensor, multi: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """Boolean ``(T, ...)`` TALL masks ``m_t = [|τ_t| > λ_tall · |τ_MTL − τ_t|]`` of stacked ``tau``."""
    return tau.abs() > tall_lambda * (multi.unsqueeze(0) - tau).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """``[Σ_t m_t >= k]``: the weights that at least ``k`` tasks use."""
    return masks.sum(dim=0) >= k


@method
class ConsensusMerging(MergeMethod[ConsensusParams]):
    """Consensus merging (TALL masks) over Task Arithmetic (docs/methods/spec.md §4)."""

    name = "consensus"
    aliases = ("consensus_merging", "tall_consensus")
    Params = ConsensusParams
    summary = "Task Arithmetic restricted to the weights at least k tasks' TALL masks select"
    source = "Wang et al. 2024, arXiv 2405.07813; official code nik-dim/tall_masks; FusionBench tall_mask"
    chunkable = True

    def merge(self, x: MergeInput[ConsensusParams]) -> torch.Tensor:
        p = x.params
        tau = x.weighted_deltas
        multi = tau.sum(dim=0)
        masks = tall_masks(tau, multi, p.tall_lambda)
        keep = consensus_mask(masks, p.k)
        x.report["tall_mask_density"] = float(masks.float().mean())
        x.report["consensus_kept_fraction"] = float(keep.float().mean())
        return x.base + p.lam * torch.where(keep, multi, torch.zeros((), dtype=multi.dtype))
