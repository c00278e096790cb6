"""NuSLERP — SLERP of two models by weights, optionally of their task vectors, whole or row by row (mergekit 0.1.5
``nuslerp``; formula: Shoemake 1985)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from ..errors import ConfigError
from ..tensors.spherical import nuslerp
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method

#: |w_0 + w_1| below this gives t = 0.5 (mergekit)
WEIGHT_SUM_EPS = 1e-6


class NuslerpParams(MethodParams):
    nuslerp_row_wise: bool = Field(
        False, description="with nuslerp_flatten false: one angle per column (input feature) instead of per row")
    nuslerp_flatten: bool = Field(True, description="one angle for the whole tensor (mergekit's default)")


def nuslerp_t(weights: Sequence[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``, or 0.5 when ``|w_0 + w_1| < 1e-6`` (mergekit)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else weights[1] / total


@method
class Nuslerp(MergeMethod[NuslerpParams]):
    """``t = w_1 / (w_0 + w_1)`` from the two models' ``weight``; without a base ``θ = nuslerp(t, θ_0, θ_1)``,
    with one ``θ = θ0 + nuslerp(t, τ_0, τ_1)`` (SLERP of the task vectors). ``nuslerp(t, a, b) = sin((1−t)Ω)/sin Ω
    · a + sin(tΩ)/sin Ω · b`` (linear where ``a``, ``b`` are colinear), ``Ω`` the angle between the flattened tensors
    (``nuslerp_flatten``, default), else between rows (or columns with ``nuslerp_row_wise``) of the canonical
    ``(out, in)`` matrix. Exactly two models besides the base."""

    name = "nuslerp"
    Params = NuslerpParams
    summary = "SLERP of two models (or of their task vectors) with t = w_1/(w_0+w_1)"
    source = "mergekit 0.1.5 nuslerp; Shoemake 1985"
    chunkable = False
    min_models = 2
    #: not ``max_models = 2``: that pair rule is SLERP's (a base listed under ``models`` is one of the two); here a
    #: listed base is dropped and :meth:`check` requires two models besides it
    needs_base = False

    def chunkable_for(self, params: NuslerpParams) -> bool:
        return not params.nuslerp_flatten and not params.nuslerp_row_wise

    def check(self, name: str, params: NuslerpParams, per_model: Sequence[NuslerpParams]) -> None:
        if len(per_model) != 2:
            raise ConfigError(f"merge method 'nuslerp' needs exactly 2 models besides the base, got {len(per_model)}")

    def merge(self, x: MergeInput[NuslerpParams]) -> torch.Tensor:
        p = x.params
        t = nuslerp_t(x.weights)
        dim = 0 if p.nuslerp_row_wise else -1
        if not x.base_given:
            return nuslerp(t, x.models[0], x.models[1], dim=dim, flatten=p.nuslerp_flatten)
        return x.base + nuslerp(t, x.deltas[0], x.deltas[1], dim=dim, flatten=p.nuslerp_flatten)
