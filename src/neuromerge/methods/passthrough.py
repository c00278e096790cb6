"""Passthrough: the one input's tensor, unchanged or scaled (mergekit 0.1.5 ``passthrough``)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class PassthroughParams(MethodParams):
    weight: FiniteFloat = Field(1.0, description="accepted and unused (mergekit's passthrough has no weight)")
    scale: FiniteFloat | None = Field(None, description="multiplier of the copied tensor (none: copied as it is)")


@method
class Passthrough(MergeMethod[PassthroughParams]):
    """``θ = θ_1`` (``scale`` set: ``θ = scale · θ_1``): the single model's tensor, as mergekit 0.1.5's
    ``passthrough_merge_method`` (``entry.tensor if scale is None else entry.tensor * scale``).

    Exactly one model: with ``slices`` each slice names one source (the frankenmerge / depth-upscaling configs);
    with ``models`` the one model is copied. A ``base_model`` that is that model is the model itself; ``weight`` is
    accepted and unused (mergekit's passthrough declares no weight)."""

    name = "passthrough"
    Params = PassthroughParams
    summary = "copy the one model's tensor (× scale)"
    source = "mergekit passthrough (Goddard et al. 2024, arXiv 2403.13257)"
    chunkable = True
    min_models = 1
    max_models = 1
    needs_base = False
    averages_weights = True  # a base listed as the model is that model, not a zero task vector
    per_model_params = frozenset({"weight", "scale"})

    def merge(self, x: MergeInput[PassthroughParams]) -> torch.Tensor:
        scale = x.per_model[0].scale
        return x.models[0] if scale is None else x.models[0] * scale
