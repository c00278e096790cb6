"""Weight averaging / linear merge (Wortsman et al. 2022, "Model soups", arXiv 2203.05482; mergekit
``linear``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..errors import ConfigError
from .base import MethodParams
from .define import merge_function


def _refuse_zero_sum(name: str, params: MethodParams, per_model: Sequence[MethodParams]) -> None:
    """A zero weight sum with ``normalize: true`` cannot be normalised."""
    if params.normalize and float(sum(p.weight for p in per_model)) == 0.0:  # type: ignore[attr-defined]
        raise ConfigError(f"{name}: the weights sum to 0, cannot normalize (set normalize: false)")


@merge_function(
    name="linear", aliases=("average", "weight_average"), summary="weighted average Σ w_t θ_t / Σ w_t",
    source="Wortsman et al. 2022, arXiv 2203.05482; mergekit linear", chunkable=True, needs_base=False,
    averages_weights=True, check=_refuse_zero_sum,
)
def linear(
    name: str, models: Sequence[torch.Tensor], weights: Sequence[float], *,
    normalize: Annotated[bool, Field(description="divide Σ_t w_t θ_t by Σ_t w_t (a weighted mean)")] = True,
) -> torch.Tensor:
    """``θ = Σ_t w_t θ_t / Σ_t w_t`` (``normalize: false``: ``Σ_t w_t θ_t``); the base is not used unless it
    is listed among the models (then it is averaged like any other model, as in mergekit). With unit weights this
    is the uniform soup ``mean_t θ_t``.

    A zero weight sum with ``normalize: true`` is an error (mergekit would divide by zero)."""
    out = torch.zeros_like(models[0])
    for w, model in zip(weights, models, strict=True):
        out.add_(model, alpha=w)
    if not normalize:
        return out
    total = float(sum(weights))
    if total == 0.0:
        raise ConfigError(f"{name}: the weights sum to 0, cannot normalize (set normalize: false)")
    return out / total


Linear = linear
LinearParams = Linear.Params
