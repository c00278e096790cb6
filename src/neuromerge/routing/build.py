"""Routed builders over any implementation of the tasks contract: MIN-Merging (and its ablations), Twin-Merging, EMR.

Each builder takes ``(suite, base_state, experts, tasks, budget, params, seed)`` — the experts (aligned with the
in-domain ``tasks``; a :class:`~neuromerge.tasks.TaskSet` holds exactly these), a parameter model — and returns a
:class:`RoutedBuild`: a :class:`~neuromerge.routing.runtime.RoutedModel` wrapping ``suite.module(backbone)`` plus
metadata (router accuracy per feature source, pruned fractions, storage). The bench scores it like any other row
through the suite's forward hooks; ``route build`` saves it (:mod:`.build_config`); :func:`score_routed` and
:func:`measure_latency` score it anywhere.

Variants (:data:`VARIANTS`):

=============================  ==========================================================================
``min_merging``                enhancement (layer + neuron pruning) + MLP router + hierarchical top-k gates
``min_merging:no_enhancement`` the experts unpruned (core sets still from layer importance)
``min_merging:no_hierarchy``   top-k renormalized gates in every layer (no core layers)
``min_merging:uniform_router`` no trained router: uniform weights ``1/T`` over the (enhanced) experts
``min_merging:oracle``         in-domain tasks routed to their own expert (forced one-hot probabilities)
``twin``                       Twin-Merging: TA shared expert + rank-10 % exclusive vectors, soft gates
``emr:oracle``                 EMR-Merging with the true task id (forced one-hot); OOD uses the router
``emr:router``                 EMR-Merging with the router-predicted task id (one-hot gates)
=============================  ==========================================================================

Experts as low-rank factors: the suites store LoRA experts merged into the weights, so
:func:`~neuromerge.routing.lora_factors.lora_factors` recovers exact rank-``r`` factors (``r =
suite.expert_rank()``); full fine-tuned experts (updates of higher rank, or ``params.rank`` given) are
approximated by the truncated SVD at ``params.rank`` (default 16), with a warning and ``factors_exact: false``.
Tensors that are not weights of routed linear / conv modules (biases, norms, embeddings — unchanged for LoRA
experts) are averaged over the experts into the backbone state.

Routers: :mod:`.router_fit` (features, sources, training). ``suite`` is any :class:`neuromerge.tasks.Suite`: a
bench suite or a user's model folder (:class:`neuromerge.tasks.hf.HFSuite`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..errors import TaskError
from ..numeric import FiniteFloat
from ..tasks.contract import Budget, Expert, Split, StateDict, Suite, TaskData
from . import emr as emr_lib
from . import min_merging as mm
from . import twin as twin_lib
from .experts import DenseExpert, LowRankExpert
from .lora_factors import lora_factors
from .policy import GatePolicy, HierarchicalGates, OneHotGates, SoftGates, TopKGates
from .router_fit import (  # noqa: F401  (re-exported: the builders' router API)
    CONTROL_KWARGS,
    FittedRouter,
    RouterParams,
    Source,
    SuiteFinalFeatures,
    fit_router,
    pooled_features,
    routing_kwargs,
    uniform_router,
)
from .runtime import RoutedModel

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------------ parameters
class FactorParams(BaseModel):
    """How the experts' weight updates become low-rank factors."""

    model_config = ConfigDict(extra="forbid")

    rank: int | None = Field(None, ge=1, description="SVD rank for experts that are not rank-r LoRA (None: the "
                                                     "suite's LoRA rank, else 16)")
    factor_tol: FiniteFloat = Field(1e-6, ge=0, description="max discarded relative energy for exact LoRA factors")


