"""RAM / RAM+ — Reinforced Agent Merging (arXiv 2601.13572). Peer: mergekit 0.1.5 ``ram`` and ``ramplus_tl`` (the
tensor-local variant of RAM+, whose overlap statistics are counted per tensor)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from ..tensors.ram import ram_merge_deltas, ramplus_merge_deltas
from .base import MergeInput, MergeMethod
from .model_stock import UnweightedParams
from .registry import method


class RamParams(UnweightedParams):
    epsilon: FiniteFloat = Field(1e-5, ge=0, description="a task-vector entry contributes when |τ_t| > epsilon")


class RamPlusParams(RamParams):
    r: FiniteFloat = Field(0.1, description="amplification rate of a model's unique entries")
    alpha: FiniteFloat = Field(0.2, ge=0, description="upper clamp of the overlap ratio ρ_t")


@method
class Ram(MergeMethod[RamParams]):
    """``θ = θ0 + Σ_t τ_t [|τ_t| > ε] / max(c, 1)``, ``c`` the number of models whose ``|τ_t| > ε`` at the entry: an
    entry one model changes keeps its value, one several change is their mean
    (:func:`~neuromerge.tensors.ram.ram_merge_deltas`). Elementwise. ``weight`` is not used (mergekit ignores it)."""

    name = "ram"
    Params = RamParams
    summary = "mean of the task vectors over the models that change each entry (|τ| > ε)"
    source = "arXiv 2601.13572; mergekit 0.1.5 ram"
    chunkable = True

    def merge(self, x: MergeInput[RamParams]) -> torch.Tensor:
        return x.base + ram_merge_deltas(x.deltas, x.params.epsilon)


@method
class RamPlusTl(MergeMethod[RamPlusParams]):
    """RAM with model ``t``'s unique entries (``c = 1``) scaled by ``λ_t = 1 + r · clamp(ρ_t, 0, α)``, ``ρ_t`` the
    ratio of its shared (``c > 1``) to its unique contributing entries over the tensor
    (:func:`~neuromerge.tensors.ram.ramplus_merge_deltas`); shared entries are averaged as in RAM. Per tensor (the
    counts), so not chunkable. ``weight`` is not used (mergekit ignores it)."""

    name = "ramplus_tl"
    Params = RamPlusParams
    summary = "RAM with each model's unique entries amplified by its overlap ratio (per tensor)"
    source = "arXiv 2601.13572; mergekit 0.1.5 ramplus_tl"
    chunkable = False

    def merge(self, x: MergeInput[RamPlusParams]) -> torch.Tensor:
        p = x.params
        return x.base + ramplus_merge_deltas(x.deltas, p.epsilon, p.r, p.alpha)
