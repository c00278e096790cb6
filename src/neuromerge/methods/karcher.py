"""Karcher mean — the Riemannian (Fréchet) mean of the models' tensors on the unit sphere, rescaled by their mean
norm (Karcher 1977; mergekit 0.1.5 ``karcher``, reference arXiv 2603.04972)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from ..tensors.spherical import karcher_mean
from .base import MergeInput, MergeMethod
from .model_stock import UnweightedParams
from .registry import method


class KarcherParams(UnweightedParams):
    max_iter: int = Field(10, ge=1, description="maximum Riemannian gradient steps")
    tol: FiniteFloat = Field(1e-5, gt=0, description="stop when the gradient norm is below tol (also the norm "
                             "below which an input is left out of the direction)")


@method
class Karcher(MergeMethod[KarcherParams]):
    """``θ = (1/N Σ_t ‖θ_t‖) · μ`` with ``μ`` the Karcher mean of the unit vectors ``θ_t/‖θ_t‖`` of the N listed
    models (equal weights; :func:`~neuromerge.tensors.spherical.karcher_mean`, at most ``max_iter`` steps). It averages
    the models' weights: a base is averaged only when listed under ``models`` (as ``linear``)."""

    name = "karcher"
    Params = KarcherParams
    summary = "Riemannian mean on the sphere of the models' tensors, scaled by their mean norm"
    source = "Karcher 1977; mergekit 0.1.5 karcher (arXiv 2603.04972)"
    chunkable = False
    min_models = 1
    needs_base = False
    averages_weights = True

    def merge(self, x: MergeInput[KarcherParams]) -> torch.Tensor:
        n = len(x.models)
        if n == 1:
            return x.models[0].clone()
        return karcher_mean(list(x.models), [1.0 / n] * n, max_iter=x.params.max_iter, tol=x.params.tol)
