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
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    return solution.T.to(weights[0].dtype)


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


def accumulate_grams(module: nn.Module, batches: Sequence[BatchLike], linear_names: Sequence[str] | None = None, *,
                     mask_padding: bool = True, dtype: torch.dtype = torch.float64
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Mean Grams ``G = XᵀX / n`` of the inputs of ``module``'s ``nn.Linear`` layers (``linear_names``: a subset)
    over ``batches`` (forward pre-hooks, no grad, accumulated in ``dtype``). Returns ``(grams, rows)``; layers that
    never ran are absent."""
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

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = b.mask
                module(**b.inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(rows[n], 1) for n, s in sums.items()}, rows


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
def regmean_merge_models(access: ModelAccess, base_state: StateDict, expert_states: Sequence[StateDict],
                         heads: Sequence[StateDict | None], tasks: Sequence[Any], budget: Any,
                         params: RegMeanParams | None = None, *, exclude: Sequence[str] = (),
                         info: dict[str, Any] | None = None) -> StateDict:
    """RegMean of the experts: each expert's linear-layer Grams on ``params.examples`` inputs of its own task's
    *train* split, then :func:`regmean_merge`. ``heads`` are not used (the Grams need only the backbone). Tensors
    matching ``exclude`` and non-floating ones are the base's."""
    params = params or RegMeanParams()
    names = mergeable_names(base_state, exclude)
    grams: list[dict[str, torch.Tensor]] = []
    examples: dict[str, int] = {}
    for state, task in zip(expert_states, tasks, strict=True):
        module = access.module(state)
        batches, n = example_batches(access.batches(task, "train", budget, limit=params.examples,
                                                    batch_size=params.batch_size), params.examples)
        g, _ = accumulate_grams(module, batches, regmean_linears(module, names), mask_padding=params.mask_padding)
        grams.append(g)
        examples[task_name(task)] = n
        del module
    merged = dict(base_state)
    merged.update({n: v.to(base_state[n].dtype)
                   for n, v in regmean_merge(expert_states, grams, alpha=params.alpha, names=names).items()})
    if info is not None:
        info.update({"split": "train", "examples": examples, "linear_layers": len(grams[0]) if grams else 0})
    return merged
