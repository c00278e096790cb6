"""SCE — Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990;
official code ``fanqiwan/FuseAI``). Peer: mergekit 0.1.5 ``sce``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..tensors.sce import sce_merge_deltas
from .define import merge_function
from .model_stock import UnweightedParams


@merge_function(
    name="sce", summary="select high-variance entries, weight models by mean τ², erase sign conflicts, weighted mean",
    source="Wan et al. 2024, arXiv 2408.07990 (fanqiwan/FuseAI); mergekit 0.1.5 sce", chunkable=False,
    params_base=UnweightedParams,
)
def sce(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], *,
    select_topk: Annotated[float, Field(ge=0, le=1, description="fraction of the entries with non-zero variance "
                                        "across models that are kept (largest variance first); 1 keeps all "
                                        "(mergekit's default)")] = 1.0,
) -> torch.Tensor:
    """Per tensor: select the ``select_topk`` share of entries of largest variance across the task vectors, weight
    model ``t`` by ``mean(τ̂_t²) / Σ_s mean(τ̂_s²)``, erase entries disagreeing with ``sign(Σ_t τ̂_t)`` (``+1`` at 0)
    and take the weighted mean of the rest: ``θ = θ0 + Σ_t w_t m_t τ̂_t / max(Σ_t w_t m_t, 1e-6)``
    (:func:`~neuromerge.tensors.sce.sce_merge_deltas`). Per-model ``weight`` is not used (mergekit ignores it)."""
    return base + sce_merge_deltas(torch.stack(list(deltas)), select_topk)


Sce = sce
Sce.ignored_params = frozenset({"weight"})  # mergekit declares no weight here and ignores it
