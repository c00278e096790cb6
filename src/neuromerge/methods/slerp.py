"""SLERP — spherical linear interpolation of two models (Shoemake 1985; mergekit ``slerp``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from .base import UnweightedParams
from .define import merge_function

#: mergekit's threshold on |cos Ω| above which the vectors count as (anti)parallel and are lerped
DOT_THRESHOLD = 0.9995
#: norms at or below this are replaced by 1 when computing cos Ω (mergekit)
NORM_EPS = 1e-8


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """Coefficients ``(c0, c1)`` with ``slerp = c0 v0 + c1 v1`` (float64 reductions over the flattened
    tensors).

    ``cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩`` clamped to [−1, 1] (a norm ``<= 1e-8`` counts as 1); if ``|cos Ω| >
    0.9995`` linear ``(1 − t, t)``, else ``(sin((1−t)Ω)/sin Ω, sin(tΩ)/sin Ω)``. Applied to the *original*
    (unnormalised) vectors, exactly as mergekit's ``slerp``.
    """
    a = v0.reshape(-1).to(torch.float64)
    b = v1.reshape(-1).to(torch.float64)
    if a.numel() == 0:
        return 1.0 - t, t
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, float((a / na) @ (b / nb))))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


@merge_function(
    name="slerp", summary="spherical interpolation of two models, lerp when nearly (anti)parallel",
    source="Shoemake 1985; mergekit slerp", chunkable=False, min_models=2, max_models=2, needs_base=False,
    params_base=UnweightedParams, interpolates_base=True, ignored_params=("weight",),
)
def slerp(
    models: Sequence[torch.Tensor], *,
    t: Annotated[float, Field(ge=0, le=1, description="interpolation factor: 0 = first model, 1 = second model")
                 ] = 0.5,
) -> torch.Tensor:
    """``θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b`` per tensor, ``cos Ω`` the cosine between the
    flattened ``θ_a = models[0]`` and ``θ_b = models[1]``; linear fallback ``(1−t)θ_a + tθ_b`` when ``|cos
    Ω| > 0.9995``. ``t = 0`` gives ``models[0]`` (the base when the base is one of the two, mergekit's
    convention)."""
    c0, c1 = slerp_coefficients(t, models[0], models[1])
    return c0 * models[0] + c1 * models[1]


Slerp = slerp
SlerpParams = Slerp.Params
