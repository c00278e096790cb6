"""How data-aware merges reach a model and its data: the forward hooks of the tasks contract.

Fisher, RegMean, AdaMerging and WEMoE need three things besides the weights: a *module* built from a state dict,
*batches* of a task's examples, and the *logits* of a task's head over a module's output. These are the forward
hooks of the one "models + task data" contract, :class:`neuromerge.tasks.Suite` (``module`` / ``batches`` /
``logits``); :class:`ModelAccess` is their structural type, defined in :mod:`neuromerge.tasks.contract` and
re-exported here, so every suite — built-in or a user's model folder (:class:`neuromerge.tasks.hf.HFSuite`) — is a
:class:`ModelAccess`; :class:`TensorAccess` is a tiny in-memory one for tests and small experiments.

Shared helpers: :func:`mergeable_names` (which tensors a data-aware method merges: floating tensors not matching
an ``exclude`` regex, the others kept from the base, as :func:`neuromerge.functional.merge_state_dicts` does),
:func:`example_batches` (a task's batches truncated to ``limit`` examples), :func:`split_batch` (one example at a
time), :class:`LogitsCall` (a module wrapper so :func:`torch.func.functional_call` can run ``access.logits``
with substituted parameters) and :func:`entropy` (the test-time objective of AdaMerging and WEMoE).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..tasks.contract import BatchLike, ModelAccess, StateDict  # the contract's (one definition), re-exported


# --------------------------------------------------------------------------------------------------- helpers
def mergeable_names(state: Mapping[str, torch.Tensor], exclude: Sequence[str] = ()) -> list[str]:
    """Floating tensors not matching any ``exclude`` regex (``re.search``), in state order. The others are kept
    from the base, as in :func:`neuromerge.functional.merge_state_dicts`."""
    patterns = [re.compile(p) for p in exclude]
    return [n for n, t in state.items() if t.is_floating_point() and not any(p.search(n) for p in patterns)]


def batch_size_of(batch: BatchLike) -> int:
    """Number of examples in ``batch`` (its labels, else the leading size of its first input)."""
    if batch.labels is not None and batch.labels.dim() > 0:
        return int(batch.labels.shape[0])
    return int(next(iter(batch.inputs.values())).shape[0])


def example_batches(batches: Sequence[BatchLike], limit: int | None) -> tuple[list[BatchLike], int]:
    """The batches truncated to ``limit`` examples in total (the last one sliced) and the example count."""
    out: list[BatchLike] = []
    seen = 0
    for b in batches:
        n = batch_size_of(b)
        if limit is not None and seen + n > limit:
            n = limit - seen
            if n <= 0:
                break
            b = slice_batch(b, 0, n)
        out.append(b)
        seen += n
        if limit is not None and seen >= limit:
            break
    return out, seen


@dataclass
class SimpleBatch:
    """A minimal :class:`BatchLike` (tests, adapters, sliced batches)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor | None = None


def slice_batch(batch: BatchLike, start: int, stop: int) -> SimpleBatch:
    """Examples ``start:stop`` of ``batch`` (every input sliced on its leading dimension)."""
    return SimpleBatch(inputs={k: v[start:stop] for k, v in batch.inputs.items()}, labels=batch.labels[start:stop],
                       mask=None if batch.mask is None else batch.mask[start:stop])


def split_batch(batch: BatchLike) -> Iterator[SimpleBatch]:
    """The examples of ``batch`` one at a time (batches of size 1)."""
    for i in range(batch_size_of(batch)):
        yield slice_batch(batch, i, i + 1)


