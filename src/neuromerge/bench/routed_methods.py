"""Routed methods in the bench: MIN-Merging (and its ablations), Twin-Merging and EMR as routed models.

Each builder takes ``(suite, base_state, experts, tasks, budget, params, seed)`` — the bench experts (aligned with
the in-domain ``tasks``), a parameter model — and returns a :class:`RoutedBuild`: a
:class:`~neuromerge.routing.runtime.RoutedModel` wrapping ``suite.module(backbone)`` plus metadata (router
accuracy per feature source, pruned fractions, storage). The protocol scores it like any other row through the
suite's forward hooks (:meth:`~neuromerge.bench.protocol.Context.score_module`); :func:`score_routed` and
:func:`measure_latency` do the same outside the protocol.

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
:func:`~neuromerge.bench.lora_experts.lora_factors` recovers exact rank-``r`` factors (``r =
suite.expert_rank()``); full fine-tuned experts (updates of higher rank, or ``params.rank`` given) are
approximated by the truncated SVD at ``params.rank`` (default 16), with a warning and ``factors_exact: false``.
Tensors that are not weights of routed linear / conv modules (biases, norms, embeddings — unchanged for LoRA
experts) are averaged over the experts into the backbone state.

Router data: at most ``router_examples`` train inputs per in-domain task (label = task index), features
``suite.pooled(module, batch, source)`` of the frozen backbone; the router's accuracy on ``router_val_examples``
validation inputs per task is reported per source. ``feature_source="auto"`` trains both sources and keeps the
cheap ``"embeddings"`` one unless ``"final"`` beats it by more than ``feature_tolerance`` (1 point).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..numeric import FiniteFloat
from ..routing import emr as emr_lib
from ..routing import min_merging as mm
from ..routing import twin as twin_lib
from ..routing.experts import DenseExpert, LowRankExpert
from ..routing.policy import GatePolicy, HierarchicalGates, OneHotGates, SoftGates, TopKGates
from ..routing.router import Router, train_router
from ..routing.runtime import RoutedModel
from .lora_experts import lora_factors
from .suite import Batch, Budget, Expert, Split, StateDict, Suite, TaskData
from .suites import BenchError

if TYPE_CHECKING:
    from .protocol import Context, Produced, Runner

Source = Literal["embeddings", "final"]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------------ parameters
class RouterParams(BaseModel):
    """Router training shared by the routed methods (defaults: MERGE / MIN-Merging's MLP router)."""

    model_config = ConfigDict(extra="forbid")

    router_examples: int = Field(1000, ge=1, description="train inputs per in-domain task for the router")
    router_val_examples: int = Field(200, ge=1, description="validation inputs per task to score the router")
    router_epochs: int = Field(30, ge=1)
    router_lr: FiniteFloat = Field(5e-4, gt=0)
    router_hidden: int = Field(256, ge=1)
    router_layers: int = Field(3, ge=1)
    router_batch_size: int = Field(64, ge=1)
    feature_source: Literal["auto", "embeddings", "final"] = Field(
        "auto", description="router features: the cheap 'embeddings' pass, the 'final' hidden state, or 'auto'")
    feature_tolerance: FiniteFloat = Field(0.01, ge=0, description="'auto' keeps 'embeddings' within this "
                                                                   "accuracy of 'final'")


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
    """Low-rank factors of every expert's changed ``modules``: exact LoRA factors at ``suite.expert_rank()`` when
    every update has that rank (``factor_tol``); otherwise (full fine-tuned experts, or ``p.rank`` given) the
    truncated SVD at ``p.rank`` (default 16), with a warning — the routed model then holds approximations."""
    import warnings

    keys = [f"{m}.weight" for m in modules]
    sub_base = {k: base[k] for k in keys}
    subs = [{k: e.backbone[k] for k in keys} for e in experts]
    lora_rank = suite.expert_rank()
    if p.rank is None and lora_rank is not None:
        try:
            return ([lora_factors(sub_base, sub, int(lora_rank), tol=p.factor_tol) for sub in subs],
                    {"factor_rank": int(lora_rank), "factors_exact": True})
        except BenchError as err:
            warnings.warn(f"experts are not rank-{lora_rank} LoRA updates ({err}); approximating them by a "
                          f"rank-16 truncated SVD (set 'rank' to choose)", stacklevel=2)
    rank = p.rank or 16
    return ([lora_factors(sub_base, sub, rank, tol=1.0) for sub in subs],
            {"factor_rank": rank, "factors_exact": False})


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
    cut = Split(data.inputs[:n], data.labels[:n])
    return dataclasses.replace(task, **{split: cut}, fingerprint=f"{task.fingerprint or task.name}|{split}:{n}")


def pooled_features(suite: Suite, module: nn.Module, tasks: Sequence[TaskData], split: Literal["train", "val"],
                    budget: Budget, limit: int, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, d), task ids (N,))`` of the first ``limit`` inputs of ``split`` of every task."""
    feats, labels = [], []
    with torch.no_grad():
        for i, t in enumerate(tasks):
            for batch in suite.batches(t, split, budget, limit=limit):
                f = suite.pooled(module, batch, source).float()
                feats.append(f)
                labels.append(torch.full((f.shape[0],), i, dtype=torch.long))
    if not feats:
        raise BenchError(f"no {split} inputs to train the router on")
    return torch.cat(feats), torch.cat(labels)


#: forward keywords of the scored call that are not model inputs (the suite's ``pooled`` sets its own)
CONTROL_KWARGS = frozenset({"logits_to_keep", "use_cache", "output_hidden_states", "output_attentions", "return_dict",
                            "labels", "past_key_values", "cache_position"})


class SuiteFinalFeatures:
    """``feature_fn`` of a routed model: the suite's ``"final"`` pooled features of the (gate-free) base, from the
    call's input keywords (control keywords such as ``logits_to_keep`` dropped)."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite

    def __call__(self, base: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in kwargs.items() if k not in CONTROL_KWARGS}
        mask = inputs.get("attention_mask")
        batch = Batch(inputs, torch.empty(0, dtype=torch.long), mask if isinstance(mask, torch.Tensor) else None)
        return self.suite.pooled(base, batch, "final")


