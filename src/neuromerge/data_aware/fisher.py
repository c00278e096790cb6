"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS, arXiv 2111.09832).

Per parameter entry ``θ* = Σ_t c_t F̂_t θ_t / Σ_t c_t F̂_t`` with ``F̂_t = F_t + ε`` (``min_weight`` ε, default 1e-6:
the official ``fisher_floor`` and fusion-bench's ``minimal_fisher_weight``; an entry whose Fisher is 0 in every model
— a parameter the logits never reach — is thus plainly averaged). ``c_t = 1`` or, with ``normalize`` (fusion-bench's
``normalize_fisher_weight``, default on), ``c_t ∝ 1 / (‖F_t‖₂ + ε)`` with ``‖F_t‖₂`` the L2 norm of model ``t``'s
Fisher over every merged tensor — the constant of proportionality cancels, so the merge is *streamed*: one Fisher
at a time is computed and folded into the running numerator and denominator (:class:`FisherAccumulator`), never
``T`` Fishers at once.

Diagonal Fisher of expert ``t`` on ``N`` training inputs ``x_n`` of its own task (default ``N = 256``), expected over
the model's *predicted* label distribution (the "true" Fisher of the official code, not the empirical Fisher on
gold labels)::

    F_t = (1/N) Σ_n Σ_c p_θt(c | x_n) (∂ log p_θt(c | x_n) / ∂θ)²

computed exactly from per-example gradients: one forward per example and one backward per class
(:func:`diagonal_fisher`). The logits are the expert's head over its backbone (``access.logits``).

Sources: official code ``mmatena/model_merging`` (``fisher/`` and ``merging/``); fusion-bench
``fusion_bench.method.fisher_merging`` (``merging_with_fisher_weights``, ``get_models_fisher_norm``).

