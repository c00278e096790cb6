"""Exact low-rank factors of LoRA-mode experts whose adapters were merged into the weights.

The bench's suites and a user's model with PEFT adapters (:meth:`neuromerge.tasks.hf.HFSuite.expert_state`) give
a LoRA expert as the base with ``ΔW = (α/r)·B·A`` merged in (PEFT ``merge_and_unload``), so ``rank ΔW ≤ r``.
A routed model (:class:`~neuromerge.routing.experts.LowRankExpert`) wants the factors back: for each changed matrix, the
truncated SVD ``ΔW = U S Vᵀ`` (Eckart–Young: the best rank-``r`` approximation) gives

    B = U_r diag(S_r)   (out, r),      A = V_rᵀ   (r, in),      B A = ΔW   when rank ΔW ≤ r

(PEFT's own factors are not unique: ``B A = (B M)(M⁻¹ A)`` for any invertible ``M``; these are the canonical
ones, with the scaling ``α / r`` folded into ``B`` as :class:`~neuromerge.routing.experts.LowRankExpert` asks:
``ΔW = B A``, no separate scaling). A convolution kernel ``(out, in, kh, kw)`` is factored as its ``(out, in·kh·kw)``
matrix (routing's convention). The SVD runs in float64; the factors are returned in the base tensor's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import TaskError
from ..tasks.contract import Expert, StateDict
from .experts import LowRankExpert

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _low_rank(name: str, delta: torch.Tensor, rank: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the rank-``rank`` truncated SVD of ``delta`` (2-D), or a TaskError when the discarded energy
    ``Σ_{i>r} σ_i²`` exceeds ``tol · ‖ΔW‖_F²``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = float((s * s).sum())
    discarded = float((s[rank:] * s[rank:]).sum())
    if discarded > tol * energy:
        raise TaskError(f"{name}: ΔW is not of rank ≤ {rank} (the discarded singular values hold "
                         f"{discarded / energy:.3g} of ‖ΔW‖², tolerance {tol:g}); not a rank-{rank} LoRA expert")
    k = min(rank, s.shape[0])
    return vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous()


def lora_factors(base: StateDict, expert: StateDict, rank: int, *, tol: float = 1e-6,
                 exclude: Sequence[str] = ()) -> Factors:
    """``{module: (A (r, in), B (out, r))}`` with ``B A = expert[k] - base[k]`` for every weight ``k`` whose delta
    is non-zero (module = ``k`` without ``.weight``; a conv kernel as its ``(out, in·kh·kw)`` matrix).

    Raises :class:`TaskError` when the two state dicts differ in keys or shapes, a changed matrix has rank
    ``> rank`` (discarded relative energy ``> tol``), or a tensor that cannot be factored (1-D, or not named
    ``*.weight``) changed — unless it matches one of the ``exclude`` regexes (``re.search``; e.g. the vision
    suite's ``merge_exclude()``: BN statistics), which are ignored."""
    if rank < 1:
        raise TaskError(f"LoRA rank must be ≥ 1, got {rank}")
    if set(base) != set(expert):
        diff = sorted(set(base) ^ set(expert))
        raise TaskError(f"base and expert have different tensors ({len(diff)}, e.g. {diff[:3]})")
    out: Factors = {}
    for key, w0 in base.items():
        w1 = expert[key]
        if w1.shape != w0.shape:
            raise TaskError(f"{key}: expert shape {tuple(w1.shape)} ≠ base shape {tuple(w0.shape)}")
        if any(re.search(p, key) for p in exclude) or torch.equal(w1, w0):
            continue
        module = key.removesuffix(".weight")
        if w0.dim() < 2 or module == key:
            raise TaskError(f"{key} changed but is not a weight matrix or kernel: it cannot be a LoRA factor "
                             "(exclude it if it should be ignored)")
        delta = (w1.double() - w0.double()).reshape(w0.shape[0], -1)
        a, b = _low_rank(key, delta, rank, tol)
        out[module] = (a.to(w0.dtype), b.to(w0.dtype))
    return out


def lora_experts(base: StateDict, experts: Sequence[Expert], rank: int, *, tol: float = 1e-6,
                 exclude: Sequence[str] = ()) -> list[LowRankExpert]:
    """One :class:`LowRankExpert` per bench expert (named by its task): :func:`lora_factors` of its backbone."""
    return [LowRankExpert(e.task, lora_factors(base, e.backbone, rank, tol=tol, exclude=exclude)) for e in experts]
