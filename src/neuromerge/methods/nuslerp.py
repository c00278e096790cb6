"""NuSLERP — SLERP of two models by weights, optionally of their task vectors, whole or row by row (mergekit 0.1.5
``nuslerp``; formula: Shoemake 1985)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field

from ..tensors.spherical import nuslerp as nuslerp_tensors
from .base import MergeInput
from .define import merge_function

#: |w_0 + w_1| below this gives t = 0.5 (mergekit)
WEIGHT_SUM_EPS = 1e-6


def nuslerp_t(weights: Sequence[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``, or 0.5 when ``|w_0 + w_1| < 1e-6`` (mergekit)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else weights[1] / total


@merge_function(
    name="nuslerp", summary="SLERP of two models (or of their task vectors) with t = w_1/(w_0+w_1)",
    source="mergekit 0.1.5 nuslerp; Shoemake 1985", chunkable=False, needs_base=False, min_models=2, max_models=2,
)
def nuslerp(
    x: MergeInput[Any], weights: Sequence[float], *,
    nuslerp_row_wise: Annotated[bool, Field(
        description="with nuslerp_flatten false: one angle per column (input feature) instead of per row")] = False,
    nuslerp_flatten: Annotated[bool, Field(description="one angle for the whole tensor (mergekit's default)")] = True,
) -> torch.Tensor:
    """``t = w_1 / (w_0 + w_1)`` from the two models' ``weight``; without a base ``θ = nuslerp(t, θ_0, θ_1)``,
    with one ``θ = θ0 + nuslerp(t, τ_0, τ_1)`` (SLERP of the task vectors). ``nuslerp(t, a, b) = sin((1−t)Ω)/sin Ω
    · a + sin(tΩ)/sin Ω · b`` (linear where ``a``, ``b`` are colinear), ``Ω`` the angle between the flattened tensors
    (``nuslerp_flatten``, default), else between rows (or columns with ``nuslerp_row_wise``) of the canonical
    ``(out, in)`` matrix (:func:`~neuromerge.tensors.spherical.nuslerp`). Exactly two models besides the base.

    Processed whole (not in row chunks), whatever the mode: the row mode would allow chunks, but the decorator's
    ``chunkable`` is one value per method (the tensors are as large as the ones SLERP takes whole)."""
    t = nuslerp_t(weights)
    dim = 0 if nuslerp_row_wise else -1
    if not x.base_given:
        return nuslerp_tensors(t, x.models[0], x.models[1], dim=dim, flatten=nuslerp_flatten)
    return x.base + nuslerp_tensors(t, x.deltas[0], x.deltas[1], dim=dim, flatten=nuslerp_flatten)


Nuslerp = nuslerp
