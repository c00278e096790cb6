"""DARE — Drop And REscale (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv 2311.03099; official code ``yule-BUAA/MergeLM``), followed by Task
Arithmetic (``dare_linear``) or TIES sign election + disjoint merge (``dare_ties``). Peers: mergekit
``dare_linear`` / ``dare_ties``, PEFT ``merge_utils.dare_linear`` / ``dare_ties``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from ..numeric import FiniteFloat
from ..tensors.sparsify import Rescale, dare_drop
from .base import MergeInput, MethodParams
from .registry import method
from .task_arithmetic import (
    ConsensusCombineParams,
    LinearCombineParams,
    TaskVectorMerge,
    lam_field,
)
from .ties import density_field


class DareParams(MethodParams):
    """Drop parameters shared by both DARE variants."""

    density: FiniteFloat = density_field(0.5, "keep probability 1 − p; FusionBench's default p = 0.5")
    rescale: Rescale = Field(
        "inverse",
        description="inverse: kept / density = kept / (1 − p) (DARE paper, PEFT); l1: match the L1 norm "
        "of τ_t over the tensor (mergekit's rescale: true; needs whole tensors); none: no rescale. "
        "mergekit's booleans are accepted: true = l1, false = none",
    )

    @field_validator("rescale", mode="before")
    @classmethod
    def _mergekit_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "l1" if value else "none"
        return value


class DareLinearParams(DareParams, LinearCombineParams):
    lam: FiniteFloat = lam_field(1.0, "DARE default 1.0, as mergekit")


class DareTiesParams(DareParams, ConsensusCombineParams):
    pass


@method
class DareLinear(TaskVectorMerge[DareLinearParams]):
    """DARE + Task Arithmetic.

    ``τ̃_t = m_t ⊙ τ_t / density_t`` with ``m_t = [u_t < density_t]``, ``u_t`` the uniform draws of the
    counter-based generator keyed by (seed, method, tensor, model) — so the keep probability is ``density =
    1 − p``; ``θ = θ0 + λ Σ_t w_t τ̃_t`` (``normalize``: divided by ``Σ_t w_t``). ``rescale: l1`` instead
    scales ``m_t ⊙ τ_t`` to the L1 norm of ``τ_t`` over the tensor (mergekit), ``none`` does not rescale.

    Chunkable for ``rescale: inverse | none`` (the draws do not depend on chunking); ``l1`` needs whole
    tensors (see :meth:`~TaskVectorMerge.chunkable_for`) and is refused on a row chunk.
    """

    name = "dare_linear"
    Params = DareLinearParams
    per_model_params = frozenset({"weight", "density"})
    summary = "random drop (keep prob. density) + rescale 1/density, then θ0 + λ Σ w_t τ̃_t"
    source = "Yu et al. 2024, arXiv 2311.03099 (yule-BUAA/MergeLM); mergekit dare_linear; PEFT dare_linear"
    chunkable = True
    random = True
    sparsifying = True

    def whole_tensor_reasons(self, params: Any) -> list[str]:
        extra = ["rescale='l1' (per-tensor L1 norms)"] if params.rescale == "l1" else []
        return [*super().whole_tensor_reasons(params), *extra]

    def sparsify(self, x: MergeInput[Any]) -> list[torch.Tensor]:
        return [
            dare_drop(delta, x.random_uniform(t), p.density, x.params.rescale)
            for t, (delta, p) in enumerate(zip(x.deltas, x.per_model, strict=True))
        ]


@method
class DareTies(DareLinear):
    """DARE + TIES: the DARE drop of :class:`DareLinear` (no magnitude trim), then ``τ'_t = w_t τ̃_t``,
    ``γ = sign(Σ_t τ'_t)`` and the disjoint merge (``dis-mean`` default, ``dis-sum``); ``θ = θ0 + λ τ_m``."""

    name = "dare_ties"
    Params = DareTiesParams
    summary = "random drop (keep prob. density) + rescale, then TIES sign election and disjoint mean"
    source = "Yu et al. 2024, arXiv 2311.03099; mergekit dare_ties; PEFT dare_ties"