class MinMergingParams(RouterParams, FactorParams):
    """MIN-Merging's named reconstruction choices (docs/min_merging.md)."""

    enhancement: bool = Field(True, description="prune harmful layers and low-importance neurons")
    hierarchy: bool = Field(True, description="core layers of the top expert alone; False: top-k everywhere")
    uniform_router: bool = Field(False, description="replace the router by uniform weights 1/T")
    top_k: int = Field(2, ge=1)
    importance_examples: int = Field(200, ge=1, description="validation inputs per task for layer drop")
    core_delta: FiniteFloat = Field(0.0, description="δ: a layer is core when I_{t,l} > δ")
    core_top_fraction: FiniteFloat | None = Field(None, ge=0, le=1, description="cap the core set to this fraction")
    prune_harmful: bool = Field(True, description="drop layers with I_{t,l} < −ε from the expert")
    harmful_epsilon: FiniteFloat = Field(0.01, ge=0, description="ε of harmful-layer pruning (accuracy)")
    harmful_min_examples: int = Field(2, ge=0, description="harmful only if dropping the layer gains at least this "
                                                           "many correct validation examples (harmful_threshold)")
    neuron_keep: FiniteFloat = Field(0.9, ge=0, le=1, description="fraction of output neurons (rows of B) kept")
    calib_examples: int = Field(128, ge=1, description="train inputs per task for the neuron activations")


class TwinParams(RouterParams):
    """Twin-Merging: shared expert λ, exclusive rank fraction; router over the shared expert's final features."""

    lam: FiniteFloat = Field(0.3, description="λ of the Task Arithmetic shared expert")
    rank_fraction: FiniteFloat = Field(0.1, gt=0, le=1, description="exclusive rank r = ⌈fraction · min(out, in)⌉")
    feature_source: Literal["auto", "embeddings", "final"] = "final"


class EMRParams(RouterParams):
    """EMR-Merging: rescaler reduction (official: per-tensor means) and how the task id is known."""

    reduction: Literal["mean", "sum"] = Field("mean", description="per-tensor mean (official code) or sum")
    oracle: bool = Field(False, description="score in-domain tasks with the true task id")


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class RoutedBuild:
    """A built routed model, what it stores (bytes beyond the backbone) and what the builder measured."""

    model: RoutedModel
    meta: dict[str, Any]
    storage_bytes: int
    oracle: bool = False
    #: the backbone differs from the base state (Twin's shared expert, averaged non-linear tensors)
    backbone_changed: bool = False
    #: the router's per-task validation accuracy against chance (:func:`.router_fit.router_validation`); None
    #: without a trained router
    router_validation: dict[str, dict[str, Any]] | None = None


