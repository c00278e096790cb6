"""Passthrough: the one input's tensor, unchanged or scaled (mergekit 0.1.5 ``passthrough``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from .define import PerModel, merge_function


@merge_function(
    name="passthrough", summary="copy the one model's tensor (× scale)",
    source="mergekit passthrough (Goddard et al. 2024, arXiv 2403.13257)", chunkable=True, needs_base=False,
    averages_weights=True,  # a base listed as the model is that model, not a zero task vector
    min_models=1, max_models=1,
)
def passthrough(
    models: Sequence[torch.Tensor], *,
    scale: Annotated[PerModel[float | None], Field(description="multiplier of the copied tensor (none: as it is)")]
    = None,
) -> torch.Tensor:
    """``θ = θ_1`` (``scale`` set: ``θ = scale · θ_1``): the single model's tensor, as mergekit 0.1.5's
    ``passthrough_merge_method`` (``entry.tensor if scale is None else entry.tensor * scale``).

    Exactly one model: with ``slices`` each slice names one source (the frankenmerge / depth-upscaling configs);
    with ``models`` the one model is copied. A ``base_model`` that is that model is the model itself. ``weight`` is
    accepted and ignored with a warning (mergekit's passthrough declares no weight)."""
    value = scale[0]
    return models[0] if value is None else models[0] * value


Passthrough = passthrough
Passthrough.ignored_params = frozenset({"weight"})
