"""Arcee Fusion — apply only a model's outlier-important changes to the base (Arcee AI, arcee.ai; mergekit 0.1.5
``arcee_fusion``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
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
    #: a base also listed under ``models`` counts here and is dropped later (its task vector is zero); :meth:`check`
    #: then requires exactly one model besides it
    max_models = 2

    def check(self, name: str, params: UnweightedParams, per_model: Sequence[UnweightedParams]) -> None:
        if len(per_model) != 1:
            raise ConfigError(f"merge method 'arcee_fusion' needs exactly 1 model besides the base, "
                              f"got {len(per_model)}")

    def merge(self, x: MergeInput[UnweightedParams]) -> torch.Tensor:
        if x.base.numel() == 0:
            return x.base.clone()
        return arcee_fusion(x.base, x.models[0])
