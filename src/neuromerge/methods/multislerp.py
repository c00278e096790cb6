"""Multi-SLERP — barycentric spherical interpolation of any number of models (C. Goddard, "Multi-SLERP",
goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit 0.1.5 ``multislerp``)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import NeuromergeError
from ..numeric import FiniteFloat
from ..tensors.spherical import multislerp
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class MultislerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: FiniteFloat = Field(1e-8, gt=0, description="added to norms for numerical stability (mergekit)")


@method
class Multislerp(MergeMethod[MultislerpParams]):
    """:func:`~neuromerge.tensors.spherical.multislerp` of the models' flattened tensors ``θ_t`` (no base) or task
    vectors ``τ_t`` (with a base, then ``θ = θ0 + multislerp(τ)``) with their ``weight``s: project the unit vectors
    onto the tangent space at their normalised weighted mean ``μ``, average there, map back with the exponential map
    and scale by ``Σ w_t ‖x_t‖``. One model is returned as is."""

    name = "multislerp"
    Params = MultislerpParams
    summary = "barycentric SLERP of several models (or task vectors) through the tangent space at their mean"
    source = "Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit 0.1.5 multislerp"
    chunkable = False
    min_models = 1
    needs_base = False

    def merge(self, x: MergeInput[MultislerpParams]) -> torch.Tensor:
        p = x.params
        inputs = x.deltas if x.base_given else list(x.models)
        if len(inputs) == 1:
            return x.models[0].clone()
        try:
            merged = multislerp(inputs, x.weights, normalize_weights=p.normalize_weights, eps=p.eps)
        except ValueError as err:
            raise NeuromergeError(f"{x.name}: {err}") from None
        return x.base + merged if x.base_given else merged