def uniform_router(in_dim: int, n_out: int) -> Router:
    """A router whose logits are all zero: probabilities ``1/T`` for every input."""
    r = Router(in_dim, n_out, hidden=1, layers=1)
    with torch.no_grad():
        for prm in r.parameters():
            prm.zero_()
    return r


@dataclasses.dataclass
class FittedRouter:
    router: Router
    source: Source
    meta: dict[str, Any]


def fit_router(suite: Suite, module: nn.Module, tasks: Sequence[TaskData], budget: Budget, p: RouterParams,
               seed: int) -> FittedRouter:
    """Train the router on the requested feature source(s) of ``module`` (frozen) and pick one (module doc)."""
    sources: list[Source] = ["embeddings", "final"] if p.feature_source == "auto" else [p.feature_source]
    fitted: dict[str, tuple[Router, float]] = {}
    meta: dict[str, Any] = {"router_val_acc": {}, "router_train_acc": {}, "router_examples": {}}
    for src in sources:
        x, y = pooled_features(suite, module, tasks, "train", budget, p.router_examples, src)
        router, info = train_router(x, y, len(tasks), epochs=p.router_epochs, lr=p.router_lr,
                                    batch_size=p.router_batch_size, hidden=p.router_hidden, layers=p.router_layers,
                                    seed=seed)
        xv, yv = pooled_features(suite, module, tasks, "val", budget, p.router_val_examples, src)
        with torch.no_grad():
            acc = float((router(xv).argmax(-1) == yv).float().mean())
        fitted[src] = (router, acc)
        meta["router_val_acc"][src] = acc
        meta["router_train_acc"][src] = info["train_acc"]
        meta["router_examples"][src] = int(x.shape[0])
    if len(fitted) == 2:
        chosen: Source = ("embeddings" if fitted["embeddings"][1] >= fitted["final"][1] - p.feature_tolerance
                          else "final")
    else:
        chosen = sources[0]
    meta["feature_source"] = chosen
    return FittedRouter(fitted[chosen][0], chosen, meta)


