"""The task-vector variants as data: one row per method (name, sparsify, consensus, combine, parameters with their
defaults), read like mergekit's ``merge_methods/registry.py`` (``GeneralizedTaskArithmeticMerge(consensus_method=…,
sparsification_method=…, default_normalize=…)``). Each row becomes a
:class:`~neuromerge.methods.task_arithmetic.TaskVectorMerge` subclass (:func:`~.task_arithmetic.variant_class`) and
is registered; the formula is in :mod:`.task_arithmetic`, the sparsifiers in :mod:`.ties` (magnitude trim),
:mod:`.dare` (random drop), :mod:`.breadcrumbs` (outlier + small-magnitude masks) and :mod:`.della` (MAGPRUNE).
"""

from __future__ import annotations

from .breadcrumbs import BREADCRUMBS, BREADCRUMBS_DOC, BREADCRUMBS_TIES_DOC, BreadcrumbsParams, BreadcrumbsTiesParams
from .dare import DARE_LINEAR_DOC, DARE_TIES_DOC, RANDOM, DareLinearParams, DareTiesParams
from .della import DELLA_DOC, DELLA_LINEAR_DOC, MAGPRUNE, DellaLinearParams, DellaTiesParams
from .registry import method
from .task_arithmetic import TASK_ARITHMETIC_DOC, LinearCombineParams, Variant, variant_class
from .ties import MAGNITUDE, TIES_DOC, TiesParams

#: name, sparsify, consensus, combine, parameters (their defaults: λ, density …), then what ``neuromerge methods``
#: shows
VARIANTS: tuple[Variant, ...] = (
    Variant("task_arithmetic", None, None, "sum", LinearCombineParams,
            summary="θ0 + λ Σ w_t τ_t",
            source="Ilharco et al. 2023, arXiv 2212.04089; mergekit task_arithmetic", doc=TASK_ARITHMETIC_DOC),
    Variant("ties", MAGNITUDE, "sign_election", "disjoint_merge", TiesParams,
            summary="trim top-k of |τ_t| (global), elect signs, disjoint mean; θ0 + λ τ_m",
            source="Yadav et al. 2023, arXiv 2306.01708 (prateeksr/ties-merging); mergekit ties; PEFT ties",
            doc=TIES_DOC),
    Variant("dare_linear", RANDOM, None, "sum", DareLinearParams,
            summary="random drop (keep prob. density) + rescale 1/density, then θ0 + λ Σ w_t τ̃_t",
            source="Yu et al. 2024, arXiv 2311.03099 (yule-BUAA/MergeLM); mergekit dare_linear; PEFT dare_linear",
            doc=DARE_LINEAR_DOC),
    Variant("dare_ties", RANDOM, "sign_election", "disjoint_merge", DareTiesParams,
            summary="random drop (keep prob. density) + rescale, then TIES sign election and disjoint mean",
            source="Yu et al. 2024, arXiv 2311.03099; mergekit dare_ties; PEFT dare_ties", doc=DARE_TIES_DOC),
    Variant("breadcrumbs", BREADCRUMBS, None, "sum", BreadcrumbsParams,
            summary="drop top-γ outliers and the smallest |τ| per tensor (keep density), then θ0 + λ Σ w_t τ̂_t",
            source="Davari & Belilovsky 2024, arXiv 2312.06795 (rezazzr/breadcrumbs); mergekit breadcrumbs",
            doc=BREADCRUMBS_DOC),
    Variant("breadcrumbs_ties", BREADCRUMBS, "sign_election", "disjoint_merge", BreadcrumbsTiesParams,
            summary="Breadcrumbs masks, then TIES sign election and disjoint mean",
            source="Davari & Belilovsky 2024, arXiv 2312.06795; mergekit breadcrumbs_ties", doc=BREADCRUMBS_TIES_DOC),
    Variant("della_linear", MAGPRUNE, None, "sum", DellaLinearParams,
            summary="magnitude-ranked random drop (keep prob. density ± ε) + rescale, then θ0 + λ Σ w_t τ̃_t",
            source="Deep et al. 2024, arXiv 2406.11617 (declare-lab/della); mergekit della_linear",
            doc=DELLA_LINEAR_DOC),
    Variant("della", MAGPRUNE, "sign_election", "disjoint_merge", DellaTiesParams,
            summary="magnitude-ranked random drop + rescale, then TIES sign election and disjoint mean",
            source="Deep et al. 2024, arXiv 2406.11617 (declare-lab/della); mergekit della", doc=DELLA_DOC),
)

for _row in VARIANTS:
    method(variant_class(_row))
