"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR, arXiv
2212.09849).

For each linear layer ``y = W x + b`` the merged weight minimizes ``Σ_t ‖X_t W*ᵀ − X_t W_tᵀ‖²`` over the layer's
inputs ``X_t`` recorded on expert ``t`` with its own task data (train split, default 256 examples per task)::

    W*ᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ,   G_t = X_tᵀ X_t / n_t,   G̃_t = α G_t + (1 − α) diag(G_t)

(``α`` shrinks the off-diagonal entries: official ``reduce_non_diag(cov, a)`` / fusion-bench
``reduce_non_diagonal_elements``; ``α = 1`` is the plain least-squares solution). Every other merged tensor (biases,
norms, embeddings, linears whose weight is tied to another tensor) is averaged. ``G_t`` is the *mean* Gram over the
``n_t`` rows (tokens) seen, as fusion-bench's running mean and the official ``regmean_mean`` option, so tasks with
longer inputs do not dominate.

Memory (:func:`regmean_merge_models`): the experts are visited one at a time (``expert_states`` may be a lazy
sequence that reads an expert when indexed, as a user's merge does), so at most one expert *module* is held (plus
the state it is built from, while it is built), with the base state, the float32 running sums of the averaged
tensors, and — float64 — the Grams and running sums ``Σ_t G̃_t``, ``Σ_t G̃_t W_tᵀ`` (and ``Σ_t W_t``, the fallback
mean) of the linear layers being merged. Those layers are grouped in their execution order so that one group's
float64 buffers stay within ``gram_mb`` (a layer larger than that is a group of its own); each group is one pass over
the experts, the forward stopped after the group's last layer. One group (the default for models up to ~BERT-large)
reads each expert once; ``G`` groups read it ``G`` times.

Numerics (documented choice): Grams are accumulated in **float64** (sums of thousands of rank-one products; fp32
loses digits when inputs have large means, e.g. after LayerNorm), and the system is solved in float64 with
``torch.linalg.solve``, falling back to the pseudo-inverse when ``Σ_t G̃_t`` is singular (an input feature that is
always 0 — e.g. with ``α = 1`` and fewer rows than features); the result is cast back to the tensor's dtype.

Sources: official code ``bloomberg/dataless-model-merging`` (``regmean``, ``reduce_non_diag``); fusion-bench
``fusion_bench.method.regmean.regmean`` (``merging_with_regmean_weights``, ``regmean_merging``).

