"""EMR-Merging: one unified task vector, per-task binary masks and per-task rescalers (Huang et al., NeurIPS 2024,
arXiv 2405.17461; official code ``harveyhuang18/EMR_Merging``, ``merge_utils.emr_merge``; docs/methods/spec.md §4).

For task vectors ``τ_t = θ_t − θ0`` (t = 1..T), per tensor ``n``:

    ε      = sign(Σ_t τ_t)                         (the official code: ``(Σ_t τ_t > 0)·2 − 1``, so 0 → −1)
    τ_uni  = ε ⊙ max_t(|τ_t| · [τ_t ε > 0])        (largest magnitude among the tasks that agree with ε)
    M_t    = [τ_t ε > 0]                            (task t's mask: where its update agrees with ε)
    λ_t    = Σ_n R(|τ_t^n|) / Σ_n R(|M_t^n ⊙ τ_uni^n|)  (one rescaler per task, over all tensors)
    θ_t   ≈ θ0 + λ_t M_t ⊙ τ_uni

``R`` is the reduction of a tensor: ``"mean"`` per tensor (the official code: ``scales[m] +=
torch.mean(torch.abs(param))``) or ``"sum"`` (docs/methods/spec.md §4's ``Σ|τ_t| / Σ|M_t ⊙ τ_uni|``); both agree for
a single tensor. A task whose masked unified vector is all zero (every entry disagrees with ε) gets ``λ_t = 0``.

Routed form (:func:`emr_experts`): the base keeps ``θ0``; expert ``t`` is a dense ``ΔW_t = λ_t M_t ⊙ τ_uni`` per
routed module, selected by a one-hot gate (the oracle task id, or the router's prediction). Its compact storage
(:func:`emr_storage_bytes`) is ``τ_uni`` + ``T`` one-bit masks + ``T`` scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from neuromerge.errors import ConfigError
from neuromerge.routing.cli import register_builder
from neuromerge.routing.experts import DenseExpert

Reduction = Literal["mean", "sum"]
TensorDict = dict[str, torch.Tensor]


def _reduce(x: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    return x.double().mean() if reduction == "mean" else x.double().sum()


def emr_unify(deltas: Sequence[Mapping[str, torch.Tensor]], *, reduction: Reduction = "mean"
              ) -> tuple[TensorDict, list[TensorDict], torch.Tensor]:
    """``(τ_uni, masks, rescalers)`` of the task vectors ``deltas[t] = {name: τ_t}`` (see the module docstring).

    ``τ_uni[name]`` has the tensors' dtype; ``masks[t][name]`` is boolean; ``rescalers`` is a float64 ``(T,)``.
    Every task must give the same names and shapes.
    """
    if not deltas:
        raise ConfigError("EMR needs at least one task vector")
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"EMR rescaler reduction must be 'mean' or 'sum', got {reduction!r}")
    names = list(deltas[0])
    for t, d in enumerate(deltas):
        if list(d) != names:
            raise ConfigError(f"EMR: task vector {t} has different tensors than task vector 0")
    n_tasks = len(deltas)
    tau_uni: TensorDict = {}
    masks: list[TensorDict] = [{} for _ in range(n_tasks)]
    scales = torch.zeros(n_tasks, dtype=torch.float64)
    kept = torch.zeros(n_tasks, dtype=torch.float64)
    for n in names:
        stack = torch.stack([d[n] for d in deltas])
        flag = torch.where(stack.sum(dim=0) > 0, 1.0, -1.0).to(stack.dtype)
        agree = stack * flag > 0
        magnitude = torch.where(agree, stack.abs(), torch.zeros_like(stack)).amax(dim=0)
        tau_uni[n] = magnitude * flag
        for t in range(n_tasks):
            masks[t][n] = agree[t]
            scales[t] += _reduce(stack[t].abs(), reduction)
            kept[t] += _reduce((agree[t] * tau_uni[n]).abs(), reduction)
    rescalers = torch.where(kept > 0, scales / torch.where(kept > 0, kept, torch.ones_like(kept)),
                            torch.zeros_like(kept))
    return tau_uni, masks, rescalers


def emr_reconstruct(tau_uni: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], rescaler: float
                    ) -> TensorDict:
    """Task ``t``'s approximate task vector ``λ_t M_t ⊙ τ_uni``."""
    return {n: rescaler * (mask[n].to(u.dtype) * u) for n, u in tau_uni.items()}


def emr_experts(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], *,
                reduction: Reduction = "mean") -> tuple[list[DenseExpert], dict[str, object]]:
    """One :class:`DenseExpert` per task with ``ΔW_t[m] = λ_t M_t[m] ⊙ τ_uni[m]`` for every module of
    ``deltas[t]`` (keys are module names, values 2-D ``(out, in)``), and ``{"rescalers": [...],
    "compact_bytes": int}``."""
    if len(names) != len(deltas):
        raise ConfigError(f"EMR: {len(deltas)} task vectors but {len(names)} names")
    tau_uni, masks, rescalers = emr_unify(deltas, reduction=reduction)
    experts = [DenseExpert(str(name), emr_reconstruct(tau_uni, masks[t], float(rescalers[t])))
               for t, name in enumerate(names)]
    return experts, {"rescalers": [float(r) for r in rescalers],
                     "compact_bytes": emr_storage_bytes(tau_uni, len(deltas))}


def emr_storage_bytes(tau_uni: Mapping[str, torch.Tensor], n_tasks: int) -> int:
    """Bytes EMR needs beyond ``θ0``: ``τ_uni`` in its dtype, ``T`` masks at one bit per entry (rounded up to whole
    bytes per tensor) and ``T`` float32 rescalers."""
    uni = sum(u.numel() * u.element_size() for u in tau_uni.values())
    bits = sum((u.numel() + 7) // 8 for u in tau_uni.values())
    return int(uni + n_tasks * bits + 4 * n_tasks)


def cli_build(params: dict[str, Any], out: Path, *, force: bool = False, source: Path | None = None,
              allow_download: bool = False) -> Path:
    """``neuromerge route build emr -o OUT --config CONFIG``: a Hugging Face base + PEFT LoRA adapters + task
    data (:class:`neuromerge.routing.build_config.RouteBuildConfig`)."""
    from neuromerge.routing.build_config import build_from_config

    return build_from_config("emr", params, Path(out), force=force, source=source, allow_download=allow_download)


register_builder("emr", cli_build)

__all__ = ["cli_build", "emr_experts", "emr_reconstruct", "emr_storage_bytes", "emr_unify"]
