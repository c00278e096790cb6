"""Registry entries of the data-aware methods, so ``neuromerge methods NAME`` lists their parameters.

They are *not* static merges: the engine merges tensor by tensor and cannot feed them task data, so
:meth:`DataAwareMethod.merge` refuses with :data:`REFUSAL`. A merge config that names task data (``data:`` and a
``task:`` per model) runs them on the user's models (:mod:`.merge`, ``merges_to_folder``); the bench runs them on
its suites (:mod:`neuromerge.bench.data_methods`).
``data_aware = True`` keeps them out of the bench's default method list; ``transductive = True`` marks the methods
that learn from unlabelled test inputs (AdaMerging, WEMoE).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..methods.base import MergeInput, MergeMethod
from ..methods.registry import method
from .adamerging import AdaMergingParams, AdaMergingPPParams
from .fisher import FisherParams
from .regmean import RegMeanParams
from .wemoe import WEMoEParams

REFUSAL = ("merge method {name!r} needs task data (it reads {reads}); the static `neuromerge merge` cannot run it "
           "without it: give the config `data: TASKS.yaml` and a `task:` per model (docs/data_aware.md), or run it "
           "with `neuromerge bench SUITE --methods {name}`.")
#: WEMoE's result is a routed model, not a model folder
ROUTED_REFUSAL = ("merge method {name!r} needs task data (it reads {reads}) and builds a routed model, not a model "
                  "folder: run it with `neuromerge route build {name} --config CONFIG -o OUT` or `neuromerge bench "
                  "SUITE --methods {name}`.")


class DataAwareMethod(MergeMethod[Any]):
    """Base of the registry entries of data-aware methods (see the module docstring)."""

    data_aware: ClassVar[bool] = True
    transductive: ClassVar[bool] = False
    reads: ClassVar[str] = ""
    #: whether `neuromerge merge` with `data:` writes its result as a model folder (WEMoE: a routed model)
    merges_to_folder: ClassVar[bool] = True
    #: the split the method reads by default (``data_split`` overrides it)
    split: ClassVar[str] = "train"
    chunkable = False

    @classmethod
    def refusal(cls) -> str:
        return REFUSAL.format(name=cls.name, reads=cls.reads)

    def merge(self, x: MergeInput[Any]) -> torch.Tensor:
        raise ConfigError(self.refusal())


@method
class Fisher(DataAwareMethod):
    name = "fisher"
    Params = FisherParams
    summary = "Fisher-weighted average Σ F_t θ_t / Σ F_t, diagonal Fisher on each task's train inputs (needs data)"
    source = "Matena & Raffel 2022, arXiv 2111.09832 (mmatena/model_merging); fusion-bench fisher_merging"
    reads = "256 training inputs per task"
    needs_base = False


@method
class RegMean(DataAwareMethod):
    name = "regmean"
    Params = RegMeanParams
    summary = "per linear layer (Σ G̃_t)⁻¹ Σ G̃_t W_tᵀ from each expert's input Grams; others averaged (needs data)"
    source = "Jin et al. 2023, arXiv 2212.09849 (bloomberg/dataless-model-merging); fusion-bench regmean"
    reads = "256 training inputs per task"
    needs_base = False


@method
class AdaMerging(DataAwareMethod):
    name = "adamerging"
    Params = AdaMergingParams
    summary = "θ0 + Σ λ_t^l τ_t^l, λ learned by entropy minimization on unlabelled test inputs (needs data)"
    source = "Yang et al. 2024, arXiv 2310.02575 (EnnengYang/AdaMerging); fusion-bench adamerging"
    reads = "unlabelled test inputs of every task"
    transductive = True
    split = "test"


@method
class AdaMergingPP(DataAwareMethod):
    name = "adamerging++"
    aliases = ("adamerging_pp",)
    Params = AdaMergingPPParams
    summary = "AdaMerging over TIES-selected task vectors (needs data)"
    source = "Yang et al. 2024, arXiv 2310.02575 (EnnengYang/AdaMerging, layer_wise_adamergingpp)"
    reads = "unlabelled test inputs of every task"
    transductive = True
    split = "test"


@method
class WEMoE(DataAwareMethod):
    name = "wemoe"
    aliases = ("we-moe",)
    Params = WEMoEParams
    summary = "TA outside MLPs; routed MLPs W0 + Σ r_t(x) τ_t, routers trained by test-time entropy (needs data)"
    source = "Tang et al. 2024, arXiv 2402.00433 (tanganke/weight-ensembling_MoE); fusion-bench we_moe"
    reads = "unlabelled test inputs of every task"
    transductive = True
    split = "test"
    merges_to_folder = False

    @classmethod
    def refusal(cls) -> str:
        return ROUTED_REFUSAL.format(name=cls.name, reads=cls.reads)
