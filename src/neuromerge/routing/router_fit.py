"""Router fitting over any implementation of the tasks contract (MERGE, MIN-Merging, Twin, EMR).

Router data: at most ``router_examples`` train inputs per in-domain task (label = task index), features
``suite.pooled(module, batch, source)`` of the frozen backbone; the router's accuracy on ``router_val_examples``
validation inputs per task is reported per source. ``feature_source="auto"`` trains both sources and keeps the
cheap ``"embeddings"`` one unless ``"final"`` beats it by more than ``feature_tolerance`` (1 point).

Validation against chance (:func:`router_validation`, :func:`near_chance`): the router's accuracy on task ``t`` is
the share of ``t``'s validation inputs whose ``argmax`` over the ``T`` tasks is ``t``; chance is ``1/T`` (a router
guessing uniformly). Pooled over the tasks (:func:`pooled_validation`), chance is the majority share
``max_t n_t / Σ_t n_t`` (a router always naming the largest task). A router is *near chance* on a task when its
accuracy is below chance + :data:`NEAR_CHANCE_MARGIN` (5 points); with one task there is nothing to route and no
warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TaskError
from ..numeric import FiniteFloat
from ..tasks.contract import Batch, Budget, Suite, TaskData
from .router import Router, train_router

Source = Literal["embeddings", "final"]


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
        raise TaskError(f"no {split} inputs to train the router on")
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


#: a router whose accuracy is below chance + this margin (absolute, in [0, 1]) draws a warning
NEAR_CHANCE_MARGIN = 0.05


def router_validation(pred: torch.Tensor, target: torch.Tensor, names: Sequence[str],
                      train_n: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per task ``t``: ``{"accuracy": #{pred = t, target = t} / n_t, "n": n_t, "chance": 1/T, "train_n": router
    training inputs of t}`` from the router's predicted and true task ids ``(N,)`` of the validation inputs (module
    doc). A task without validation inputs gets ``accuracy`` None."""
    chance = 1.0 / max(1, len(names))
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        sel = target == i
        n = int(sel.sum())
        acc = float((pred[sel] == i).float().mean()) if n else None
        out[name] = {"accuracy": acc, "n": n, "chance": chance}
        if train_n is not None:
            out[name]["train_n"] = int(train_n[i])
    return out


def pooled_validation(validation: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"accuracy": Σ acc_t n_t / N, "n": N, "chance": max_t n_t / N}`` over the tasks of
    :func:`router_validation` (chance: the majority share)."""
    scored = [v for v in validation.values() if v.get("accuracy") is not None and v.get("n")]
    total = sum(int(v["n"]) for v in scored)
    if not total:
        return {"accuracy": None, "n": 0, "chance": None}
    return {"accuracy": sum(float(v["accuracy"]) * int(v["n"]) for v in scored) / total, "n": total,
            "chance": max(int(v["n"]) for v in scored) / total}


def near_chance(validation: dict[str, dict[str, Any]] | None, margin: float = NEAR_CHANCE_MARGIN) -> list[str]:
    """One line per task (then one for the pooled accuracy) whose router accuracy is below chance + ``margin``;
    empty with fewer than two tasks or no validation."""
    if not validation or len(validation) < 2:
        return []
    lines = []
    for name, v in validation.items():
        if v.get("accuracy") is not None and float(v["accuracy"]) < float(v["chance"]) + margin:
            lines.append(f"router accuracy on task {name!r} is {100 * float(v['accuracy']):.1f}% on {v['n']} "
                         f"validation inputs, near or below chance ({100 * float(v['chance']):.1f}%): its inputs "
                         "are routed to other experts")
    pooled = pooled_validation(validation)
    if pooled["accuracy"] is not None and pooled["accuracy"] < pooled["chance"] + margin:
        lines.append(f"router accuracy over all tasks is {100 * pooled['accuracy']:.1f}% on {pooled['n']} "
                     f"validation inputs, near or below chance (majority share {100 * pooled['chance']:.1f}%): the "
                     "router cannot tell the tasks apart; check that the tasks' inputs differ")
    return lines


@dataclasses.dataclass
class FittedRouter:
    """A trained router, its feature source, what :func:`fit_router` measured (``meta``) and the chosen source's
    per-task validation (:func:`router_validation`)."""

    router: Router
    source: Source
    meta: dict[str, Any]
    validation: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def fit_router(suite: Suite, module: nn.Module, tasks: Sequence[TaskData], budget: Budget, p: RouterParams,
               seed: int) -> FittedRouter:
    """Train the router on the requested feature source(s) of ``module`` (frozen) and pick one (module doc)."""
    sources: list[Source] = ["embeddings", "final"] if p.feature_source == "auto" else [p.feature_source]
    fitted: dict[str, tuple[Router, float]] = {}
    validation: dict[str, dict[str, dict[str, Any]]] = {}
    meta: dict[str, Any] = {"router_val_acc": {}, "router_train_acc": {}, "router_examples": {}}
    names = [t.name for t in tasks]
    for src in sources:
        x, y = pooled_features(suite, module, tasks, "train", budget, p.router_examples, src)
        router, info = train_router(x, y, len(tasks), epochs=p.router_epochs, lr=p.router_lr,
                                    batch_size=p.router_batch_size, hidden=p.router_hidden, layers=p.router_layers,
                                    seed=seed)
        xv, yv = pooled_features(suite, module, tasks, "val", budget, p.router_val_examples, src)
        with torch.no_grad():
            pred = router(xv).argmax(-1)
        acc = float((pred == yv).float().mean())
        validation[src] = router_validation(pred, yv, names, [int((y == i).sum()) for i in range(len(tasks))])
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
    return FittedRouter(fitted[chosen][0], chosen, meta, validation[chosen])


def routing_kwargs(suite: Suite, source: Source) -> dict[str, Any]:
    """``feature_module`` / ``feature_fn`` of :class:`RoutedModel` for a feature source."""
    if source == "embeddings":
        return {"feature_module": suite.feature_module(), "feature_fn": None}
    from .runtime import FEATURE_FNS

    # a registered function (the suite names it), so a saved routed model can name it too
    fn = FEATURE_FNS.get(getattr(suite, "final_feature", None) or "")
    return {"feature_module": None, "feature_fn": fn or SuiteFinalFeatures(suite)}


__all__ = ["CONTROL_KWARGS", "NEAR_CHANCE_MARGIN", "FittedRouter", "RouterParams", "Source", "SuiteFinalFeatures",
           "fit_router", "near_chance", "pooled_features", "pooled_validation", "router_validation", "routing_kwargs",
           "uniform_router"]