# ------------------------------------------------------------------------------------------------ helpers
def routable_modules(module: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules of ``module`` (the ones a routed model can carry)."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def changed_modules(base: StateDict, states: Sequence[StateDict], candidates: Iterable[str]) -> list[str]:
    """The candidate modules whose ``.weight`` differs from the base in at least one state."""
    out = []
    for m in candidates:
        k = f"{m}.weight"
        if k in base and any(not torch.equal(s[k], base[k]) for s in states):
            out.append(m)
    return out


def averaged_rest(base: StateDict, states: Sequence[StateDict], routed: Iterable[str],
                  exclude: Sequence[str] = ()) -> StateDict:
    """The backbone state: ``base`` with every floating tensor that is not a routed module's weight replaced by
    the mean over ``states`` (``exclude`` regexes and unchanged tensors keep the base). Returns ``base`` itself
    when nothing changes (LoRA experts)."""
    import re

    skip = {f"{m}.weight" for m in routed}
    pats = [re.compile(p) for p in exclude]
    out = dict(base)
    changed = False
    for k, w0 in base.items():
        if k in skip or not w0.is_floating_point() or any(p.search(k) for p in pats):
            continue
        if all(torch.equal(s[k], w0) for s in states):
            continue
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(w0.dtype)
        changed = True
    return out if changed else base


def expert_factors(suite: Suite, base: StateDict, experts: Sequence[Expert], modules: Sequence[str],
                   p: FactorParams) -> tuple[list[Factors], dict[str, Any]]:
    """Low-rank factors of every expert's changed ``modules``.

    - Every update of rank ``suite.expert_rank()`` (LoRA experts, ``factor_tol``) and ``p.rank`` unset: the exact
      factors at that rank, for all experts.
    - Otherwise each expert on its own: an expert that says it is LoRA (``meta["rank"]``, a user's PEFT adapter)
      gets its exact factors at its rank; the others (full fine-tuned checkpoints, or any expert when ``p.rank`` is
      given) the truncated SVD of each changed module's ``ΔW`` at ``p.rank`` (default 16) — Eckart–Young's best
      rank-r approximation, with a warning. ``meta["discarded_energy"][task]`` = ``Σ_m ‖ΔW_m − B_m A_m‖_F² /
      Σ_m ‖ΔW_m‖_F²`` over the expert's modules (0 for exact factors), ``meta["factor_ranks"][task]`` its rank and
      ``meta["factors_exact"]`` whether every expert is exact."""
    import warnings

    keys = [f"{m}.weight" for m in modules]
    sub_base = {k: base[k] for k in keys}
    subs = [{k: e.backbone[k] for k in keys} for e in experts]
    names = [e.task for e in experts]
    lora_rank = suite.expert_rank()
    own: list[int | None]
    if p.rank is None and lora_rank is not None:
        try:
            return ([lora_factors(sub_base, sub, int(lora_rank), tol=p.factor_tol) for sub in subs],
                    {"factor_rank": int(lora_rank), "factors_exact": True,
                     "factor_ranks": dict.fromkeys(names, int(lora_rank)),
                     "discarded_energy": dict.fromkeys(names, 0.0)})
        except TaskError:  # not the rank-r updates the suite declares: every expert approximated (warned below)
            own = [None] * len(experts)
    else:
        own = [None if p.rank is not None else _meta_rank(e) for e in experts]
    rank = p.rank or 16
    out: list[Factors] = []
    ranks: dict[str, int] = {}
    discarded: dict[str, float] = {}
    approx: list[str] = []
    for e, sub, r in zip(experts, subs, own, strict=True):
        if r is not None:
            try:
                out.append(lora_factors(sub_base, sub, r, tol=p.factor_tol))
                ranks[e.task], discarded[e.task] = r, 0.0
                continue
            except TaskError:
                pass  # not the low-rank update it declares: approximated below like a full checkpoint
        f = lora_factors(sub_base, sub, rank, tol=1.0)
        out.append(f)
        ranks[e.task], discarded[e.task] = rank, _discarded_energy(sub_base, sub, f)
        approx.append(e.task)
    worst = max((discarded[n] for n in approx), default=0.0)
    if approx and (p.rank is None or worst > p.factor_tol):  # a chosen rank that loses nothing needs no warning
        why = "are not LoRA adapters: " if p.rank is None else ""
        warnings.warn(f"expert(s) {', '.join(approx)} {why}approximating each changed module by a rank-{rank} "
                      f"truncated SVD (discarded energy up to {worst:.3g} of ‖ΔW‖²; set 'rank' to choose)",
                      stacklevel=2)
    return out, {"factor_rank": rank, "factors_exact": not approx, "factor_ranks": ranks,
                 "discarded_energy": discarded}


def _meta_rank(e: Expert) -> int | None:
    """The LoRA rank an expert declares (``meta["rank"]``: a PEFT adapter's), None for a full checkpoint."""
    r = e.meta.get("rank") if isinstance(e.meta, Mapping) else None
    return int(r) if isinstance(r, int) and r > 0 else None


def _discarded_energy(base: StateDict, expert: StateDict, factors: Factors) -> float:
    """``Σ_m ‖ΔW_m − B_m A_m‖_F² / Σ_m ‖ΔW_m‖_F²`` over the modules of ``factors`` (0 when nothing changed)."""
    total = lost = 0.0
    for m, (a, b) in factors.items():
        k = f"{m}.weight"
        delta = (expert[k].double() - base[k].double()).reshape(base[k].shape[0], -1)
        total += float(delta.square().sum())
        lost += float((delta - b.double() @ a.double()).square().sum())
    return lost / total if total > 0 else 0.0


def static_state(base: StateDict, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 skip_blocks: Iterable[int] = ()) -> StateDict:
    """``base`` with ``W_m += B_m A_m`` for every module outside ``skip_blocks`` (a static expert)."""
    out = dict(base)
    for m, (a, b) in mm.drop_blocks(factors, skip_blocks).items():
        k = f"{m}.weight"
        w0 = base[k]
        out[k] = (w0.float() + (b.float() @ a.float()).reshape(w0.shape)).to(w0.dtype)
    return out


def head_subset(task: TaskData, split: Literal["train", "val", "test"], n: int) -> TaskData:
    """``task`` with ``split`` cut to its first ``n`` examples (fingerprint changed, so suites re-tokenize)."""
    data = getattr(task, split)
    if len(data) <= n:
        return task
    cut = Split(data.inputs[:n], data.labels[:n], rows=None if data.rows is None else data.rows[:n])
    return dataclasses.replace(task, **{split: cut}, fingerprint=f"{task.fingerprint or task.name}|{split}:{n}")


def _storage(model: RoutedModel) -> int:
    return int(sum(model.storage_bytes().values()))


class Memo:
    """Results shared by the variants of one bench run (factors, layer importance, activations, routers)."""

    def __init__(self) -> None:
        self.items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.items:
            self.items[key] = make()
        return self.items[key]


def _router_key(tasks: Sequence[TaskData], backbone_tag: str, p: RouterParams, seed: int) -> tuple:
    """Memo key of a router: the backbone it reads, the tasks, the router parameters, the seed."""
    fields = json.dumps(p.model_dump(include=set(RouterParams.model_fields)), sort_keys=True)
    return ("router", backbone_tag, tuple(t.name for t in tasks), fields, seed)


# ------------------------------------------------------------------------------------------------ MIN-Merging
def min_analysis(suite: Suite, base: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData], budget: Budget,
                 p: MinMergingParams, memo: Memo) -> dict[str, Any]:
    """Factors, backbone, per-task layer importance and neuron activation means (independent of the variant)."""

    def make() -> dict[str, Any]:
        probe = suite.module(base)
        states = [e.backbone for e in experts]
        modules = changed_modules(base, states, routable_modules(probe))
        factors, fmeta = expert_factors(suite, base, experts, modules, p)
        backbone = averaged_rest(base, states, modules, suite.merge_exclude())
        importance, full, n_val = [], [], []
        acts: list[dict[str, torch.Tensor]] = []
        for t, (e, f) in enumerate(zip(experts, factors, strict=True)):
            task = tasks[t]
            val = head_subset(task, "val", p.importance_examples)
            n_val.append(len(val.val))
            blocks = mm.group_by_block(f)

            def evaluate(skip: int | None, f: Factors = f, e: Expert = e, val: TaskData = val) -> float:
                state = static_state(backbone, f, [] if skip is None else [skip])
                return suite.evaluate(state, e.head, val, "val", budget)

            score, imp = mm.layer_importance(evaluate, blocks)
            full.append(score)
            importance.append(imp)
            model = suite.module(static_state(backbone, f))
            calib = suite.batches(task, "train", budget, limit=p.calib_examples)
            acts.append(mm.mean_abs_outputs(model, list(f), ((b.inputs, b.mask) for b in calib)))
        return {"factors": factors, "backbone": backbone, "importance": importance, "full_val": full,
                "n_val": n_val, "acts": acts, "factor_meta": fmeta}

    key = ("min", tuple(t.name for t in tasks), p.model_dump_json(include={
        "rank", "factor_tol", "importance_examples", "calib_examples"}))
    return memo.get(key, make)


