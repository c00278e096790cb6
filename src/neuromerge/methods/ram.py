"""RAM / RAM+ — Reinforced Agent Merging (arXiv 2601.13572). Peer: mergekit 0.1.5 ``ram`` and ``ramplus_tl`` (the
tensor-local variant of RAM+, whose overlap statistics are counted per tensor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..tensors.ram import ram_merge_deltas, ramplus_merge_deltas
from .define import merge_function
from .model_stock import UnweightedParams

Epsilon = Annotated[float, Field(ge=0, description="a task-vector entry contributes when |τ_t| > epsilon")]


@merge_function(
    name="ram", summary="mean of the task vectors over the models that change each entry (|τ| > ε)",
    source="arXiv 2601.13572; mergekit 0.1.5 ram", chunkable=True, params_base=UnweightedParams,
)
def ram(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """``θ = θ0 + Σ_t τ_t [|τ_t| > ε] / max(c, 1)``, ``c`` the number of models whose ``|τ_t| > ε`` at the entry: an
    entry one model changes keeps its value, one several change is their mean
    (:func:`~neuromerge.tensors.ram.ram_merge_deltas`). Elementwise. ``weight`` is not used (mergekit ignores it)."""
    return base + ram_merge_deltas(deltas, epsilon)


@merge_function(
    name="ramplus_tl", summary="RAM with each model's unique entries amplified by its overlap ratio (per tensor)",
    source="arXiv 2601.13572; mergekit 0.1.5 ramplus_tl", chunkable=False, params_base=UnweightedParams,
    class_name="RamPlusTl",
)
def ramplus_tl(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *,
    r: Annotated[float, Field(description="amplification rate of a model's unique entries")] = 0.1,
    alpha: Annotated[float, Field(ge=0, description="upper clamp of the overlap ratio ρ_t")] = 0.2,
    epsilon: Epsilon = 1e-5,
) -> torch.Tensor:
    """RAM with model ``t``'s unique entries (``c = 1``) scaled by ``λ_t = 1 + r · clamp(ρ_t, 0, α)``, ``ρ_t`` the
    ratio of its shared (``c > 1``) to its unique contributing entries over the tensor
    (:func:`~neuromerge.tensors.ram.ramplus_merge_deltas`); shared entries are averaged as in RAM. Per tensor (the
    counts), so not chunkable. ``weight`` is not used (mergekit ignores it)."""
    return base + ramplus_merge_deltas(deltas, epsilon, r, alpha)


Ram = ram
Ram.ignored_params = frozenset({"weight"})  # mergekit declares no weight here and ignores it
RamPlusTl = ramplus_tl
RamPlusTl.ignored_params = frozenset({"weight"})  # mergekit declares no weight here and ignores it