Differences from fusion-bench: fusion-bench (after MergeLM) squares the gradient of the *batch sum*
``Σ_b Σ_c √p_bc log p_bc`` — cross terms between examples and classes included, so it is not the diagonal Fisher
but an approximation of it; here each example and class is differentiated separately (exact). Buffers (not
parameters) are plainly averaged (fusion-bench merges parameters only). The merge formula is fusion-bench's
(verified equal within tolerance by the peer test); the normalization's common factor ``Σ_s 1/(‖F_s‖+ε)`` is not
applied (it cancels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..numeric import FiniteFloat
from .access import (
    BatchLike,
    DataParams,
    ModelAccess,
    StateDict,
    example_batches,
    mergeable_names,
    split_batch,
    task_name,
)


class FisherParams(DataParams):
    examples: int = Field(256, ge=1, description="training examples per task for each expert's Fisher "
                          "(Matena & Raffel / fusion-bench: 256+)")
    normalize: bool = Field(True, description="weight each model by 1/‖F_t‖₂ (fusion-bench normalize_fisher_weight)")
    min_weight: FiniteFloat = Field(1e-6, ge=0, description="ε added to every Fisher entry (official fisher_floor, "
                              "fusion-bench minimal_fisher_weight)")
    batch_size: int = Field(16, ge=1, description="batch size of the data loader (Fisher is per example anyway)")


# --------------------------------------------------------------------------------------------------- estimation
def parameter_groups(module: nn.Module, names: Sequence[str]) -> dict[nn.Parameter, list[str]]:
    """Each parameter of ``module`` listed in ``names`` with every state name it has (tied weights share one)."""
    wanted = set(names)
    groups: dict[nn.Parameter, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if n in wanted and p.is_floating_point():
            groups.setdefault(p, []).append(n)
    return groups


def diagonal_fisher(module: nn.Module, logits_fn: Callable[[BatchLike], torch.Tensor], batches: Sequence[BatchLike],
                    names: Sequence[str]) -> tuple[StateDict, int]:
    """``F = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)²`` over every example of ``batches``, for the parameters of
    ``module`` named in ``names`` (fp32; tied names share the value). Returns ``(fisher, N)``; the module's
    ``requires_grad`` flags are restored."""
    groups = parameter_groups(module, names)
    params = list(groups)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    try:
        for batch in batches:
            for example in split_batch(batch):
                log_probs = torch.log_softmax(logits_fn(example).float(), dim=-1)[0]
                probs = log_probs.detach().exp()
                classes = log_probs.shape[0]
                for c in range(classes):
                    grads = torch.autograd.grad(log_probs[c], params, retain_graph=c < classes - 1,
                                                allow_unused=True)
                    for s, g in zip(sums, grads, strict=True):
                        if g is not None:
                            s.add_(g.float().square(), alpha=float(probs[c]))
                count += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if count:
        for s in sums:
            s.div_(count)
    return {n: s for s, p in zip(sums, params, strict=True) for n in groups[p]}, count


# --------------------------------------------------------------------------------------------------- merging
def fisher_norm(fisher: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    """``‖F‖₂`` over the tensors ``names`` (fusion-bench ``get_models_fisher_norm``: the L2 norm of the per-tensor
    L2 norms), float64."""
    total = sum(float(torch.linalg.vector_norm(fisher[n].double())) ** 2 for n in names if n in fisher)
    return float(total) ** 0.5


class FisherAccumulator:
    """Streamed ``Σ_t c_t F̂_t θ_t`` and ``Σ_t c_t F̂_t`` (module docstring); tensors without a Fisher are averaged."""

    def __init__(self, names: Sequence[str], *, normalize: bool = True, min_weight: float = 1e-6) -> None:
        self.names, self.normalize, self.min_weight = list(names), normalize, min_weight
        self.num: StateDict = {}
        self.den: StateDict = {}
        self.plain: StateDict = {}
        self.models = 0
        self.coefficients: list[float] = []

    def add(self, state: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor],
            coefficient: float = 1.0) -> None:
        """Fold model ``state`` with its Fisher in (``coefficient``: fusion-bench's fisher_scaling_coefficient)."""
        c = coefficient
        if self.normalize:
            c = c / (fisher_norm(fisher, self.names) + self.min_weight)
        self.coefficients.append(c)
        for n in self.names:
            theta = state[n].float()
            if n in fisher:
                w = (fisher[n].float() + self.min_weight) * c
                _accumulate(self.num, n, w * theta)
                _accumulate(self.den, n, w)
            else:
                _accumulate(self.plain, n, theta)
        self.models += 1

    def result(self) -> StateDict:
        """The merged tensors (fp32) of every name."""
        out = {n: self.num[n] / self.den[n] for n in self.num}
        out.update({n: v / self.models for n, v in self.plain.items()})
        return out


def _accumulate(acc: StateDict, name: str, value: torch.Tensor) -> None:
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value.clone()


def fisher_merge(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]], *,
                 normalize: bool = True, min_weight: float = 1e-6, coefficients: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> StateDict:
    """Pure Fisher merge of ``states`` (``names``: the merged tensors, default every floating tensor of the first
    state); fp32 results. Tensors missing from a Fisher dict are averaged."""
    names = list(names) if names is not None else mergeable_names(states[0])
    acc = FisherAccumulator(names, normalize=normalize, min_weight=min_weight)
    for i, (s, f) in enumerate(zip(states, fishers, strict=True)):
        acc.add(s, f, 1.0 if coefficients is None else coefficients[i])
    return acc.result()


# --------------------------------------------------------------------------------------------------- driver
def fisher_merge_models(access: ModelAccess, base_state: StateDict, expert_states: Sequence[StateDict],
                        heads: Sequence[StateDict | None], tasks: Sequence[Any], budget: Any,
                        params: FisherParams | None = None, *, exclude: Sequence[str] = (),
                        info: dict[str, Any] | None = None, split: str = "train") -> StateDict:
    """Fisher-merge the experts: each expert's Fisher on ``params.examples`` inputs of its own task's ``split``
    (default *train*; through its own head), streamed into the merge (``expert_states`` and ``heads`` are indexed
    once per expert, in order: a lazy sequence holds one expert at a time). Tensors matching ``exclude`` and
    non-floating ones are the base's. ``info`` (when given) receives the examples read per task and the
    normalization coefficients."""
    params = params or FisherParams()
    names = mergeable_names(base_state, exclude)
    acc = FisherAccumulator(names, normalize=params.normalize, min_weight=params.min_weight)
    examples: dict[str, int] = {}
    for state, head, task in zip(expert_states, heads, tasks, strict=True):
        module = access.module(state)
        batches, _ = example_batches(access.batches(task, split, budget, limit=params.examples,
                                                    batch_size=params.batch_size), params.examples)
        fisher, n = diagonal_fisher(module, lambda b, m=module, h=head, t=task: access.logits(m, h, t, b),
                                    batches, names)
        examples[task_name(task)] = n
        acc.add(state, fisher)
        del fisher, module
    merged = dict(base_state)
    merged.update({n: v.to(base_state[n].dtype) for n, v in acc.result().items()})
    if info is not None:
        info.update({"split": split, "examples": examples, "coefficients": acc.coefficients})
    return merged
