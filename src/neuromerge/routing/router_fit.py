"""Router fitting over any implementation of the tasks contract (MERGE, MIN-Merging, Twin, EMR).

Router data: at most ``router_examples`` train inputs per in-domain task (label = task index), features
``suite.pooled(module, batch, source)`` of the frozen backbone; the router's accuracy on ``router_val_examples``
validation inputs per task is reported per source. ``feature_source="auto"`` trains both sources and keeps the
cheap ``"embeddings"`` one unless ``"final"`` beats it by more than ``feature_tolerance`` (1 point).
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
    from .runtime import FEATURE_FNS

    # a registered function (the suite names it), so a saved routed model can name it too
    fn = FEATURE_FNS.get(getattr(suite, "final_feature", None) or "")
    return {"feature_module": None, "feature_fn": fn or SuiteFinalFeatures(suite)}


__all__ = ["CONTROL_KWARGS", "FittedRouter", "RouterParams", "Source", "SuiteFinalFeatures", "fit_router",
           "pooled_features", "routing_kwargs", "uniform_router"]