def entropy(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean prediction entropy ``−(1/B) Σ_b Σ_c p_bc log(p_bc + ε)``, ``p = softmax(logits)`` (AdaMerging official
    code ``softmax_entropy`` and fusion-bench ``entropy_loss``, ε = 1e-8)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return -(probs * torch.log(probs + eps)).sum(dim=-1).mean()


class LogitsCall(nn.Module):
    """``forward(batch) = access.logits(self.backbone, head, task, batch)``: lets
    :func:`torch.func.functional_call` substitute the backbone's tensors (keys ``"backbone." + name``)."""

    def __init__(self, access: ModelAccess, backbone: nn.Module, head: StateDict | None, task: Any) -> None:
        super().__init__()
        self.access, self.backbone, self.head, self.task = access, backbone, head, task

    def forward(self, batch: BatchLike) -> torch.Tensor:
        return self.access.logits(self.backbone, self.head, self.task, batch)


def functional_logits(call: LogitsCall, tensors: Mapping[str, torch.Tensor], batch: BatchLike) -> torch.Tensor:
    """``call(batch)`` with the backbone's tensors replaced by ``tensors`` (names as in the backbone's state)."""
    from torch.func import functional_call

    return functional_call(call, {f"backbone.{k}": v for k, v in tensors.items()}, (batch,), strict=False,
                           tie_weights=True)


# --------------------------------------------------------------------------------------------------- test adapter
@dataclass
class SimpleTask:
    """A task for :class:`TensorAccess`: per split, a dict of inputs (leading dim = examples), labels and an
    optional ``(N, T)`` mask."""

    name: str
    splits: dict[str, SimpleBatch] = field(default_factory=dict)


class TensorAccess:
    """A :class:`ModelAccess` over in-memory tensors.

    ``factory()`` builds a fresh backbone (its state dict keys are the backbone's); ``features(output, batch)``
    maps the backbone's output to ``(B, d)`` features (default: the output itself, or the masked mean of
    ``last_hidden_state`` for transformer outputs); a head is ``{"weight": (C, d), "bias": (C,)}``.
    """

    def __init__(self, factory: Callable[[], nn.Module],
                 features: Callable[[Any, BatchLike], torch.Tensor] | None = None) -> None:
        self.factory = factory
        self.features = features or default_features

    def module(self, backbone: StateDict) -> nn.Module:
        m = self.factory()
        m.load_state_dict(backbone)
        return m.float().eval()

    def batches(self, task: SimpleTask, split: str, budget: Any = None, *, limit: int | None = None,
                batch_size: int | None = None) -> list[SimpleBatch]:
        data = task.splits[split]
        n = batch_size_of(data) if limit is None else min(limit, batch_size_of(data))
        size = batch_size or 8
        return [slice_batch(data, i, min(i + size, n)) for i in range(0, n, size)]

    def logits(self, module: nn.Module, head: StateDict | None, task: SimpleTask, batch: BatchLike) -> torch.Tensor:
        feats = self.features(module(**batch.inputs), batch)
        if head is None:
            return feats
        return feats @ head["weight"].T + head["bias"]


def default_features(output: Any, batch: BatchLike) -> torch.Tensor:
    """``output`` when it is a tensor; else the mean of ``output.last_hidden_state`` over real tokens."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = output.last_hidden_state
    if batch.mask is None:
        return hidden.mean(dim=1)
    m = batch.mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# --------------------------------------------------------------------------------------------------- params
class DataParams(BaseModel):
    """Base of the data-aware methods' parameter models (unknown keys are errors, as for static methods)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def cycle(batches: Sequence[BatchLike], step: int) -> BatchLike:
    """The batch used at optimisation ``step`` (deterministic round robin over ``batches``)."""
    return batches[step % len(batches)]


def task_name(task: Any) -> str:
    """A task's ``name`` attribute (or its string form)."""
    return str(getattr(task, "name", task))


def tied_aliases(module: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """``alias → first name`` for the entries of ``names`` that share a parameter with an earlier name (tied
    embeddings): :func:`torch.func.functional_call` must receive each tied tensor once."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    wanted = set(names)
    for n, p in module.named_parameters(remove_duplicate=False):
        if n not in wanted:
            continue
        if id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    return aliases


def entropy_descent(optimizer: torch.optim.Optimizer, prepare: Callable[[int], Any],
                    task_loss: Callable[[Any, int, int], torch.Tensor], tasks: int, steps: int) -> list[float]:
    """Test-time adaptation loop of AdaMerging / WEMoE: at each step, ``ctx = prepare(step)``, then for each task
    ``t`` the loss ``task_loss(ctx, t, step)`` (a mean prediction entropy) is back-propagated (gradients
    accumulated over tasks, fusion-bench's ``use_grad_accumulate``; the same gradient as the official sum of task
    losses) and one optimizer step is taken. Returns the summed loss of every step."""
    history: list[float] = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ctx = prepare(step)
        total = 0.0
        for t in range(tasks):
            loss = task_loss(ctx, t, step)
            loss.backward(retain_graph=t < tasks - 1)
            total += float(loss.detach())
        optimizer.step()
        history.append(total)
    return history
