"""Karcher mean — the Riemannian (Fréchet) mean of the models' tensors on the unit sphere, rescaled by their mean
norm (Karcher 1977; mergekit 0.1.5 ``karcher``, reference arXiv 2603.04972)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..tensors.spherical import karcher_mean
from .define import merge_function
from .model_stock import UnweightedParams


@merge_function(
    name="karcher", summary="Riemannian mean on the sphere of the models' tensors, scaled by their mean norm",
    source="Karcher 1977; mergekit 0.1.5 karcher (arXiv 2603.04972)", chunkable=False, needs_base=False,
    averages_weights=True, min_models=1, params_base=UnweightedParams,
)
def karcher(
    models: Sequence[torch.Tensor], *,
    max_iter: Annotated[int, Field(ge=1, description="maximum Riemannian gradient steps")] = 10,
    tol: Annotated[float, Field(gt=0, description="stop when the gradient norm is below tol (also the norm below "
                                "which an input is left out of the direction)")] = 1e-5,
) -> torch.Tensor:
    """``θ = (1/N Σ_t ‖θ_t‖) · μ`` with ``μ`` the Karcher mean of the unit vectors ``θ_t/‖θ_t‖`` of the N listed
    models (equal weights; :func:`~neuromerge.tensors.spherical.karcher_mean`, at most ``max_iter`` steps). It averages
    the models' weights: a base is averaged only when listed under ``models`` (as ``linear``)."""
    n = len(models)
    if n == 1:
        return models[0].clone()
    return karcher_mean(list(models), [1.0 / n] * n, max_iter=max_iter, tol=tol)


Karcher = karcher
Karcher.ignored_params = frozenset({"weight"})  # mergekit declares no weight here and ignores it
