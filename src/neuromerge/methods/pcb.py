"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396). Official code:
``duguodong7/pcb-merging`` (``pcb-merging.py``, ``PCB_merge``). docs/methods/spec.md §4.

For the stacked task vectors ``τ`` (``T × d``), with per-task quantile clipping ``clip`` and per-task min-max
normalization ``norm`` (both along the ``d`` entries):

* ``|τ̃_i| = clip(|τ_i|, q_ε, q_{1−ε})`` (ε = ``clip_ratio``), ``τ̃_i = sign(τ_i)|τ̃_i|``;
* intra-balancing ``β_i = exp(T · norm(|τ̃_i|)²)``; inter-balancing ``γ_i = tanh(τ_i ⊙ Σ_j τ_j)``;
* ``m_i = norm(max(β_i ⊙ γ_i, q_{1−r}))`` (entries below the top-``r`` quantile → 0), ``r`` = ``density``;
* ``τ_M = Σ_i m_i ⊙ τ̃_i / max(Σ_i m_i, 1e-12)``, ``θ = θ0 + λ τ_M``.

The official code runs this on the whole model flattened into one vector per task; this module runs it on one
tensor at a time (see docs/methods/tsv_pcb_consensus.md for the consequences).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class PcbParams(MethodParams):
    """Parameters of PCB-Merging."""

    density: FiniteFloat = Field(0.1, gt=0, le=1,
                                 description="kept fraction r of the balancing scores (pcb_ratio) [code]")
    clip_ratio: FiniteFloat = Field(
        1e-4, ge=0, lt=0.5, description="quantile clipping of |τ| at both ends (min_ratio = max_ratio) [code]"
    )
    lam: FiniteFloat = Field(
        1.0, alias="lambda", description="scale λ of the merged task vector (tuned on validation in the paper)"
    )


def sorted_at(x: torch.Tensor, index: int) -> torch.Tensor:
    """``sort(x, dim=1)[:, index]`` as a ``(T, 1)`` column (via ``kthvalue``, no full sort)."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def quantile_clamp(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """Clamp each row of ``x`` (``T × d``) to ``[sorted[⌊d·min_ratio⌋], sorted[⌊d·(1−max_ratio) − 1⌋]]``, the
    index arithmetic of the official ``clamp`` (so for ``d < 1/max_ratio`` the largest entry is clipped to the
    second largest)."""
    d = x.shape[1]
    low = sorted_at(x, int(d * min_ratio))
    high = sorted_at(x, max(0, int(d * (1 - max_ratio) - 1)))
    return torch.clamp(x, low, high)


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x − min) / (max − min)`` per row; a constant row gives 0 (the official code gives NaN)."""
    low = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), torch.zeros((), dtype=x.dtype))


def pcb_scores(tau: torch.Tensor, density: float, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped task vectors ``τ̃`` and the balancing weights ``m`` (both ``T × d``) of PCB."""
    t, d = tau.shape
    clipped_abs = quantile_clamp(tau.abs(), clip_ratio, clip_ratio)
    intra = torch.exp(t * minmax_normalize(clipped_abs) ** 2)
    inter = torch.tanh(tau * tau.sum(dim=0, keepdim=True))
    scores = intra * inter
    weights = minmax_normalize(torch.clamp(scores, min=sorted_at(scores, int(d * (1 - density)))))
    return torch.sign(tau) * clipped_abs, weights


def weighted_average(clipped: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i m_i τ̃_i / max(Σ_i m_i, 1e-12)`` over the task dimension."""
    return (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)


def pcb_merge(tau: torch.Tensor, density: float = 0.1, clip_ratio: float = 1e-4) -> torch.Tensor:
    """PCB merged task vector of ``tau`` (``T × d``) → ``(d,)``."""
    return weighted_average(*pcb_scores(tau, density, clip_ratio))


@method
class PcbMerging(MergeMethod[PcbParams]):
    """PCB-Merging applied per tensor (docs/methods/spec.md §4)."""

    name = "pcb"
    aliases = ("pcb_merging",)
    Params = PcbParams
    summary = "parameter competition balancing: intra (exp) × inter (tanh) scores, top-r, weighted average"
    source = "Du et al. 2024, arXiv 2410.02396; official code duguodong7/pcb-merging"
    chunkable = False

    def merge(self, x: MergeInput[PcbParams]) -> torch.Tensor:
        p = x.params
        tau = x.weighted_deltas.reshape(len(x.deltas), -1)
        clipped, weights = pcb_scores(tau, p.density, p.clip_ratio)
        merged = weighted_average(clipped, weights)
        x.report["pcb_weight_density"] = float((weights > 0).float().mean())
        return x.base + p.lam * merged.reshape(x.base.shape)
