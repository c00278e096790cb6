"""DELLA — Drop and rEscaLe via sampLing with mAgnitude (Deep et al. 2024, "DELLA-Merging: Reducing Interference in
Model Merging through Magnitude-Based Sampling", arXiv 2406.11617; official code ``declare-lab/della``).

MAGPRUNE (:mod:`neuromerge.tensors.magprune`) replaces DARE's uniform drop, followed by TIES' sign election and
disjoint merge (``della``) or Task Arithmetic (``della_linear``). Peers: mergekit 0.1.5 ``della`` / ``della_linear``
(``GeneralizedTaskArithmeticMerge`` with ``SparsificationMethod.della_magprune``), whose defaults these take.

Written in the class form, not with :func:`~neuromerge.methods.define.merge_function`: DELLA is a member of the
task-arithmetic family (:class:`~neuromerge.methods.task_arithmetic.TaskVectorMerge`: its combine steps, reports and
``normalize`` / ``variant`` parameters are shared, only :meth:`sparsify` differs), and whether a tensor may be split
into row chunks depends on a parameter (``rescale: l1`` needs whole tensors), which the decorator's single
``chunkable`` cannot say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..numeric import FiniteFloat
from ..tensors.magprune import DellaRescale, check_density_epsilon, magprune
from ..tensors.sparsify import ZeroSign
from .base import MergeInput, MethodParams
from .registry import method
from .task_arithmetic import ConsensusCombineParams, LinearCombineParams, TaskVectorMerge, lam_field


class DellaParams(MethodParams):
    """MAGPRUNE parameters shared by both DELLA variants (mergekit 0.1.5's names and defaults)."""

    density: FiniteFloat = Field(
        1.0, gt=0, le=1, description="mean keep probability of each task vector, per model (mergekit's default 1.0 "
        "= no drop; the DELLA paper tunes it, e.g. 0.3–0.7)")
    epsilon: FiniteFloat = Field(
        0.15, ge=0, lt=1, description="half-width of the keep probabilities: from density − ε (smallest |τ| of a row) "
        "to density + ε (largest), per model; density ± ε must lie in (0, 1)")
    rescale: DellaRescale = Field(
        "l1", description="l1: scale the kept entries to the L1 norm of τ_t over the tensor (mergekit's rescale: "
        "true, its default; needs whole tensors); inverse: divide each kept entry by its keep probability (DELLA "
        "paper); none. mergekit's booleans are accepted: true = l1, false = none")

    @field_validator("rescale", mode="before")
    @classmethod
    def _mergekit_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "l1" if value else "none"
        return value


class DellaTiesParams(DellaParams, ConsensusCombineParams):
    zero_sign: ZeroSign = Field(
        "positive", description="elected sign where Σ_t w_t τ̃_t = 0: positive = +1 (mergekit's della), majority = "
        "the majority sign of the tensor (official TIES code)")


class DellaLinearParams(DellaParams, LinearCombineParams):
    lam: FiniteFloat = lam_field(1.0, "mergekit's default 1.0")


@method
class DellaLinear(TaskVectorMerge[DellaLinearParams]):
    """DELLA + Task Arithmetic.

    MAGPRUNE: in each row of ``τ_t`` (a 1-D tensor is one row) rank ``|τ_t|`` ascending, ``r = 1..n``; keep an
    entry with probability ``p = density − ε + 2ε (r − 1)/(n − 1)`` (``m_t = [u_t < p]``, ``u_t`` the engine's seeded
    uniform draws keyed by (seed, method, tensor, model)); rescale the kept ``m_t ⊙ τ_t`` (``l1``: to ``‖τ_t‖₁`` of
    the tensor; ``inverse``: by ``1/p`` entrywise). Then ``θ = θ0 + λ Σ_t w_t τ̃_t`` (``normalize``: divided by
    ``Σ_t w_t``). mergekit's defaults: density 1 (no drop), ε 0.15, ``rescale: true``, λ 1, ``normalize: false``.

    Chunkable for ``rescale: inverse | none`` (ranks are per row, draws chunk-invariant); ``l1`` needs whole tensors.
    """

    name = "della_linear"
    Params = DellaLinearParams
    per_model_params = frozenset({"weight", "density", "epsilon"})
    summary = "magnitude-ranked random drop (keep prob. density ± ε) + rescale, then θ0 + λ Σ w_t τ̃_t"
    source = "Deep et al. 2024, arXiv 2406.11617 (declare-lab/della); mergekit della_linear"
    #: False: the default ``rescale: l1`` needs whole tensors; :meth:`chunkable_for` allows row chunks otherwise
    chunkable = False
    random = True
    sparsifying = True

    def chunkable_for(self, params: Any) -> bool:
        return not self.whole_tensor_reasons(params)

    def check(self, name: str, params: Any, per_model: Sequence[Any]) -> None:
        for i, p in enumerate(per_model):
            problem = check_density_epsilon(p.density, p.epsilon)
            if problem is not None:
                raise ConfigError(f"{self.name}: {name}: models[{i}]: {problem}")

    def whole_tensor_reasons(self, params: Any) -> list[str]:
        extra = ["rescale='l1' (per-tensor L1 norms)"] if params.rescale == "l1" else []
        return [*super().whole_tensor_reasons(params), *extra]

    def sparsify(self, x: MergeInput[Any]) -> list[torch.Tensor]:
        return [
            delta if p.density >= 1 else magprune(delta, x.random_uniform(t), p.density, p.epsilon, x.params.rescale)
            for t, (delta, p) in enumerate(zip(x.deltas, x.per_model, strict=True))
        ]


@method
class Della(DellaLinear):
    """DELLA + TIES: the MAGPRUNE drop of :class:`DellaLinear`, then ``τ'_t = w_t τ̃_t``, ``γ = sign(Σ_t τ'_t)``
    (``+1`` where the sum is 0, mergekit's rule) and the disjoint merge (``normalize: true`` = ``dis-mean``, mergekit's
    default for ``della``); ``θ = θ0 + λ τ_m``."""

    name = "della"
    Params = DellaTiesParams
    summary = "magnitude-ranked random drop + rescale, then TIES sign election and disjoint mean"
    source = "Deep et al. 2024, arXiv 2406.11617 (declare-lab/della); mergekit della"