def routing_kwargs(suite: Suite, source: Source) -> dict[str, Any]:
    """``feature_module`` / ``feature_fn`` of :class:`RoutedModel` for a feature source."""
    if source == "embeddings":
        return {"feature_module": suite.feature_module(), "feature_fn": None}
    fn = getattr(suite, "final_feature_fn", None)  # a registered function, so a saved model can name it
    return {"feature_module": None, "feature_fn": fn or SuiteFinalFeatures(suite)}


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
    """MIN-Merging (METHODS.md §3): enhancement, router, hierarchical top-k gates over LoRA branches."""
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
    return RoutedBuild(model, meta, _storage(model), backbone_changed=an["backbone"] is not base_state)


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
    """Twin-Merging (METHODS.md §4): backbone ``θ* = θ0 + λΣτ_t``, exclusive ``SVD_r(θ_t − θ*)``, soft gates."""
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
    return RoutedBuild(model, meta, _storage(model), backbone_changed=True)


def build_emr(suite: Suite, base_state: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
              budget: Budget, params: EMRParams | Mapping[str, Any] | None = None, seed: int = 0, *,
              memo: Memo | None = None) -> RoutedBuild:
    """EMR-Merging (METHODS.md §4) on the routed linear weights; other tensors averaged into the backbone."""
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
                       backbone_changed=backbone is not base_state)


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
        raise BenchError(f"unknown routed method {name!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    try:
        p = v.params.model_validate({**dict(params or {}), **v.overrides})
    except ValidationError as err:
        raise BenchError(f"bad parameters for {name}: {err}") from None
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


# ------------------------------------------------------------------------------------------------ protocol
def _memo_for(ctx: Any) -> Memo:
    """The run's :class:`Memo`, kept on the protocol context (it lives exactly as long as the run)."""
    memo = getattr(ctx, "_routed_memo", None)
    if memo is None:
        memo = Memo()
        ctx._routed_memo = memo
    return memo


def bench_runner(ctx: Context, name: str) -> Produced:
    """The protocol's :data:`~.protocol.Runner` for a routed variant: build (shared work memoised per run),
    then latency at batch 1 and 32 on the first in-domain task (the static backbone's latency in ``info``)."""
    from .protocol import Produced

    memo = _memo_for(ctx)
    experts = [ctx.experts[t.name] for t in ctx.in_domain]
    t0 = time.perf_counter()
    with ctx.clock("merging"):
        built = build_variant(name, ctx.suite, ctx.base, experts, ctx.in_domain, ctx.budget, None, ctx.seed,
                              memo=memo)
    info = {"method": name, "build_s": time.perf_counter() - t0, **built.meta}
    task, head = ctx.in_domain[0], experts[0].head
    latency = measure_latency(ctx.suite, built.model, head, task, ctx.budget)
    info["latency_static_ms"] = memo.get(("latency-static",), lambda: measure_latency(
        ctx.suite, ctx.suite.module(ctx.base), head, task, ctx.budget))
    resolved = resolve_params(name, None, bool(ctx.budget.quick))
    info["params_all"] = resolved.model_dump()
    params = resolved.model_dump(exclude_defaults=True)  # the table shows what differs from the documented defaults
    return Produced(module=built.model, params=params, info=info, storage_bytes=built.storage_bytes,
                    latency_ms=latency, oracle=built.oracle)


def runners() -> dict[str, tuple[Runner, bool]]:
    """name → (runner, transductive) of every routed variant, for :func:`.extra_methods.runners`."""
    return {name: (bench_runner, False) for name in VARIANTS}


__all__ = [
    "VARIANTS",
    "EMRParams",
    "HFSuite",
    "MinMergingParams",
    "RouteBuildConfig",
    "RoutedBuild",
    "RouterParams",
    "SuiteFinalFeatures",
    "TwinParams",
    "build_emr",
    "build_from_config",
    "build_inputs",
    "build_min_merging",
    "build_twin",
    "build_variant",
    "fit_router",
    "measure_latency",
    "runners",
    "score_routed",
    "validate_route_build",
]


# ------------------------------------------------------------------------------------------------ route build CLI
class RouteBuildConfig(BaseModel):
    """``neuromerge route build METHOD -o OUT --config CONFIG`` for a Hugging Face base and PEFT LoRA adapters.

    ``experts`` maps each task of the ``tasks`` file (:mod:`~neuromerge.bench.taskfile`, entries of suite ``text``
    or ``llm``: JSONL / CSV of text and label) to the adapter trained on it, in router order. Each task's data is
    split 60 / 20 / 20 (seeded); the train split feeds the router and the calibration, the validation split the
    router choice and MIN-Merging's layer importance, scored by a linear probe fit on the expert's final features
    (the adapters' own heads are not used). A relative path is taken as written when it exists from the working
    directory, else relative to the config file's folder (as ``neuromerge merge`` does); the routed folder records
    absolute paths, so it loads from any working directory. ``base`` may be a Hugging Face id in the local cache
    (downloaded only with ``--allow-download``). :func:`validate_route_build` checks every path, the task file and
    the method's parameters before anything is loaded or fitted."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="local Hugging Face model folder (config, weights, tokenizer)")
    tasks: str = Field(description="task file (YAML) listing the data of every expert's task")
    experts: dict[str, str] = Field(min_length=1, description="task name -> PEFT LoRA adapter folder")
    variant: str | None = Field(None, description="a variant of METHOD (e.g. min_merging:no_hierarchy)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    embed_base: bool = Field(False, description="store the base weights in the routed folder")
    seq_len: int = Field(64, ge=4)
    batch_size: int = Field(16, ge=1)
    train_examples: int = Field(1000, ge=1)
    val_examples: int = Field(200, ge=1)
    probe_steps: int = Field(100, ge=1)
    probe_l2: FiniteFloat = Field(1e-3, ge=0)
    seed: int = 0


class HFSuite(Suite):
    """A suite over a local Hugging Face model (encoder: ``AutoModel``; ``*ForCausalLM``: ``AutoModelForCausalLM``)
    with text tasks: mean-pooled features, linear-probe heads, the forward hooks of contract A."""

    name = "hf"
    description = "a Hugging Face model folder with user text tasks"

    def __init__(self, path: str, seq_len: int = 64, batch_size: int = 16) -> None:
        import transformers as tf

        self.path = str(path)
        try:  # a local folder (validate_route_build resolved any hub id): never a hub look-up from here
            cfg = tf.AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.causal = any(str(a).endswith("ForCausalLM") for a in (cfg.architectures or []))
            cls = tf.AutoModelForCausalLM if self.causal else tf.AutoModel
            self._template = cls.from_pretrained(self.path, dtype=torch.float32, local_files_only=True).eval()
            self.tokenizer = tf.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BenchError(f"cannot load the base model and tokenizer from {self.path}: {first}") from None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.tokenizer.eos_token_id or 0)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank: int | None = None  # the adapters' LoRA rank, set once they are read
        self._tokens: dict[tuple, list[list[int]]] = {}
        from ..routing.runtime import final_hidden_mean

        self.final_feature_fn = final_hidden_mean  # saved by name in the routed folder

    def budget(self, quick: bool) -> Budget:
        return Budget(quick=quick)

    def expert_rank(self) -> int | None:
        return self.rank

    def tasks(self, budget: Budget) -> list[TaskData]:
        raise BenchError("HFSuite tasks come from the route build config")

    def backbone_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self._template.state_dict().items()}

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        raise BenchError("HFSuite experts are adapters")

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        from .text import fit_linear

        model = self.module(backbone)
        with torch.no_grad():
            feats = torch.cat([self.pooled(model, b, "final") for b in self.batches(task, "train", budget)])
            labels = torch.cat([b.labels for b in self.batches(task, "train", budget)])
        return fit_linear(feats, labels, task.num_classes, steps=budget.probe_steps,
                          l2=float(budget.extra.get("probe_l2", 1e-3)))

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: Any,
                 budget: Budget) -> float:
        return self.evaluate_module(self.module(backbone), head, task, split, budget)

    def module(self, backbone: StateDict) -> nn.Module:
        import copy

        m = copy.deepcopy(self._template)
        m.load_state_dict(backbone, strict=True)
        return m.eval()

    def batches(self, task: TaskData, split: Any, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        from .suite import token_batches

        key = (task.fingerprint or task.name, split)
        if key not in self._tokens:
            texts = [str(x) for x in getattr(task, split).inputs]
            enc = self.tokenizer(texts, truncation=True, max_length=self.seq_len) if texts else {"input_ids": []}
            self._tokens[key] = [list(s) for s in enc["input_ids"]]
        seqs = self._tokens[key] if limit is None else self._tokens[key][:limit]
        return token_batches(seqs, getattr(task, split).labels, batch_size or self.batch_size, self.pad_id)

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        if head is None:
            raise BenchError(f"task {task.name!r} needs a probe head")
        return self.pooled(module, batch, "final") @ head["weight"].T + head["bias"]

    def pooled(self, module: nn.Module, batch: Batch, source: Source) -> torch.Tensor:
        from .suite import mean_pool, module_output

        if batch.mask is None:
            raise BenchError("HFSuite batches carry an attention mask")
        if source == "final":
            out = module(**batch.inputs, output_hidden_states=True)
            hidden = getattr(out, "last_hidden_state", None)
            hidden = out.hidden_states[-1] if hidden is None else hidden
        else:
            hidden = module_output(module, self.feature_module(), batch.inputs)
        return mean_pool(hidden.float(), batch.mask)

    def feature_module(self) -> str:
        if self.causal:
            return "model.embed_tokens"
        return "embeddings"

    def expert_state(self, base: StateDict, adapter: str) -> tuple[StateDict, int]:
        """``θ0 + s·B·A`` of a PEFT LoRA adapter over this model (:class:`~neuromerge.io.lora.LoraCheckpoint`) and
        the adapter's rank."""
        from ..io.checkpoint import open_checkpoint
        from ..io.lora import open_lora

        with open_checkpoint(self.path) as ckpt, open_lora(Path(adapter), ckpt) as lora:
            names = set(lora.names())
            prefix = _name_prefix(names, list(base))
            state = dict(base)
            for k, w0 in base.items():
                name = prefix + k if prefix + k in names else k
                if name in names and lora.changed(name):
                    state[k] = lora.read(name).to(w0.dtype).reshape(w0.shape)
            rank = max((int(lora.adapter.info(s.a).shape[0]) for s in lora.modules.values()), default=0)
        return state, rank


def _name_prefix(names: set[str], keys: Sequence[str]) -> str:
    """The prefix the checkpoint adds to the module's state-dict keys (``""``, ``"bert."``, …)."""
    for k in keys:
        if k in names:
            return ""
        hit = next((n for n in names if n.endswith("." + k)), None)
        if hit is not None:
            return hit[: -len(k)]
    return ""


#: files any of which gives a base folder a tokenizer (``tokenizer_config.json`` alone: byte-level tokenizers)
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def validation_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem of a pydantic error: ``"{prefix}{field}: {message}"`` (an unknown key: ``"unknown
    key"``; a missing one: ``"missing (required)"``)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = {"extra_forbidden": "unknown key", "missing": "missing (required)"}.get(e["type"], e["msg"])
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('. ')}: {msg}")
    return lines


def _locate(raw: str, base_dir: Path | None) -> tuple[Path, bool]:
    """``(absolute path, exists)`` of a path from a route config: as written when it exists (absolute, or relative
    to the working directory), else relative to the config file's folder ``base_dir`` (``neuromerge merge``'s rule);
    a path found nowhere is returned as written (absolute)."""
    p = Path(raw).expanduser()
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    return Path(os.path.abspath(p)), p.exists()


def _nowhere(raw: str, base_dir: Path | None) -> str:
    """Where a missing relative path was looked for (empty for an absolute one)."""
    if Path(raw).expanduser().is_absolute():
        return ""
    places = [str(Path.cwd() / raw)] + ([str(base_dir / raw)] if base_dir is not None else [])
    return f" (looked for {' and '.join(dict.fromkeys(places))})"


def _check_base(raw: str, base_dir: Path | None, allow_download: bool) -> tuple[str, Path | None, list[str]]:
    """``(reference to record, local folder or None, problems)`` of the config's ``base``: a local Hugging Face
    folder (config.json + a tokenizer), else an ``org/name`` id in the local hub cache, downloaded only with
    ``allow_download``."""
    from ..io.hub import cached_snapshot, hf_cache_dir, looks_like_hf_id, resolve_hf_id

    path, exists = _locate(raw, base_dir)
    ref = str(path)
    if not exists:
        if not looks_like_hf_id(raw):
            return raw, None, [f"base: model folder {raw} does not exist{_nowhere(raw, base_dir)}"]
        snapshot = cached_snapshot(raw)
        if snapshot is None and not allow_download:
            return raw, None, [f"base: {raw} is neither a local folder{_nowhere(raw, base_dir)} nor a model in the "
                               f"local Hugging Face cache ({hf_cache_dir()}); pass --allow-download to fetch it "
                               "from the hub"]
        if snapshot is None:
            try:
                snapshot = resolve_hf_id(raw, allow_download=True)
            except Exception as err:  # the hub client's many error types: one line for the user
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                return raw, None, [f"base: cannot download {raw} from the Hugging Face hub: {first}"]
        path, ref = snapshot, raw  # a hub id is recorded as the id (load_routed finds it in the cache)
    if not path.is_dir():
        return ref, None, [f"base: {path} is not a folder; give a Hugging Face model folder (config.json, weights, "
                           "tokenizer)"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"base: {path} has no config.json; give a Hugging Face model folder")
    if not any((path / name).is_file() for name in TOKENIZER_VOCAB):
        problems.append(f"base: {path} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB[:5])}, …); save it "
                        "there with tokenizer.save_pretrained")
    return ref, path, problems


def validate_route_build(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                         allow_download: bool = False, check_params: Callable[[Mapping[str, Any]], Any] | None = None,
                         out: Path | None = None, force: bool = False) -> tuple[RouteBuildConfig, str]:
    """``(config with absolute paths, base reference to record)`` of a ``route build`` config, before anything is
    loaded or fitted; :class:`BenchError` listing *every* problem, one per line, each prefixed by the config file
    (``source``, relative paths resolved against its folder) or ``route build config``:

    the fields (:class:`RouteBuildConfig`), the base (:func:`_check_base`: a folder with config.json and a
    tokenizer, or a cached / downloaded hub id), the task file (parsed, every expert's task present, its data file
    present), each adapter (a folder with ``adapter_config.json``), the method's parameters (``check_params``) and
    the output folder (exists without ``force``)."""
    from ..io.lora import ADAPTER_CONFIG
    from .taskfile import read_entries

    where = f"{source}: " if source is not None else "route build config: "
    base_dir = Path(os.path.abspath(Path(source).parent)) if source is not None else None
    problems: list[str] = []
    cfg: RouteBuildConfig | None = None
    try:
        cfg = RouteBuildConfig.model_validate(dict(raw))
    except ValidationError as err:
        problems += validation_lines(err)
    ref, base_path = None, None
    if isinstance(raw.get("base"), str):
        ref, base_path, found = _check_base(raw["base"], base_dir, allow_download)
        problems += found
    tasks_path = None
    if isinstance(raw.get("tasks"), str):
        tasks_path, exists = _locate(raw["tasks"], base_dir)
        if not exists:
            problems.append(f"tasks: task file {raw['tasks']} does not exist{_nowhere(raw['tasks'], base_dir)}")
            tasks_path = None
    experts = raw.get("experts") if isinstance(raw.get("experts"), Mapping) else {}
    adapters: dict[str, str] = {}
    for name, adapter in experts.items():
        if not isinstance(adapter, str):
            continue  # reported by the field validation
        path, exists = _locate(adapter, base_dir)
        adapters[str(name)] = str(path)
        if not exists:
            problems.append(f"experts.{name}: adapter folder {adapter} does not exist{_nowhere(adapter, base_dir)}")
        elif not (path / ADAPTER_CONFIG).is_file():
            problems.append(f"experts.{name}: {path} has no {ADAPTER_CONFIG}; give a PEFT LoRA adapter folder")
    if tasks_path is not None:
        try:
            entries = {e.name: e for e in read_entries(tasks_path) if e.suite in ("text", "llm")}
        except BenchError as err:
            problems.append(f"tasks: {err}")
        else:
            for name in experts:
                e = entries.get(str(name))
                if e is None:
                    problems.append(f"experts.{name}: no task {str(name)!r} of suite text or llm in {tasks_path} "
                                    f"(found: {', '.join(entries) or 'none'})")
                    continue
                data = Path(e.file) if Path(e.file).is_absolute() else tasks_path.parent / e.file
                if not data.is_file():
                    problems.append(f"tasks: task {e.name!r}: data file {data} does not exist")
    params = raw.get("params", {})
    if check_params is not None and isinstance(params, Mapping):  # checked even when other fields are wrong
        try:
            check_params(params)
        except ValidationError as err:
            problems += validation_lines(err, "params.")
        except BenchError as err:
            problems += [f"params: {line}" for line in str(err).splitlines()]
    lines = [where + p for p in problems]
    if out is not None and Path(out).exists() and not force:
        lines.append(f"output folder {out} exists; pass --force to replace it")
    if lines or cfg is None:
        raise BenchError("\n".join(lines))
    cfg = cfg.model_copy(update={"base": str(base_path), "tasks": str(tasks_path), "experts": adapters})
    return cfg, str(ref)


def build_inputs(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                 allow_download: bool = False, checked: tuple[RouteBuildConfig, str] | None = None
                 ) -> tuple[RouteBuildConfig, HFSuite, Budget, list[TaskData], StateDict, list[Expert]]:
    """A validated :class:`RouteBuildConfig` (:func:`validate_route_build`, or ``checked``: its result) and what a
    builder needs from it: the suite over the base, the budget, the tasks (router order), the base state and one
    expert per task (merged adapter + a probe head). Every adapter is read before the first probe is fitted."""
    from .taskfile import load_task_file

    cfg, _ = checked if checked is not None else validate_route_build(raw, source=source,
                                                                      allow_download=allow_download)
    suite = HFSuite(cfg.base, cfg.seq_len, cfg.batch_size)
    budget = Budget(eval_examples=cfg.val_examples, batch_size=cfg.batch_size, probe_steps=cfg.probe_steps,
                    extra={"train_examples": cfg.train_examples, "val_examples": cfg.val_examples,
                           "probe_l2": cfg.probe_l2})
    found = {t.name: t for s in ("text", "llm") for t in load_task_file(cfg.tasks, s, budget, split_seed=cfg.seed)}
    missing = [n for n in cfg.experts if n not in found]
    if missing:
        raise BenchError(f"task(s) {', '.join(missing)} not in {cfg.tasks} (found: {', '.join(found) or 'none'})")
    tasks = [found[n] for n in cfg.experts]
    base = suite.backbone_state()
    states = [suite.expert_state(base, cfg.experts[t.name]) for t in tasks]  # every adapter read before any probe
    experts = [Expert(t.name, state, suite.fit_probe(state, t, budget, cfg.seed), float("nan"))
               for t, (state, _) in zip(tasks, states, strict=True)]
    suite.rank = max(r for _, r in states) if states else None
    return cfg, suite, budget, tasks, base, experts


def build_from_config(method: str, raw: Mapping[str, Any], out: Path, *, force: bool = False,
                      source: str | os.PathLike[str] | None = None, allow_download: bool = False) -> Path:
    """Build and save a routed model from a :class:`RouteBuildConfig` (the ``route build`` CLI; ``source``: the
    config file, relative paths resolve against its folder; ``allow_download``: a base given as a hub id missing
    from the cache may be downloaded)."""
    from ..routing.folder import save_routed

    variant = raw.get("variant") or method
    if not isinstance(variant, str) or variant.split(":")[0] != method or (variant not in VARIANTS
                                                                          and variant != "emr"):
        raise BenchError(f"variant {variant!r} is not a variant of {method!r}; known: {', '.join(VARIANTS)}")
    variant = "emr:router" if variant == "emr" else variant
    if variant == "min_merging:uniform_router" or VARIANTS[variant].oracle:
        raise BenchError(f"{variant} is a bench ablation; a saved routed model needs a trained router")
    checked = validate_route_build(raw, source=source, allow_download=allow_download, out=out, force=force,
                                   check_params=lambda p: VARIANTS[variant].params.model_validate(
                                       {**dict(p), **VARIANTS[variant].overrides}))
    cfg, suite, budget, tasks, base, experts = build_inputs(raw, checked=checked)
    built = build_variant(variant, suite, base, experts, tasks, budget, cfg.params, cfg.seed)
    embed = cfg.embed_base or built.backbone_changed
    extra = {"variant": variant, "storage_bytes": built.storage_bytes, "meta": built.meta,
             "config": cfg.model_dump()}
    return save_routed(built.model, out, base_ref=checked[1], embed_base=embed, tasks=[t.name for t in tasks],
                       method=method, extra=json.loads(json.dumps(extra, default=str)), force=force)


def build_wemoe_from_config(raw: Mapping[str, Any], out: Path, *, force: bool = False,
                            source: str | os.PathLike[str] | None = None, allow_download: bool = False) -> Path:
    """``neuromerge route build wemoe``: WEMoE's routers trained by entropy minimization on the unlabelled test
    split of each task file entry (``params``: :class:`~neuromerge.data_aware.wemoe.WEMoEParams`), saved with
    :func:`neuromerge.routing.wemoe.save_wemoe`."""
    from ..data_aware.wemoe import WEMoEParams, wemoe_merge_models
    from ..routing.wemoe import save_wemoe

    if raw.get("variant") not in (None, "wemoe"):
        raise BenchError(f"wemoe has no variant {raw.get('variant')!r}")
    checked = validate_route_build(raw, source=source, allow_download=allow_download, out=out, force=force,
                                   check_params=WEMoEParams.model_validate)
    cfg, suite, budget, tasks, base, experts = build_inputs(raw, checked=checked)
    params = WEMoEParams.model_validate(cfg.params)
    info: dict[str, Any] = {}
    model = wemoe_merge_models(suite, base, [e.backbone for e in experts], [e.head for e in experts], tasks, budget,
                               params, seed=cfg.seed, info=info)
    extra = {"variant": "wemoe", "meta": info, "config": cfg.model_dump()}
    return save_wemoe(model, out, base_ref=checked[1], embed_base=cfg.embed_base, tasks=[t.name for t in tasks],
                      extra=json.loads(json.dumps(extra, default=str)), force=force)
