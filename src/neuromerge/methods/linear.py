"""Weight averaging / linear merge (Wortsman et al. 2022, "Model soups", arXiv 2203.05482; mergekit
``linear``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from ..errors import ConfigError
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="divide Σ_t w_t θ_t by Σ_t w_t (a weighted mean)")


@method
class Linear(MergeMethod[LinearParams]):
    """``θ = Σ_t w_t θ_t / Σ_t w_t`` (``normalize: false``: ``Σ_t w_t θ_t``); the base is not used unless it
    is listed among the models (then it is averaged like any other model, as in mergekit). With unit weights this
    is the uniform soup ``mean_t θ_t``.

    A zero weight sum with ``normalize: true`` is an error (mergekit would divide by zero)."""

    name = "linear"
    aliases = ("average", "weight_average")
    Params = LinearParams
    summary = "weighted average Σ w_t θ_t / Σ w_t"
    source = "Wortsman et al. 2022, arXiv 2203.05482; mergekit linear"
    chunkable = True
    needs_base = False
    averages_weights = True

    def check(self, name: str, params: LinearParams, per_model: Sequence[LinearParams]) -> None:
        if params.normalize and float(sum(p.weight for p in per_model)) == 0.0:
            raise ConfigError(f"{name}: the weights sum to 0, cannot normalize (set normalize: false)")

    def merge(self, x: MergeInput[LinearParams]) -> torch.Tensor:
        weights = x.weights
        out = torch.zeros_like(x.base)
        for w, model in zip(weights, x.models, strict=True):
            out.add_(model, alpha=w)
        if not x.params.normalize:
            return out
        total = float(sum(weights))
        if total == 0.0:
            raise ConfigError(f"{x.name}: the weights sum to 0, cannot normalize (set normalize: false)")
        return out / total
