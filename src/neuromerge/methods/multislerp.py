"""Multi-SLERP — barycentric spherical interpolation of any number of models (C. Goddard, "Multi-SLERP",
goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit 0.1.5 ``multislerp``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field

from ..errors import NeuromergeError
from ..tensors.spherical import multislerp as multislerp_tensors
from .base import MergeInput
from .define import merge_function


@merge_function(
    name="multislerp", summary="barycentric SLERP of several models (or task vectors) through the tangent space at "
    "their mean", source="Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit 0.1.5 multislerp",
    chunkable=False, needs_base=False, min_models=1,
)
def multislerp(
    x: MergeInput[Any], weights: Sequence[float], *,
    normalize_weights: Annotated[bool, Field(description="divide the weights by their sum")] = True,
    eps: Annotated[float, Field(gt=0, description="added to norms for numerical stability (mergekit)")] = 1e-8,
) -> torch.Tensor:
    """:func:`~neuromerge.tensors.spherical.multislerp` of the models' flattened tensors ``θ_t`` (no base) or task
    vectors ``τ_t`` (with a base, then ``θ = θ0 + multislerp(τ)``) with their ``weight``s: project the unit vectors
    onto the tangent space at their normalised weighted mean ``μ``, average there, map back with the exponential map
    and scale by ``Σ w_t ‖x_t‖``. One model is returned as is. Antipodal inputs whose weights cancel (three or more)
    are an error naming the tensor."""
    inputs = x.deltas if x.base_given else list(x.models)
    if len(inputs) == 1:
        return x.models[0].clone()
    try:
        merged = multislerp_tensors(inputs, weights, normalize_weights=normalize_weights, eps=eps)
    except ValueError as err:
        raise NeuromergeError(f"{x.name}: {err}") from None
    return x.base + merged if x.base_given else merged


Multislerp = multislerp
