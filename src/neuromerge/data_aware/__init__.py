"""Data-aware merges: Fisher, RegMean, AdaMerging (++) and WEMoE over any :class:`~.access.ModelAccess`
(bench suites, tiny test modules). Pure tensor functions are separated from the data loops; one driver per method
``*_merge_models(access, base_state, expert_states, heads, tasks, budget, params) -> StateDict`` (WEMoE: a
:class:`~.wemoe.WEMoEModel`). Registry entries (``neuromerge methods fisher``) live in :mod:`.methods`."""

from .access import BatchLike, ModelAccess, SimpleBatch, SimpleTask, TensorAccess, entropy, mergeable_names
from .adamerging import AdaMergingParams, AdaMergingPPParams, adamerging_merge_models, combine, ties_task_vectors
from .fisher import FisherAccumulator, FisherParams, diagonal_fisher, fisher_merge, fisher_merge_models
from .regmean import (
                      RegMeanParams,
                      accumulate_grams,
                      reduce_non_diagonal,
                      regmean_merge,
                      regmean_merge_linear,
                      regmean_merge_models,
)
from .wemoe import MLPGroup, WEMoEModel, WEMoEParams, build_wemoe, find_mlp_groups, wemoe_merge_models

__all__ = [
    "AdaMergingPPParams", "AdaMergingParams", "BatchLike", "FisherAccumulator", "FisherParams", "MLPGroup",
    "ModelAccess", "RegMeanParams", "SimpleBatch", "SimpleTask", "TensorAccess", "WEMoEModel", "WEMoEParams",
    "accumulate_grams", "adamerging_merge_models", "build_wemoe", "combine", "diagonal_fisher", "entropy",
    "find_mlp_groups", "fisher_merge", "fisher_merge_models", "mergeable_names", "reduce_non_diagonal",
    "regmean_merge", "regmean_merge_linear", "regmean_merge_models", "ties_task_vectors", "wemoe_merge_models",
]
