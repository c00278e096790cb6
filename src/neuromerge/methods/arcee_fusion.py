"""Arcee Fusion — apply only a model's outlier-important changes to the base (Arcee AI, arcee.ai; mergekit 0.1.5
``arcee_fusion``)."""

from __future__ import annotations

import torch

from ..tensors.fusion import arcee_fusion
from .base import MergeInput, MergeMethod
from .model_stock import UnweightedParams
from .registry import method


@method
class ArceeFusion(MergeMethod[UnweightedParams]):
    """``θ = θ0 + τ ⊙ [s >= Q2(s) + 1.5 (Q3(s) − Q1(s))]`` with importance ``s = |τ| · KL(softmax(θ1) ‖
    softmax(θ0))`` per row (last axis of the canonical layout) and the quartiles taken as order statistics
    ``sorted(s)[⌊q (n−1)⌋]`` over the tensor (:func:`~neuromerge.tensors.fusion.arcee_fusion`). One model and a
    base; no parameters."""

    name = "arcee_fusion"
    Params = UnweightedParams
    summary = "keep a model's changes whose |τ|·KL importance is above Tukey's upper fence"
    source = "Arcee AI (arcee.ai); mergekit 0.1.5 arcee_fusion"
    chunkable = False
    min_models = 1
    max_models = 1

    def merge(self, x: MergeInput[UnweightedParams]) -> torch.Tensor:
        if x.base.numel() == 0:
            return x.base.clone()
        return arcee_fusion(x.base, x.models[0])
