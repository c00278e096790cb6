"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR, arXiv
2310.02575).

Merging coefficients are learned at test time by minimizing the prediction entropy of the merged model on
*unlabelled test inputs* of every task (transductive: the paper's protocol; marked as such in the bench)::

    θ(λ) = θ0 + Σ_t λ_t^l τ_t^l,     min_λ Σ_t (1/|B_t|) Σ_{x∈B_t} H(softmax(f_t(x; θ(λ))))

``granularity: layer`` — one ``λ_t^l`` per task and per tensor ``l`` (the official "layer-wise" AdaMerging, whose
"layers" are the parameter tensors); ``task`` — one ``λ_t`` per task. Official defaults: init 0.3, ``λ`` clamped to
[0, 1] when used (``torch.clamp`` of the raw parameters; a raw value outside the box gets no gradient), Adam
(lr 1e-3, betas (0.9, 0.999)), 500 steps, batch 16, each step one batch per task, the task losses summed. Each task's
logits use its own expert's head. **AdaMerging++** (``ties: true``) replaces each ``τ_t`` by its TIES-selected
entries first: global top-``density`` (20 %) trim per task, elected sign ``sign(Σ_t τ̂_t)`` (0 → majority),
entries agreeing with it (official ``ties_merging_split(reset_thresh=0.2, merge_func="sum")``).

The merged model is evaluated through :func:`torch.func.functional_call` on one backbone module with the combined
tensors, so no model is rebuilt per step. The test batches cycle deterministically (step ``s`` uses batch ``s mod
n``) instead of the official shuffled loader.

Sources: official code ``EnnengYang/AdaMerging`` (``main_task_wise_adamerging.py``, ``main_layer_wise_adamerging.py``,
``main_layer_wise_adamergingpp.py``, ``ties_merging_utils.py``); fusion-bench
``fusion_bench.method.adamerging`` (which defaults to ``clamp_weights: false`` and 1000 steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from ..tensors.consensus import agreement_mask, elect_sign
from ..tensors.selection import magnitude_threshold
from .access import (
    DataParams,
    LogitsCall,
    ModelAccess,
    StateDict,
    cycle,
    entropy,
    entropy_descent,
    example_batches,
    functional_logits,
    mergeable_names,
    task_name,
    tied_aliases,
)

Granularity = Literal["layer", "task"]


class AdaMergingParams(DataParams):
    granularity: Granularity = Field("layer", description="one λ per task and tensor (layer) or per task (task)")
    steps: int = Field(500, ge=0, description="Adam steps (official 500)")
    lr: FiniteFloat = Field(1e-3, gt=0, description="Adam learning rate (official 1e-3)")
    init: FiniteFloat = Field(0.3, description="initial λ (official 0.3)")
    clamp: bool = Field(True, description="clamp λ to [0, 1] (official; fusion-bench's default is off)")
    batch_size: int = Field(16, ge=1, description="unlabelled test inputs per task per step (official 16)")
    examples: int | None = Field(None, ge=1, description="unlabelled test inputs per task (default: the suite's "
                                 "evaluation subset)")
    ties: bool = Field(False, description="AdaMerging++: TIES-select each task vector first")
    density: FiniteFloat = Field(0.2, gt=0, le=1, description="AdaMerging++ kept fraction per task (official 0.2)")


class AdaMergingPPParams(AdaMergingParams):
    ties: bool = Field(True, description="AdaMerging++: TIES-select each task vector first")


# --------------------------------------------------------------------------------------------------- pure functions
def combine(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]], lambdas: torch.Tensor,
            names: Sequence[str]) -> StateDict:
    """``θ_l = θ0_l + Σ_t λ[t, l] τ_t,l`` for ``lambdas`` of shape ``(T, len(names))`` (layer-wise) or ``(T, 1)``
    (task-wise); differentiable in ``lambdas``."""
    layer_wise = lambdas.shape[1] > 1
    out: StateDict = {}
    for i, n in enumerate(names):
        col = lambdas[:, i if layer_wise else 0]
        out[n] = base[n] + sum(col[t] * d[n] for t, d in enumerate(deltas))
    return out


