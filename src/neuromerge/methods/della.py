"""DELLA — Drop and rEscaLe via sampLing with mAgnitude (Deep et al. 2024, "DELLA-Merging: Reducing Interference in
Model Merging through Magnitude-Based Sampling", arXiv 2406.11617; official code ``declare-lab/della``).

MAGPRUNE (:mod:`neuromerge.tensors.magprune`) replaces DARE's uniform drop, followed by TIES' sign election and
disjoint merge (``della``) or Task Arithmetic (``della_linear``). Peers: mergekit 0.1.5 ``della`` / ``della_linear``
(``GeneralizedTaskArithmeticMerge`` with ``SparsificationMethod.della_magprune``), whose defaults these take.

DELLA is two rows of the task-vector variants table (:mod:`.variants`): the sparsifier :data:`MAGPRUNE` with
Task Arithmetic's sum (``della_linear``) or TIES' sign election and disjoint merge (``della``). Whether a tensor
may be split into row chunks depends on ``rescale`` (``l1`` needs whole tensors: ``whole_tensor_reasons``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from ..errors import ConfigError
from ..numeric import FiniteFloat
from ..tensors.magprune import DellaRescale, check_density_epsilon, magprune
from ..tensors.sparsify import ZeroSign
from .base import MergeInput
from .dare import MergekitRescale, dare_whole_tensor_reasons
from .task_arithmetic import ConsensusCombineParams, LinearCombineParams, Sparsifier, lam_field


class DellaParams(MergekitRescale):
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


class DellaTiesParams(DellaParams, ConsensusCombineParams):
    zero_sign: ZeroSign = Field(
        "positive", description="elected sign where Σ_t w_t τ̃_t = 0: positive = +1 (mergekit's della), majority = "
        "the majority sign of the tensor (official TIES code)")


class DellaLinearParams(DellaParams, LinearCombineParams):
    lam: FiniteFloat = lam_field(1.0, "mergekit's default 1.0")


def magprune_drop(x: MergeInput[Any]) -> list[torch.Tensor]:
    """MAGPRUNE of every model's task vector (a model at density 1 keeps its ``τ_t``)."""
    return [
        delta if p.density >= 1 else magprune(delta, x.random_uniform(t), p.density, p.epsilon, x.params.rescale)
        for t, (delta, p) in enumerate(zip(x.deltas, x.per_model, strict=True))
    ]


def magprune_check(method: str, name: str, params: Any, per_model: Sequence[Any]) -> None:
    """``density ± ε`` must lie in (0, 1) for every model, refused at planning (``--dry-run`` too)."""
    for i, p in enumerate(per_model):
        problem = check_density_epsilon(p.density, p.epsilon)
        if problem is not None:
            raise ConfigError(f"{method}: {name}: models[{i}]: {problem}")


#: DELLA's sparsifier: magnitude-ranked keep probabilities ``density ± ε`` per row, seeded draws, rescale
MAGPRUNE = Sparsifier(magprune_drop, per_model=frozenset({"density", "epsilon"}),
                      whole_tensor_reasons=dare_whole_tensor_reasons, random=True, check=magprune_check)

DELLA_LINEAR_DOC = """DELLA + Task Arithmetic.

MAGPRUNE: in each row of ``τ_t`` (a 1-D tensor is one row) rank ``|τ_t|`` ascending, ``r = 1..n``; keep an
entry with probability ``p = density − ε + 2ε (r − 1)/(n − 1)`` (``m_t = [u_t < p]``, ``u_t`` the engine's seeded
uniform draws keyed by (seed, method, tensor, model)); rescale the kept ``m_t ⊙ τ_t`` (``l1``: to ``‖τ_t‖₁`` of
the tensor; ``inverse``: by ``1/p`` entrywise). Then ``θ = θ0 + λ Σ_t w_t τ̃_t`` (``normalize``: divided by
``Σ_t w_t``). mergekit's defaults: density 1 (no drop), ε 0.15, ``rescale: true``, λ 1, ``normalize: false``.

Chunkable for ``rescale: inverse | none`` (ranks are per row, draws chunk-invariant); ``l1`` needs whole tensors.
"""

DELLA_DOC = """DELLA + TIES: the MAGPRUNE drop of ``della_linear``, then ``τ'_t = w_t τ̃_t``, ``γ = sign(Σ_t τ'_t)``
(``+1`` where the sum is 0, mergekit's rule) and the disjoint merge (``normalize: true`` = ``dis-mean``, mergekit's
default for ``della``); ``θ = θ0 + λ τ_m``."""
