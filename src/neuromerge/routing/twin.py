"""Twin-Merging: a shared expert plus SVD-compressed exclusive knowledge, mixed per input by a router (Lu et al.,
NeurIPS 2024, arXiv 2406.15479; official code ``LZY-the-boys/Twin-Merging``; docs/methods/spec.md §4).

    θ*        = θ0 + λ Σ_t τ_t                      (shared expert: Task Arithmetic, λ = 0.3)
    v_t       = θ_t − θ*                            (exclusive knowledge of task t)
    v_t       ≈ B_t A_t = SVD_r(v_t),  r = ⌈ρ · min(out, in)⌉   (ρ = 0.1: "keep 10 % of the rank")
    θ(x)      = θ* + Σ_t softmax(router(x))_t · B_t A_t

Here the exclusive vectors are taken for the 2-D weights of the routed modules (``nn.Linear`` / conv kernels seen
as ``(out, in·kh·kw)``) and become :class:`~neuromerge.routing.experts.LowRankExpert` branches gated by
:class:`~neuromerge.routing.policy.SoftGates`. Every other tensor (biases, norms, embeddings) stays at its shared
value ``θ*`` (the official code also compresses only matrices; vectors are kept from the shared model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import ConfigError
from neuromerge.routing.cli import register_builder
from neuromerge.routing.experts import LowRankExpert
from neuromerge.tensors.lowrank import truncated_svd_factors

TensorDict = dict[str, torch.Tensor]


def task_arithmetic_state(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                          lam: float, *, exclude: Iterable[str] = ()) -> TensorDict:
    """``θ* = θ0 + λ Σ_t (θ_t − θ0)`` on floating tensors; tensors matching an ``exclude`` regex (``re.search``)
    and non-floating tensors are the base's. Accumulates in float32, returns the base's dtypes."""
    pats = [re.compile(p) for p in exclude]
    out: TensorDict = {}
    for k, w0 in base.items():
        if not w0.is_floating_point() or any(p.search(k) for p in pats):
            out[k] = w0
            continue
        acc = torch.zeros_like(w0, dtype=torch.float32)
        for e in experts:
            acc += e[k].float() - w0.float()
        out[k] = (w0.float() + lam * acc).to(w0.dtype)
    return out


def exclusive_rank(shape: Sequence[int], fraction: float) -> int:
    """``r = ⌈fraction · min(out, in)⌉`` (at least 1) for a matrix of ``shape`` (a kernel: ``in = in·kh·kw``)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"Twin-Merging rank fraction must lie in (0, 1], got {fraction}")
    out_f = int(shape[0])
    in_f = math.prod(int(s) for s in shape[1:])
    return max(1, math.ceil(fraction * min(out_f, in_f)))


def twin_experts(shared: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str], modules: Iterable[str], *, rank_fraction: float = 0.1
                 ) -> tuple[list[LowRankExpert], dict[str, float]]:
    """Exclusive low-rank experts ``SVD_r(θ_t − θ*)`` of each ``modules`` entry (weight ``f"{m}.weight"``).

    Returns the experts (named by ``names``) and, per task, the mean discarded relative energy
    ``Σ_{i>r} σ_i² / Σ σ_i²`` over its modules. A module whose exclusive vector is exactly zero is left out of that
    expert."""
    if len(names) != len(experts):
        raise ConfigError(f"Twin-Merging: {len(experts)} experts but {len(names)} names")
    mods = list(modules)
    out: list[LowRankExpert] = []
    discarded: dict[str, float] = {}
    for name, theta in zip(names, experts, strict=True):
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        lost: list[float] = []
        for m in mods:
            key = f"{m}.weight"
            w_star = shared[key]
            v = (theta[key].double() - w_star.double()).reshape(w_star.shape[0], -1)
            if not bool(v.ne(0).any()):
                continue
            a, b, d = truncated_svd_factors(v, exclusive_rank(tuple(w_star.shape), rank_fraction))
            factors[m] = (a.to(w_star.dtype).contiguous(), b.to(w_star.dtype).contiguous())
            lost.append(d)
        out.append(LowRankExpert(str(name), factors))
        discarded[str(name)] = sum(lost) / len(lost) if lost else 0.0
    return out, discarded


def cli_build(params: dict[str, Any], out: Path, *, force: bool = False, source: Path | None = None,
              allow_download: bool = False) -> Path:
    """``neuromerge route build twin -o OUT --config CONFIG``: a Hugging Face base + PEFT LoRA adapters + task
    data (:class:`neuromerge.routing.build_config.RouteBuildConfig`)."""
    from neuromerge.routing.build_config import build_from_config

    return build_from_config("twin", params, Path(out), force=force, source=source, allow_download=allow_download)


register_builder("twin", cli_build)

__all__ = ["cli_build", "exclusive_rank", "task_arithmetic_state", "twin_experts"]
