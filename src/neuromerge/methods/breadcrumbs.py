"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", arXiv 2312.06795; official code ``rezazzr/breadcrumbs``), followed by Task Arithmetic
(``breadcrumbs``) or TIES sign election + disjoint merge (``breadcrumbs_ties``). Peer: mergekit
``breadcrumbs`` / ``breadcrumbs_ties`` (``sparsify.magnitude_outliers``). The masks (:data:`BREADCRUMBS`) and the
parameters; the methods are rows of :mod:`neuromerge.methods.variants`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from ..tensors.sparsify import breadcrumbs_sparsify
from .base import MergeInput, MethodParams
from .task_arithmetic import ConsensusCombineParams, LinearCombineParams, Sparsifier
from .ties import density_field


class BreadcrumbsMaskParams(MethodParams):
    """Mask parameters shared by both Breadcrumbs variants (per model, like mergekit)."""

    density: FiniteFloat = density_field(0.15, "official code's starting point β = 0.15; mergekit's default 1.0")
    gamma: FiniteFloat = Field(
        0.01, ge=0, lt=1, description="fraction of largest-magnitude entries dropped as outliers, per model"
    )


class BreadcrumbsParams(BreadcrumbsMaskParams, LinearCombineParams):
    pass


class BreadcrumbsTiesParams(BreadcrumbsMaskParams, ConsensusCombineParams):
    pass


def breadcrumbs_masks(x: MergeInput[Any]) -> list[torch.Tensor]:
    """Per model: drop the top-γ outliers and the smallest ``|τ_t|``
    (:func:`~neuromerge.tensors.sparsify.breadcrumbs_sparsify`)."""
    return [
        breadcrumbs_sparsify(delta, p.density, p.gamma)
        for delta, p in zip(x.deltas, x.per_model, strict=True)
    ]


#: Breadcrumbs' masks as a sparsifier of the variants table (per-tensor ranks: whole tensors)
BREADCRUMBS = Sparsifier(breadcrumbs_masks, per_model=frozenset({"density", "gamma"}), chunkable=False)

BREADCRUMBS_DOC = """Breadcrumbs + Task Arithmetic.

Per tensor and model, with ``n`` entries: drop the ``⌊γ_t n⌋`` largest ``|τ_t|`` (outliers) and the
smallest ones so that ``k = ⌊density_t n⌋`` entries remain (fewer outliers are dropped when ``density +
γ > 1``); ``θ = θ0 + λ Σ_t w_t τ̂_t`` (``normalize``: divided by ``Σ_t w_t``). Needs whole tensors
(per-tensor ranks).
"""

BREADCRUMBS_TIES_DOC = """Breadcrumbs masks, then ``τ'_t = w_t τ̂_t``, ``γ = sign(Σ_t τ'_t)`` and the TIES disjoint merge
(``dis-mean`` default, ``dis-sum``); ``θ = θ0 + λ τ_m``."""