def harmful_threshold(epsilon: float, min_examples: int, n: int) -> float:
    """``ε_t = max(ε, (k − ½)/n)``: a layer is harmful when ``I < −ε_t``, i.e. dropping it gains more than ``ε`` and at
    least ``k`` correct examples out of ``n`` (the ½ keeps float rounding of ``k/n`` out of the comparison)."""
    return max(epsilon, (min_examples - 0.5) / max(n, 1)) if min_examples > 0 else epsilon


def build_min_merging(suite: Suite, base_state: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
                      budget: Budget, params: MinMergingParams | Mapping[str, Any] | None = None, seed: int = 0, *,
                      memo: Memo | None = None) -> RoutedBuild:
    """MIN-Merging (docs/methods/spec.md §3): enhancement, router, hierarchical top-k gates over LoRA branches."""
    p = params if isinstance(params, MinMergingParams) else MinMergingParams.model_validate(dict(params or {}))
    memo = memo or Memo()
    an = min_analysis(suite, base_state, experts, tasks, budget, p, memo)
    names = [t.name for t in tasks]
    core = [mm.core_layers(imp, p.core_delta, p.core_top_fraction) for imp in an["importance"]]
    harmful = [mm.harmful_layers(imp, harmful_threshold(p.harmful_epsilon, p.harmful_min_examples, n))
               if p.prune_harmful and p.enhancement else set() for imp, n in zip(an["importance"], an["n_val"],
                                                                                strict=True)]
    lowrank: list[LowRankExpert] = []
    pruned_neurons: dict[str, float] = {}
    for j, f in enumerate(an["factors"]):
        kept = mm.drop_blocks(f, harmful[j])
        if p.enhancement:
            kept, fractions = mm.prune_neurons(kept, an["acts"][j], p.neuron_keep)
            pruned_neurons[names[j]] = sum(fractions.values()) / len(fractions) if fractions else 0.0
        lowrank.append(LowRankExpert(names[j], kept))
    core_mods = mm.core_modules([c - h for c, h in zip(core, harmful, strict=True)], [e.factors for e in lowrank])
    policy: GatePolicy = HierarchicalGates(p.top_k, core_mods) if p.hierarchy else TopKGates(p.top_k)
    module = suite.module(an["backbone"])
    meta: dict[str, Any] = {**an["factor_meta"], "tasks": names,
                            "layer_importance": {n: {str(b): v for b, v in imp.items()}
                                                 for n, imp in zip(names, an["importance"], strict=True)},
                            "full_val": dict(zip(names, an["full_val"], strict=True)),
                            "core_layers": {n: sorted(c) for n, c in zip(names, core, strict=True)},
                            "pruned_layers": {n: sorted(h) for n, h in zip(names, harmful, strict=True)},
                            "pruned_layer_fraction": {n: len(h) / max(1, len(imp)) for n, h, imp in
                                                      zip(names, harmful, an["importance"], strict=True)},
                            "pruned_neuron_fraction": pruned_neurons, "policy": policy.to_dict()}
    if p.uniform_router:
        router = uniform_router(1, len(tasks))
        model = RoutedModel(module, lowrank, router=router, policy=SoftGates(), feature_module=None,
                            feature_fn=_constant_features)
        meta["router"] = "uniform"
        meta["policy"] = SoftGates().to_dict()
    else:
        fr = memo.get(_router_key(tasks, "rest", p, seed),
                      lambda: fit_router(suite, suite.module(an["backbone"]), tasks, budget, p, seed))
        model = RoutedModel(module, lowrank, router=fr.router, policy=policy, **routing_kwargs(suite, fr.source))
        meta.update(fr.meta)
    meta["nonzero_bytes"] = _nonzero_row_bytes(lowrank)
    return RoutedBuild(model, meta, _storage(model), backbone_changed=an["backbone"] is not base_state,
                       router_validation=None if p.uniform_router else fr.validation)


