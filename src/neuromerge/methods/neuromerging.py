"""NeuroMerging: merge the parallel and orthogonal parts of every neuron's task vectors separately.

"To See a World in a Spark of Neuron: Disentangling Multi-task Interference for Training-free Model Merging"
(Fang et al., arXiv 2503.05320); official code ``ZzzitaoFang/NeuroMerging``. Specification: docs/methods/spec.md §1.

``θ = θ0 + λ1·ψ∥ + λ2·(ψ⊥ + point)`` where, after a global magnitude trim of every ``τ_t``, ``ψ∥`` / ``ψ⊥`` are
the per-neuron parallel / orthogonal merges of :mod:`neuromerge.tensors.neurons` and ``point`` is TIES on 1-D
tensors. ``λ2 = "auto"`` is the no-validation rule ``λ2 = 1/(1−σ)``, ``σ = max_t ‖τ_t ⊙ (1−m_t)‖₁ / ‖τ_t‖₁``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..numeric import FiniteFloat
from ..tensors.consensus import SignMethod, ties_merge
from ..tensors.neurons import Reconstruction, neuron_merge
from ._common import TrimScope, trimmed_deltas
from .base import GlobalStats, MergeInput, MergeMethod, MethodParams
from .registry import method


class NeuroMergingParams(MethodParams):
    """Parameters of NeuroMerging (defaults and sources in docs/methods/neuromerging.md)."""

    density: FiniteFloat = Field(
        0.2, gt=0, le=1, description="kept fraction of |τ_t| per model (official mask_rate = 1 − density) [code]"
    )
    scope: TrimScope = Field("global", description="trim threshold over the whole model (global) or per tensor")
    lambda1: FiniteFloat = Field(0.0, description="scale of the parallel merge ψ∥ (0 in the released scripts) [code]")
    lambda2: FiniteFloat | Literal["auto"] = Field(
        "auto", description="scale of ψ⊥ + point; 'auto' = 1/(1−σ), σ = max_t removed L1 fraction [paper]"
    )
    parallel_reconstruction: Reconstruction = Field(
        "paper", description="ψ∥ = c̄·w0 (paper) or c̄·w0/‖w0‖ (official code)"
    )
    cum_threshold: FiniteFloat = Field(
        1.0, gt=0, le=1, description="cumulative-variance threshold η of the per-neuron SVD (1 keeps all) [code]"
    )
    sign_method: SignMethod = Field("sum", description="TIES sign election: sum (official) or count")


def removed_fractions(densities: Sequence[float], stats: GlobalStats | None) -> tuple[float, ...]:
    """``σ_t`` of every model from the statistics pass; all 0 when no model is trimmed (every density is 1)."""
    if all(d >= 1.0 for d in densities):
        return tuple(0.0 for _ in densities)
    if stats is None:  # pragma: no cover - the engine computes stats when global_densities asks
        raise RuntimeError("NeuroMerging lambda2='auto' needs the global statistics pass")
    return stats.removed_fraction


def auto_lambda2(removed: Sequence[float]) -> float:
    """``λ2 = 1/(1−σ)`` with ``σ = max_t σ_t`` (docs/methods/spec.md §1.7, "removed mass" reading)."""
    sigma = max(removed)
    if sigma >= 1.0:
        raise ConfigError(
            "neuromerging: lambda2='auto' is undefined because a model's trim keeps nothing (σ = 1); "
            "raise density or give lambda2 a number"
        )
    return 1.0 / (1.0 - sigma)


def kept_mass_lambda2(removed: Sequence[float]) -> float | None:
    """The alternative reading of the rule: ``σ'_t`` = the *kept* L1 fraction ``1 − σ_t``,
    ``λ2' = 1/(1 − max_t σ'_t) = 1/min_t σ_t``; None when undefined (some model is not trimmed at all)."""
    smallest = min(removed)
    return 1.0 / smallest if smallest > 0 else None


@method
class NeuroMerging(MergeMethod[NeuroMergingParams]):
    """NeuroMerging (docs/methods/spec.md §1): trim → per-neuron parallel/orthogonal split → TIES on the parallel
    coefficients and on the per-neuron SVD coordinates of the orthogonal parts → ``θ0 + λ1ψ∥ + λ2(ψ⊥ + point)``."""

    name = "neuromerging"
    aliases = ("neuro_merging",)
    Params = NeuroMergingParams
    per_model_params = frozenset({"weight", "density"})
    summary = "per-neuron parallel/orthogonal split; TIES on projections and on per-neuron SVD coordinates"
    source = "Fang et al. 2025, arXiv 2503.05320; official code ZzzitaoFang/NeuroMerging"
    chunkable = True

    def global_densities(
        self, params: NeuroMergingParams, per_model: Sequence[NeuroMergingParams]
    ) -> list[float] | None:
        """Global thresholds for ``scope="global"``; with ``scope="tensor"`` and ``lambda2="auto"`` the stats pass
        still runs, because σ is defined as the whole-model L1 mass a trim at ``density`` removes."""
        if params.scope == "global" or params.lambda2 == "auto":
            return [p.density for p in per_model]
        return None

    def needs_l1_mass(self, params: NeuroMergingParams) -> bool:
        return params.lambda2 == "auto"

    def chunkable_for(self, params: NeuroMergingParams) -> bool:
        """Row chunks are exact with the global trim (a fixed threshold per task); ``scope="tensor"`` ranks the
        whole tensor's entries (per-tensor top-k), so it needs the whole tensor."""
        return params.scope != "tensor"

    def merge(self, x: MergeInput[NeuroMergingParams]) -> torch.Tensor:
        p = x.params
        densities = [q.density for q in x.per_model]
        trimmed = trimmed_deltas(x, densities, p.scope)
        tau = torch.stack([d * w if w != 1.0 else d for d, w in zip(trimmed, x.weights, strict=True)])
        lam2 = self._lambda2(x, densities)
        if x.kind == "point" or tau.dim() != 3:
            return x.base + lam2 * ties_merge(tau, "mean", p.sign_method)
        parts = neuron_merge(
            x.base, tau, reconstruction=p.parallel_reconstruction, cum_threshold=p.cum_threshold,
            sign_method=p.sign_method,
        )
        x.report["parallel_energy_share"] = parts.parallel_energy
        out = x.base + lam2 * parts.orthogonal
        return out + p.lambda1 * parts.parallel if p.lambda1 != 0.0 else out

    @staticmethod
    def _lambda2(x: MergeInput[NeuroMergingParams], densities: Sequence[float]) -> float:
        """``λ2`` for this tensor; records ``lambda2``, ``sigma`` and ``lambda2_kept_mass_reading`` in the report."""
        lam2 = x.params.lambda2
        if lam2 != "auto":
            x.report["lambda2"] = float(lam2)
            return float(lam2)
        removed = removed_fractions(densities, x.stats)
        value = auto_lambda2(removed)
        x.report["lambda2"] = value
        x.report["sigma"] = max(removed)
        alt = kept_mass_lambda2(removed)
        if alt is not None and math.isfinite(alt):
            x.report["lambda2_kept_mass_reading"] = alt
        return value
