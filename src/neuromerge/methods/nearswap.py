"""NearSwap (alchemonaut 2024; mergekit ``nearswap``): take the model's value where it is near the base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from .base import UnweightedParams
from .define import merge_function


@merge_function(
    name="nearswap", summary="θ = w θ_1 + (1 − w) θ0, w = clamp(t / |θ0 − θ_1|, 0, 1): swap in near entries",
    source="alchemonaut 2024, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit nearswap",
    min_models=1, max_models=1, params_base=UnweightedParams, ignored_params=("weight",),
)
def nearswap(
    base: torch.Tensor, models: Sequence[torch.Tensor], *,
    t: Annotated[float, Field(gt=0, description="similarity threshold: entries closer than t take the model's "
                              "value (0.0001 as in QuartetAnemoi-70B-t0.0001; mergekit has no default)")] = 1e-4,
) -> torch.Tensor:
    """``θ = w ⊙ θ_1 + (1 − w) ⊙ θ0`` with ``w = clamp(t / max(|θ0 − θ_1|, 1e-6), 0, 1)`` elementwise: an entry
    within ``t`` of the base takes the model's value, one far from it keeps the base's, in between they are mixed
    in proportion ``t / |θ0 − θ_1|``. mergekit ``nearswap`` (``merge_methods/nearswap.py``)."""
    weight = (t / (base - models[0]).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * models[0] + (1 - weight) * base