def _constant_features(base: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """One constant feature per sample (for the uniform router, which ignores its input)."""
    n = next(v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1)
    return torch.zeros(n, 1)


def _nonzero_row_bytes(experts: Sequence[LowRankExpert]) -> int:
    """Bytes of the factors if pruned rows of ``B`` were not stored (``A`` whole, ``B``'s non-zero rows)."""
    total = 0
    for e in experts:
        for a, b in e.factors.values():
            rows = int(b.ne(0).any(dim=1).sum())
            total += a.numel() * a.element_size() + rows * b.shape[1] * b.element_size()
    return total


# ------------------------------------------------------------------------------------------------ Twin / EMR
def build_twin(suite: Suite, base_state: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
               budget: Budget, params: TwinParams | Mapping[str, Any] | None = None, seed: int = 0, *,
               memo: Memo | None = None) -> RoutedBuild:
    """Twin-Merging (docs/methods/spec.md §4): backbone ``θ* = θ0 + λΣτ_t``, exclusive ``SVD_r(θ_t − θ*)``, soft
    gates."""
    p = params if isinstance(params, TwinParams) else TwinParams.model_validate(dict(params or {}))
    memo = memo or Memo()
    states = [e.backbone for e in experts]
    shared = twin_lib.task_arithmetic_state(base_state, states, p.lam, exclude=suite.merge_exclude())
    modules = changed_modules(base_state, states, routable_modules(suite.module(base_state)))
    names = [t.name for t in tasks]
    lowrank, discarded = twin_lib.twin_experts(shared, states, names, modules, rank_fraction=p.rank_fraction)
    fr = memo.get(_router_key(tasks, f"twin:{p.lam}", p, seed),
                  lambda: fit_router(suite, suite.module(shared), tasks, budget, p, seed))
    model = RoutedModel(suite.module(shared), lowrank, router=fr.router, policy=SoftGates(),
                        **routing_kwargs(suite, fr.source))
    meta = {"tasks": names, "lam": p.lam, "rank_fraction": p.rank_fraction, "discarded_energy": discarded,
            "modules": len(modules), **fr.meta}
    return RoutedBuild(model, meta, _storage(model), backbone_changed=True, router_validation=fr.validation)


def build_emr(suite: Suite, base_state: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
              budget: Budget, params: EMRParams | Mapping[str, Any] | None = None, seed: int = 0, *,
              memo: Memo | None = None) -> RoutedBuild:
    """EMR-Merging (docs/methods/spec.md §4) on the routed linear weights; other tensors averaged into the backbone."""
    p = params if isinstance(params, EMRParams) else EMRParams.model_validate(dict(params or {}))
    memo = memo or Memo()
    states = [e.backbone for e in experts]
    modules = changed_modules(base_state, states, routable_modules(suite.module(base_state)))
    backbone = averaged_rest(base_state, states, modules, suite.merge_exclude())
    deltas = [{m: (s[f"{m}.weight"].float() - base_state[f"{m}.weight"].float()).reshape(
        base_state[f"{m}.weight"].shape[0], -1) for m in modules} for s in states]
    names = [t.name for t in tasks]
    dense, info = emr_lib.emr_experts(deltas, names, reduction=p.reduction)
    dense = [DenseExpert(e.name, {m: d.to(base_state[f"{m}.weight"].dtype) for m, d in e.deltas.items()})
             for e in dense]
    fr = memo.get(_router_key(tasks, "rest", p, seed),
                  lambda: fit_router(suite, suite.module(backbone), tasks, budget, p, seed))
    model = RoutedModel(suite.module(backbone), dense, router=fr.router, policy=OneHotGates(),
                        **routing_kwargs(suite, fr.source))
    router_bytes = model.storage_bytes()["router"]
    meta = {"tasks": names, "rescalers": dict(zip(names, info["rescalers"], strict=True)), "modules": len(modules),
            "runtime_bytes": _storage(model), "oracle": p.oracle, **fr.meta}
    return RoutedBuild(model, meta, int(info["compact_bytes"]) + router_bytes, oracle=p.oracle,
                       backbone_changed=backbone is not base_state, router_validation=fr.validation)


# ------------------------------------------------------------------------------------------------ variants
Builder = Callable[..., RoutedBuild]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A bench row: builder, its parameter model, overrides and whether in-domain scoring forces the task id."""

    builder: Builder
    params: type[BaseModel]
    overrides: Mapping[str, Any]
    oracle: bool = False


VARIANTS: dict[str, Variant] = {
    "min_merging": Variant(build_min_merging, MinMergingParams, {}),
    "min_merging:no_enhancement": Variant(build_min_merging, MinMergingParams, {"enhancement": False}),
    "min_merging:no_hierarchy": Variant(build_min_merging, MinMergingParams, {"hierarchy": False}),
    "min_merging:uniform_router": Variant(build_min_merging, MinMergingParams, {"uniform_router": True}),
    "min_merging:oracle": Variant(build_min_merging, MinMergingParams, {}, oracle=True),
    "twin": Variant(build_twin, TwinParams, {}),
    "emr:oracle": Variant(build_emr, EMRParams, {"oracle": True}, oracle=True),
    "emr:router": Variant(build_emr, EMRParams, {"oracle": False}),
}

#: ``--quick`` caps (a smaller requested value is kept)
QUICK_CAPS: dict[str, int] = {"router_examples": 200, "router_val_examples": 80, "importance_examples": 64,
                              "calib_examples": 32}


def resolve_params(name: str, params: Mapping[str, Any] | None = None, quick: bool = False) -> BaseModel:
    """The variant's validated parameters: defaults, then ``params``, then the variant's overrides, then caps."""
    if name not in VARIANTS:
        raise TaskError(f"unknown routed method {name!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    try:
        p = v.params.model_validate({**dict(params or {}), **v.overrides})
    except ValidationError as err:
        raise TaskError(f"bad parameters for {name}: {err}") from None
    if quick:
        caps = {k: min(c, getattr(p, k)) for k, c in QUICK_CAPS.items() if k in type(p).model_fields}
        p = p.model_copy(update=caps)
    return p


def build_variant(name: str, suite: Suite, base_state: StateDict, experts: Sequence[Expert],
                  tasks: Sequence[TaskData], budget: Budget, params: Mapping[str, Any] | None = None, seed: int = 0,
                  *, memo: Memo | None = None) -> RoutedBuild:
    """Build variant ``name`` (:data:`VARIANTS`); ``memo`` shares work between variants of one run."""
    p = resolve_params(name, params, bool(getattr(budget, "quick", False)))
    v = VARIANTS[name]
    built = v.builder(suite, base_state, experts, tasks, budget, p, seed, memo=memo)
    built.oracle = v.oracle
    return built


# ------------------------------------------------------------------------------------------------ scoring
def score_routed(suite: Suite, model: RoutedModel, experts: Sequence[Expert], tasks: Sequence[TaskData],
                 budget: Budget, *, oracle: bool = False, split: Literal["val", "test"] = "test") -> dict[str, float]:
    """Per-task scores of ``model`` (``suite.evaluate_module`` with each task's expert head); ``oracle``: task
    ``i`` is scored under ``model.force`` with the one-hot probabilities of expert ``i``."""
    out: dict[str, float] = {}
    for i, (t, e) in enumerate(zip(tasks, experts, strict=True)):
        if oracle:
            probs = torch.zeros(1, len(tasks))
            probs[0, i] = 1.0
            with model.force(probs):
                out[t.name] = suite.evaluate_module(model, e.head, t, split, budget)
        else:
            out[t.name] = suite.evaluate_module(model, e.head, t, split, budget)
    return out


def measure_latency(suite: Suite, module: nn.Module, head: StateDict | None, task: TaskData, budget: Budget, *,
                    sizes: Sequence[int] = (1, 32), repeats: int = 3, split: Literal["val", "test"] = "test"
                    ) -> dict[str, float]:
    """Median wall time in ms of ``suite.logits`` per batch, for batches of each size, under ``no_grad``:
    ``{"batch_1": …, "batch_32": …}``. The full batches among the first ``size · repeats`` examples are timed
    ``repeats`` times in turn after one warm-up call; a size larger than the split is skipped."""
    out: dict[str, float] = {}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for size in sizes:
                batches = [b for b in suite.batches(task, split, budget, limit=size * repeats, batch_size=size)
                           if len(b) == size]
                if not batches:
                    continue
                suite.logits(module, head, task, batches[0])
                times = []
                for i in range(repeats):
                    t0 = time.perf_counter()
                    suite.logits(module, head, task, batches[i % len(batches)])
                    times.append((time.perf_counter() - t0) * 1000.0)
                out[f"batch_{size}"] = statistics.median(times)
    finally:
        module.train(was_training)
    return out


__all__ = [
    "QUICK_CAPS",
    "VARIANTS",
    "EMRParams",
    "FactorParams",
    "Memo",
    "MinMergingParams",
    "RoutedBuild",
    "RouterParams",
    "SuiteFinalFeatures",
    "TwinParams",
    "Variant",
    "build_emr",
    "build_min_merging",
    "build_twin",
    "build_variant",
    "fit_router",
    "measure_latency",
    "resolve_params",
    "routing_kwargs",
    "score_routed",
]
