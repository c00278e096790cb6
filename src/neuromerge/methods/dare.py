"""DARE — Drop And REscale (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv 2311.03099; official code ``yule-BUAA/MergeLM``), followed by Task
Arithmetic (``dare_linear``) or TIES sign election + disjoint merge (``dare_ties``). Peers: mergekit
``dare_linear`` / ``dare_ties``, PEFT ``merge_utils.dare_linear`` / ``dare_ties``. The drop (:data:`RANDOM`) and the
parameters; the methods are rows of :mod:`neuromerge.methods.variants`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from ..numeric import FiniteFloat
from ..tensors.sparsify import Rescale, dare_drop
from .base import MergeInput, MethodParams
from .task_arithmetic import ConsensusCombineParams, LinearCombineParams, Sparsifier, lam_field
from .ties import density_field


class MergekitRescale(MethodParams):
    """A ``rescale`` parameter that also takes mergekit's booleans: ``true`` = ``l1``, ``false`` = ``none`` (DARE and
    DELLA)."""

    @field_validator("rescale", mode="before", check_fields=False)
    @classmethod
    def _mergekit_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "l1" if value else "none"
        return value


class DareParams(MergekitRescale):
    """Drop parameters shared by both DARE variants."""

    density: FiniteFloat = density_field(0.5, "keep probability 1 − p; FusionBench's default p = 0.5")
    rescale: Rescale = Field(
        "inverse",
        description="inverse: kept / density = kept / (1 − p) (DARE paper, PEFT); l1: match the L1 norm "
        "of τ_t over the tensor (mergekit's rescale: true; needs whole tensors); none: no rescale. "
        "mergekit's booleans are accepted: true = l1, false = none",
    )


class DareLinearParams(DareParams, LinearCombineParams):
    lam: FiniteFloat = lam_field(1.0, "DARE default 1.0, as mergekit")


class DareTiesParams(DareParams, ConsensusCombineParams):
    pass


def dare_whole_tensor_reasons(params: DareParams) -> list[str]:
    return ["rescale='l1' (per-tensor L1 norms)"] if params.rescale == "l1" else []


def random_drop(x: MergeInput[Any]) -> list[torch.Tensor]:
    """``τ̃_t = m_t ⊙ τ_t`` rescaled, ``m_t = [u_t < density_t]`` (:func:`~neuromerge.tensors.sparsify.dare_drop`)."""
    return [
        dare_drop(delta, x.random_uniform(t), p.density, x.params.rescale)
        for t, (delta, p) in enumerate(zip(x.deltas, x.per_model, strict=True))
    ]


#: DARE's drop as a sparsifier of the variants table
RANDOM = Sparsifier(random_drop, per_model=frozenset({"density"}), whole_tensor_reasons=dare_whole_tensor_reasons,
                    random=True)

DARE_LINEAR_DOC = """DARE + Task Arithmetic.

``τ̃_t = m_t ⊙ τ_t / density_t`` with ``m_t = [u_t < density_t]``, ``u_t`` the uniform draws of the
counter-based generator keyed by (seed, method, tensor, model) — so the keep probability is ``density =
1 − p``; ``θ = θ0 + λ Σ_t w_t τ̃_t`` (``normalize``: divided by ``Σ_t w_t``). ``rescale: l1`` instead
scales ``m_t ⊙ τ_t`` to the L1 norm of ``τ_t`` over the tensor (mergekit), ``none`` does not rescale.

Chunkable for ``rescale: inverse | none`` (the draws do not depend on chunking); ``l1`` needs whole
tensors (see :meth:`~neuromerge.methods.task_arithmetic.TaskVectorMerge.chunkable_for`) and is refused on a row
chunk.
"""

DARE_TIES_DOC = """DARE + TIES: the DARE drop of ``dare_linear`` (no magnitude trim), then ``τ'_t = w_t τ̃_t``,
``γ = sign(Σ_t τ'_t)`` and the disjoint merge (``dis-mean`` default, ``dis-sum``); ``θ = θ0 + λ τ_m``."""