def ties_task_vectors(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], density: float
                      ) -> list[StateDict]:
    """AdaMerging++'s task vectors: per task the global top-``density`` entries of ``|τ_t|`` over ``names``, then
    only the entries whose sign agrees with the elected ``sign(Σ_t τ̂_t)`` (0 → majority sign of the tensor)."""
    thresholds = [magnitude_threshold(torch.cat([d[n].reshape(-1) for n in names]), density) for d in deltas]
    out: list[StateDict] = [{} for _ in deltas]
    for n in names:
        trimmed = torch.stack([d[n] * (d[n].abs() >= thr) for d, thr in zip(deltas, thresholds, strict=True)])
        kept = trimmed * agreement_mask(trimmed, elect_sign(trimmed))
        for t in range(len(deltas)):
            out[t][n] = kept[t]
    return out


def clamped(raw: torch.Tensor, clamp: bool) -> torch.Tensor:
    """The λ in use: ``clamp(raw, 0, 1)`` (official) or ``raw``."""
    return raw.clamp(0.0, 1.0) if clamp else raw


def learn_coefficients(task_loss: Callable[[StateDict, int, int], torch.Tensor], base: Mapping[str, torch.Tensor],
                       deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str],
                       params: AdaMergingParams) -> tuple[torch.Tensor, list[float]]:
    """Adam on raw coefficients (init ``params.init``) minimizing ``Σ_t task_loss(θ(λ), t, step)``; returns the
    final (clamped) ``λ`` of shape ``(T, L)`` or ``(T, 1)`` and the loss of every step."""
    cols = len(names) if params.granularity == "layer" else 1
    raw = torch.full((len(deltas), cols), float(params.init), requires_grad=True)
    base_d = {n: base[n].detach().float() for n in names}
    deltas_d = [{n: d[n].detach().float() for n in names} for d in deltas]
    optimizer = torch.optim.Adam([raw], lr=params.lr, betas=(0.9, 0.999))
    history = entropy_descent(optimizer, lambda step: combine(base_d, deltas_d, clamped(raw, params.clamp), names),
                              task_loss, len(deltas), params.steps)
    return clamped(raw.detach(), params.clamp), history


# --------------------------------------------------------------------------------------------------- driver
def adamerging_merge_models(access: ModelAccess, base_state: StateDict, expert_states: Sequence[StateDict],
                            heads: Sequence[StateDict | None], tasks: Sequence[Any], budget: Any,
                            params: AdaMergingParams | None = None, *, exclude: Sequence[str] = (),
                            info: dict[str, Any] | None = None, split: str = "test") -> StateDict:
    """AdaMerging (``params.ties``: AdaMerging++) of the experts on unlabelled inputs of each task's ``split``
    (default *test*; the first ``params.examples``, default ``budget.eval_examples``: the inputs the suite
    evaluates on). Memory: the base, ``T`` task vectors (float32) and one module — ``T + 1`` model copies. Tensors
    matching ``exclude`` and non-floating ones are the base's."""
    params = params or AdaMergingParams()
    module = access.module(base_state)
    module.requires_grad_(False)
    merged_names = mergeable_names(base_state, exclude)
    aliases = tied_aliases(module, merged_names)
    names = [n for n in merged_names if n not in aliases]
    deltas = [{n: e[n].float() - base_state[n].float() for n in names} for e in expert_states]
    if params.ties:
        deltas = ties_task_vectors(deltas, names, params.density)
    limit = params.examples if params.examples is not None else getattr(budget, "eval_examples", None)
    data = [example_batches(access.batches(t, split, budget, limit=limit, batch_size=params.batch_size), limit)
            for t in tasks]
    if any(not batches for batches, _ in data):
        raise ValueError(f"AdaMerging: a task has no {split} inputs to adapt on")
    calls = [LogitsCall(access, module, h, t) for h, t in zip(heads, tasks, strict=True)]

    def task_loss(tensors: StateDict, t: int, step: int) -> torch.Tensor:
        return entropy(functional_logits(calls[t], tensors, cycle(data[t][0], step)))

    lambdas, history = learn_coefficients(task_loss, base_state, deltas, names, params)
    with torch.no_grad():
        final = combine({n: base_state[n].float() for n in names}, deltas, lambdas, names)
    merged = dict(base_state)
    merged.update({n: v.to(base_state[n].dtype) for n, v in final.items()})
    merged.update({a: merged[src] for a, src in aliases.items()})
    if info is not None:
        info.update({"split": split, "unlabelled": True, "examples": {task_name(t): n for t, (_, n) in
                                                                       zip(tasks, data, strict=True)},
                     "steps": params.steps, "granularity": params.granularity, "ties": params.ties,
                     "lambda_mean_per_task": [float(x) for x in lambdas.mean(dim=1)],
                     "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None})
    return merged
