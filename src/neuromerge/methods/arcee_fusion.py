"""Arcee Fusion — apply only a model's outlier-important changes to the base (Arcee AI, arcee.ai; mergekit 0.1.5
``arcee_fusion``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tensors.fusion import arcee_fusion as fuse
from .define import merge_function
from .model_stock import UnweightedParams


@merge_function(
    name="arcee_fusion", summary="keep a model's changes whose |τ|·KL importance is above Tukey's upper fence",
    source="Arcee AI (arcee.ai); mergekit 0.1.5 arcee_fusion", chunkable=False, min_models=1, max_models=1,
    params_base=UnweightedParams,
)
def arcee_fusion(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """``θ = θ0 + τ ⊙ [s >= Q2(s) + 1.5 (Q3(s) − Q1(s))]`` with importance ``s = |τ| · KL(softmax(θ1) ‖
    softmax(θ0))`` per row (last axis of the canonical layout) and the quartiles taken as order statistics
    ``sorted(s)[⌊q (n−1)⌋]`` over the tensor (:func:`~neuromerge.tensors.fusion.arcee_fusion`). One model and a
    base; no parameters."""
    if base.numel() == 0:
        return base.clone()
    return fuse(base, models[0])


ArceeFusion = arcee_fusion
ArceeFusion.ignored_params = frozenset({"weight"})  # mergekit declares no weight here and ignores it