Differences from fusion-bench: padding tokens are left out of the Grams when the batch carries an attention mask
(``mask_padding``, default on; fusion-bench and the official code hook every position, padding included, which
biases ``G`` toward the pad embedding's hidden states); fusion-bench accumulates in fp32 and inverts with
``torch.inverse``; fusion-bench's default α (``reduce_non_diagonal_ratio``) is 0.1 (base config), 0.95 (CLIP), 0.6
(GPT-2); the official configs default to no reduction (α = 1, ``regmean_reduce_nondiag: -1``). Ours defaults to
α = 0.9 (issue #6's choice; the paper treats α as a hyper-parameter in [0, 1]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..numeric import FiniteFloat
from .access import BatchLike, DataParams, ModelAccess, StateDict, example_batches, mergeable_names, task_name


class RegMeanParams(DataParams):
    examples: int = Field(256, ge=1, description="training examples per task whose linear-layer inputs form the "
                          "Gram matrices (official / fusion-bench: 256)")
    alpha: FiniteFloat = Field(0.9, ge=0, le=1, description="G̃ = αG + (1−α)diag(G): scale of the off-diagonal Gram "
                         "entries (reduce_non_diagonal_ratio)")
    batch_size: int = Field(16, ge=1, description="batch size of the forward passes")
    mask_padding: bool = Field(True, description="leave padding tokens out of the Grams (fusion-bench keeps them)")
    gram_mb: FiniteFloat = Field(4096, gt=0, description="float64 memory (MiB) for the Grams and running sums of the "
                                 "linear layers merged in one pass over the experts (layers grouped in execution "
                                 "order; each extra group reads every expert once more)")


# --------------------------------------------------------------------------------------------------- pure functions
def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``G̃ = α G + (1 − α) diag(G)``: off-diagonal entries scaled by ``α``, the diagonal kept."""
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_merge_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float
                         ) -> torch.Tensor:
    """``W* = ((Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ)ᵀ`` for weights ``(out, in)`` and Grams ``(in, in)``; float64 solve
    (pseudo-inverse when singular), returned in the first weight's dtype."""
    reduced = [reduce_non_diagonal(g.double(), alpha) for g in grams]
    lhs = torch.stack(reduced).sum(0)
    rhs = torch.stack([g @ w.double().T for g, w in zip(reduced, weights, strict=True)]).sum(0)
    return solve_regmean(lhs, rhs).to(weights[0].dtype)


def solve_regmean(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``W* = (lhs⁻¹ rhs)ᵀ`` for ``lhs = Σ_t G̃_t`` ``(in, in)`` and ``rhs = Σ_t G̃_t W_tᵀ`` ``(in, out)``, float64
    (the pseudo-inverse when ``lhs`` is singular); returns ``(out, in)`` float64."""
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    return solution.T


def regmean_merge(states: Sequence[Mapping[str, torch.Tensor]], grams: Sequence[Mapping[str, torch.Tensor]], *,
                  alpha: float, names: Sequence[str] | None = None) -> StateDict:
    """Merge ``states``: ``NAME.weight`` (2-D) with a Gram ``NAME`` in every ``grams[t]`` by
    :func:`regmean_merge_linear`, every other tensor of ``names`` (default: every floating tensor of the first
    state) by the mean."""
    names = list(names) if names is not None else mergeable_names(states[0])
    out: StateDict = {}
    for n in names:
        module = n[: -len(".weight")] if n.endswith(".weight") else None
        if module is not None and states[0][n].dim() == 2 and all(module in g for g in grams):
            out[n] = regmean_merge_linear([s[n].float() for s in states], [g[module] for g in grams], alpha)
        else:
            out[n] = torch.stack([s[n].float() for s in states]).mean(0)
    return out


# --------------------------------------------------------------------------------------------------- data loop
def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input rows of a linear layer: ``(…, d) → (n, d)``, real tokens only when ``mask`` (B, T) fits."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class _Stop(Exception):
    """Raised by the pre-hook of the last linear layer a pass needs: the rest of the forward is skipped."""


def accumulate_grams(module: nn.Module, batches: Sequence[BatchLike], linear_names: Sequence[str] | None = None, *,
                     mask_padding: bool = True, dtype: torch.dtype = torch.float64, stop_after: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Mean Grams ``G = XᵀX / n`` of the inputs of ``module``'s ``nn.Linear`` layers (``linear_names``: a subset)
    over ``batches`` (forward pre-hooks, no grad, accumulated in ``dtype``). ``stop_after``: a layer after whose
    input the forward is abandoned (every wanted layer runs before it, each once). Returns ``(grams, rows)``;
    layers that never ran are absent."""
    linears = {n: m for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and (linear_names is None or n in linear_names)}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = _rows(args[0].detach(), mask[0] if mask_padding else None).to(dtype)
            xtx = x.T @ x
            if name in sums:
                sums[name].add_(xtx)
            else:
                sums[name] = xtx
            rows[name] = rows.get(name, 0) + int(x.shape[0])
            if name == stop_after:
                raise _Stop

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = b.mask
                with contextlib.suppress(_Stop):
                    module(**b.inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(rows[n], 1) for n, s in sums.items()}, rows


def linear_call_order(module: nn.Module, batch: BatchLike, linear_names: Sequence[str]) -> list[str]:
    """The order in which the layers ``linear_names`` of ``module`` receive their input on ``batch`` (one name per
    call: a layer called twice appears twice; a layer never called is absent)."""
    order: list[str] = []
    wanted = set(linear_names)
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
               for n, m in module.named_modules() if n in wanted]
    try:
        with torch.no_grad():
            module(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def pass_bytes(shape: Sequence[int]) -> int:
    """float64 bytes one linear layer ``(out, in)`` holds during a pass: ``Σ G̃`` and the expert's ``G`` (reduced in
    place; in² each), ``Σ G̃ Wᵀ`` and ``Σ W`` (in·out each)."""
    out, inp = int(shape[0]), int(shape[1])
    return 8 * (2 * inp * inp + 2 * inp * out)


def _reduce_in_place(gram: torch.Tensor, alpha: float) -> None:
    """:func:`reduce_non_diagonal` without a second ``(in, in)`` buffer."""
    diag = torch.diagonal(gram).clone()
    gram.mul_(alpha)
    torch.diagonal(gram).add_((1.0 - alpha) * diag)


def gram_groups(order: Sequence[str], shapes: Mapping[str, Sequence[int]], budget_bytes: int) -> list[list[str]]:
    """``order`` (layers in execution order) cut into consecutive groups whose :func:`pass_bytes` sum stays within
    ``budget_bytes`` (a layer larger than the budget is a group of its own)."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in order:
        n = pass_bytes(shapes[name])
        if current and size + n > budget_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        groups.append(current)
    return groups


def regmean_linears(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose ``.weight`` is merged (in ``names``) and not tied to another
    tensor (a tied LM head stays averaged with its embedding)."""
    counts: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    wanted = set(names)
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and f"{n}.weight" in wanted and counts.get(id(m.weight), 0) == 1]


# --------------------------------------------------------------------------------------------------- driver
class _Plan:
    """What the first expert module tells: the RegMean layers in execution order, their groups, whether a pass may
    stop early, and the tensors that are averaged."""

    def __init__(self, module: nn.Module, first_batch: BatchLike, names: Sequence[str], budget_bytes: int) -> None:
        linears = regmean_linears(module, names)
        order = linear_call_order(module, first_batch, linears)
        self.early_stop = len(order) == len(set(order))  # a layer called twice: full passes (its every call counts)
        order = list(dict.fromkeys(order))
        shapes = {n: tuple(module.get_submodule(n).weight.shape) for n in order}
        self.groups = gram_groups(order, shapes, budget_bytes)
        solved = {f"{n}.weight" for n in order}
        self.averaged = [n for n in names if n not in solved]
        self.max_pass_bytes = max((sum(pass_bytes(shapes[n]) for n in g) for g in self.groups), default=0)


def regmean_merge_models(access: ModelAccess, base_state: StateDict, expert_states: Sequence[StateDict],
                         heads: Sequence[StateDict | None], tasks: Sequence[Any], budget: Any,
                         params: RegMeanParams | None = None, *, exclude: Sequence[str] = (),
                         info: dict[str, Any] | None = None, split: str = "train") -> StateDict:
    """RegMean of the experts: each expert's linear-layer Grams on ``params.examples`` inputs of its own task's
    ``split`` (default *train*), folded into running sums one expert at a time (module docstring, "Memory"), then
    per layer :func:`solve_regmean`; the other merged tensors averaged. ``expert_states`` is indexed once per expert
    and pass (a lazy sequence may read the expert then). ``heads`` are not used (the Grams need only the backbone).
    Tensors matching ``exclude`` and non-floating ones are the base's."""
    params = params or RegMeanParams()
    names = mergeable_names(base_state, exclude)
    experts = len(expert_states)
    data = [example_batches(access.batches(task, split, budget, limit=params.examples, batch_size=params.batch_size),
                            params.examples) for task in tasks]
    for task, (batches, _) in zip(tasks, data, strict=True):
        if not batches:
            raise ValueError(f"RegMean: task {task_name(task)!r} has no {split} inputs")
    merged = dict(base_state)
    plan: _Plan | None = None
    averaged: StateDict = {}
    reads = 0
    g = 0
    while plan is None or g < len(plan.groups):
        sums: dict[str, list[Any]] = {}  # layer -> [Σ G̃_t, Σ G̃_t W_tᵀ, Σ W_t, experts with a Gram]
        for t in range(experts):
            module = access.module(expert_states[t])
            reads += 1
            if plan is None:
                plan = _Plan(module, data[t][0][0], names, int(params.gram_mb * 2**20))
                if not plan.groups:
                    plan.groups = [[]]
            group = plan.groups[g]
            if g == 0:  # the averaged tensors, float32 running sums
                state = module.state_dict()
                for n in plan.averaged:
                    v = state[n].detach().float()
                    if n in averaged:
                        averaged[n].add_(v)
                    else:
                        averaged[n] = v.clone()
                del state
            grams, _ = accumulate_grams(module, data[t][0], group, mask_padding=params.mask_padding,
                                        stop_after=group[-1] if group and plan.early_stop else None)
            for lin in group:
                w = module.get_submodule(lin).weight.detach().double()
                acc = sums.setdefault(lin, [0.0, 0.0, torch.zeros_like(w), 0])
                acc[2].add_(w)
                reduced = grams.pop(lin, None)
                if reduced is not None:
                    _reduce_in_place(reduced, params.alpha)
                    acc[0] = reduced if acc[3] == 0 else acc[0].add_(reduced)
                    acc[1] = acc[1] + reduced @ w.T
                    acc[3] += 1
                    del reduced
            del module, grams
        for lin in group:
            lhs, rhs, total, seen = sums.pop(lin)
            key = f"{lin}.weight"
            value = solve_regmean(lhs, rhs) if seen == experts else total / experts  # a layer that never ran: mean
            merged[key] = value.to(base_state[key].dtype)
        g += 1
    assert plan is not None
    for n in plan.averaged:
        merged[n] = (averaged.pop(n) / experts).to(base_state[n].dtype)
    if info is not None:
        info.update({"split": split, "examples": {task_name(t): n for t, (_, n) in zip(tasks, data, strict=True)},
                     "linear_layers": sum(len(gr) for gr in plan.groups), "passes": len(plan.groups),
                     "expert_reads": reads, "early_stop": plan.early_stop,
                     "pass_float64_bytes": plan.max_pass_bytes})
    return merged
