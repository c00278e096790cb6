"""Per-neuron operations of NeuroMerging (Fang et al., arXiv 2503.05320; official code
``ZzzitaoFang/NeuroMerging``, ``neuro_kernel`` / ``ours_kernel``).

A neuronal weight ``W ∈ R^{rows×in}`` holds one output neuron per row. For the pre-trained row ``w0^k`` and the
trimmed task vectors ``τ_t^k`` of that row:

* parallel / orthogonal split: ``c_t^k = ⟨τ_t^k, w0^k⟩ / ‖w0^k‖²``, ``τ∥ = c_t^k w0^k``, ``τ⊥ = τ_t^k − τ∥``
  (rows with ``w0^k = 0``: ``c = 0``, all of ``τ`` is orthogonal);
* ``ψ∥``: TIES (elect + disjoint mean) on the scalars ``c_t^k``, reconstructed as ``c̄^k w0^k`` (paper) or
  ``c̄^k w0^k / ‖w0^k‖`` (official code);
* ``ψ⊥``: per row the stack ``O^k = [τ⊥,1^k; …; τ⊥,T^k] ∈ R^{T×in}`` is decomposed ``O = U S Vᵀ`` (thin), the
  coordinates ``Z = O V = U S`` are TIES-merged per coordinate ``j`` (elected sign ``sign(Σ_t Z_tj)``, zero → the
  majority sign over the row's coordinates; disjoint mean ``z̄_j``), coordinates are kept up to the cumulative
  variance ``η`` of ``S²`` and ``ψ⊥^k = Σ_j z̄_j v_j``.

Everything is batched over rows; there is no Python loop over rows or coordinates (only the float64 Gram
matrices are built a block of rows at a time, see :func:`gram64`).

**Gram route for the per-row SVD.** ``T`` is small (2–8) and ``in`` large (up to 10⁴), so instead of a thin SVD of
every ``T × in`` matrix we eigen-decompose the ``T × T`` Gram matrix ``G = O Oᵀ = U S² Uᵀ`` (float64, so that the
squared condition number costs no accuracy at fp32 inputs). With ``v_j = Oᵀ u_j / s_j`` and ``z_j = s_j u_j``,
the merged coordinate is ``z̄_j = s_j w_j`` where ``w_j`` is the disjoint mean of the agreeing ``U_tj`` (``s_j > 0``
does not change signs), hence ``ψ⊥ = Σ_j w_j Oᵀ u_j = Oᵀ (U w)``: no division by ``s_j`` and no ``in``-sized
singular vector is ever formed. Components with ``s_j² <= 1e-12 · s_1²`` count as zero (their coordinates are 0,
exactly what an exact SVD gives), and so do the coordinates of a task whose ``τ⊥^k`` is 0. Each singular vector's
sign is fixed so that its largest-magnitude entry of ``u_j`` is positive. ``z̄_j v_j`` does not depend on that sign
except for a coordinate whose elected sign is a tie (then the row majority decides): measure-zero with
``sign_method="sum"``, but common with ``"count"`` when an even number of tasks disagree. The convention makes
those cases deterministic; any SVD-based implementation (the official one included) is sign-dependent there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .consensus import SignMethod, disjoint_merge, elect_sign

Reconstruction = Literal["paper", "official"]

#: eigenvalues of the Gram matrix at or below this fraction of the largest are treated as exact zeros
GRAM_RTOL = 1e-12


@dataclass(frozen=True)
class NeuronMerge:
    """Result of :func:`neuron_merge`: ``parallel`` = ``ψ∥``, ``orthogonal`` = ``ψ⊥`` (both ``rows × in``) and
    ``parallel_energy`` = ``Σ_{t,k} ‖τ∥,t^k‖² / Σ_{t,k} ‖τ_t^k‖²`` (0 when every ``τ`` is 0)."""

    parallel: torch.Tensor
    orthogonal: torch.Tensor
    parallel_energy: float


def split_parallel(deltas: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row projection of the task vectors on the pre-trained neuron.

    ``deltas``: ``(T, rows, in)``; ``base``: ``(rows, in)``. Returns ``(c, τ⊥)`` with
    ``c_t^k = ⟨τ_t^k, w0^k⟩ / ‖w0^k‖²`` of shape ``(T, rows)`` (0 where ``‖w0^k‖ = 0``) and
    ``τ⊥ = τ − c · w0`` of shape ``(T, rows, in)``.
    """
    sq_norm = torch.einsum("ki,ki->k", base, base)
    dots = torch.einsum("tki,ki->tk", deltas, base)
    nonzero = sq_norm > 0
    coef = torch.where(nonzero, dots / torch.where(nonzero, sq_norm, 1.0), torch.zeros((), dtype=deltas.dtype))
    return coef, torch.addcmul(deltas, coef.unsqueeze(-1), base, value=-1.0)


def merge_coefficients(coef: torch.Tensor, sign_method: SignMethod = "sum") -> torch.Tensor:
    """TIES on the scalars ``c`` (``(T, rows)``): elected sign per row ``sign(Σ_t c_t^k)``, zero → the majority
    sign over the rows given; disjoint mean of the agreeing ``c_t^k``. Returns ``c̄`` of shape ``(rows,)``."""
    return disjoint_merge(coef, elect_sign(coef, sign_method), "mean")


def reconstruct_parallel(
    coef: torch.Tensor, base: torch.Tensor, mode: Reconstruction = "paper"
) -> torch.Tensor:
    """``ψ∥^k = c̄^k w0^k`` (``mode="paper"``) or ``c̄^k w0^k / ‖w0^k‖`` (``mode="official"``, what the official
    code does with the same ``c = ⟨τ, w0⟩/‖w0‖²``; rows with ``w0^k = 0`` give 0)."""
    if mode == "paper":
        return coef.unsqueeze(-1) * base
    norm = torch.linalg.vector_norm(base, dim=-1)
    scale = torch.where(norm > 0, coef / torch.where(norm > 0, norm, 1.0), torch.zeros((), dtype=coef.dtype))
    return scale.unsqueeze(-1) * base


def elect_sign_rowwise(x: torch.Tensor, method: SignMethod = "sum") -> torch.Tensor:
    """Elected sign of ``x`` (``(T, rows, r)``) per ``(row, coordinate)``: ``sign(Σ_t x_t)`` (``"sum"``) or the
    sign held by most tasks (``"count"``); zeros take the majority sign over *that row's* coordinates
    (``+1`` if that is 0 too). Returns ``±1`` of shape ``(rows, r)``."""
    summed = x.sum(dim=0) if method == "sum" else torch.sign(x).sum(dim=0)
    gamma = torch.sign(summed)
    majority = torch.where(gamma.sum(dim=-1, keepdim=True) >= 0, 1.0, -1.0).to(gamma.dtype)
    return torch.where(gamma == 0, majority, gamma)


def cumulative_variance_keep(eigvals: torch.Tensor, cum_threshold: float) -> torch.Tensor:
    """Boolean ``(rows, r)`` mask of the coordinates kept by the cumulative-variance rule of the official code:
    with ``cv_j = Σ_{i<=j} s_i² / Σ_i s_i²`` (descending ``s``), keep the first ``min(#{j: cv_j < η} + 1, r)``
    coordinates. ``η >= 1`` keeps all. ``eigvals`` are ``s²`` in descending order."""
    rows, r = eigvals.shape
    if cum_threshold >= 1.0:
        return torch.ones(rows, r, dtype=torch.bool, device=eigvals.device)
    total = eigvals.sum(dim=-1, keepdim=True)
    cum = torch.cumsum(eigvals, dim=-1) / torch.where(total > 0, total, 1.0)
    rank = ((cum < cum_threshold) & (total > 0)).sum(dim=-1, keepdim=True) + 1
    return torch.arange(r, device=eigvals.device).unsqueeze(0) < rank.clamp(max=r)


def gram64(orth: torch.Tensor, block_elements: int = 1 << 18) -> torch.Tensor:
    """Per-row Gram matrices ``G^k = O^k O^kᵀ`` (``(rows, T, T)``, float64) of ``orth`` (``(T, rows, in)``).

    On CPU the float64 copy is made one block of rows at a time (about ``block_elements`` entries), which keeps
    it in cache (measured ~6x faster than converting the whole chunk at once); other devices take one block."""
    t, rows, width = orth.shape
    gram = torch.empty(rows, t, t, dtype=torch.float64, device=orth.device)
    if orth.device.type != "cpu":
        block_elements = max(1, orth.numel())
    step = max(1, block_elements // max(1, t * width))
    for start in range(0, rows, step):
        block = orth[:, start : start + step].to(torch.float64)
        gram[start : start + step] = torch.einsum("ski,tki->kst", block, block)
    return gram


def gram_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending eigenpairs of the per-row Gram matrices ``G^k = O^k O^kᵀ`` (``(rows, T, T)``, float64, e.g. from
    :func:`gram64`): ``s²`` as ``(rows, T)`` (those at or below ``GRAM_RTOL · s_1²`` set to exactly 0) and ``U`` as
    ``(rows, T, T)`` with column ``j`` the ``j``-th left singular vector of ``O^k``, its largest-magnitude entry made
    positive. Rows ``t`` of ``U`` whose task has ``τ⊥,t^k = 0`` (``G_tt = 0``) are set to exactly 0 (their
    coordinates are 0 in exact arithmetic; round-off must not give them a vote in the ``"count"`` sign election)."""
    present = torch.diagonal(gram, dim1=-2, dim2=-1) > 0
    eigvals, eigvecs = torch.linalg.eigh(gram)
    eigvals = eigvals.flip(-1).clamp(min=0.0)
    eigvecs = eigvecs.flip(-1) * present.unsqueeze(-1).to(eigvecs.dtype)
    eigvals = torch.where(eigvals > GRAM_RTOL * eigvals[:, :1], eigvals, torch.zeros((), dtype=eigvals.dtype))
    pivot = torch.gather(eigvecs, 1, eigvecs.abs().argmax(dim=1, keepdim=True))
    return eigvals, eigvecs * torch.where(pivot < 0, -1.0, 1.0).to(eigvecs.dtype)


def orthogonal_merge(
    orth: torch.Tensor, cum_threshold: float = 1.0, sign_method: SignMethod = "sum"
) -> torch.Tensor:
    """``ψ⊥`` of every row from the orthogonal parts ``τ⊥`` (``(T, rows, in)``): per-row SVD ``O = U S Vᵀ``,
    coordinates ``Z = O V``, per-coordinate TIES (row-wise majority for zero signs) and disjoint mean ``z̄_j``,
    cumulative-variance truncation ``η = cum_threshold``, ``ψ⊥ = Σ_j z̄_j v_j`` (computed as ``Oᵀ U w``, see
    the module docstring). Returns ``(rows, in)`` in the dtype of ``orth``."""
    mix = orthogonal_mix(gram64(orth), cum_threshold, sign_method).to(orth.dtype)
    return torch.einsum("tk,tki->ki", mix, orth)


def orthogonal_mix(gram: torch.Tensor, cum_threshold: float = 1.0, sign_method: SignMethod = "sum") -> torch.Tensor:
    """The weights ``a_t^k = Σ_j U_tj w_j`` (``(T, rows)``, float64) with ``ψ⊥^k = Σ_t a_t^k τ⊥,t^k``, from the
    per-row Gram matrices of the orthogonal parts (``(rows, T, T)``, float64): eigenpairs, per-coordinate TIES with
    the row-wise majority, cumulative-variance truncation (see :func:`orthogonal_merge`)."""
    eigvals, u = gram_eigh(gram)
    alive = eigvals > 0
    coords = (u * alive.unsqueeze(1).to(u.dtype)).permute(1, 0, 2)  # (T, rows, r): U_tj for live j
    w = disjoint_merge(coords, elect_sign_rowwise(coords, sign_method), "mean")  # z̄_j / s_j
    w = w * cumulative_variance_keep(eigvals, cum_threshold).to(w.dtype)
    return torch.einsum("ktj,kj->tk", u, w)


def neuron_merge(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    reconstruction: Reconstruction = "paper",
    cum_threshold: float = 1.0,
    sign_method: SignMethod = "sum",
) -> NeuronMerge:
    """Both halves of NeuroMerging for one neuronal tensor (or row chunk): ``base`` ``(rows, in)``, trimmed
    ``deltas`` ``(T, rows, in)``. See :func:`split_parallel`, :func:`merge_coefficients`,
    :func:`reconstruct_parallel` and :func:`orthogonal_merge`."""
    coef, orth = split_parallel(deltas, base)
    parallel = reconstruct_parallel(merge_coefficients(coef, sign_method), base, reconstruction)
    total = float(torch.linalg.vector_norm(deltas)) ** 2
    par_energy = float(torch.sum(coef.double() ** 2 * torch.einsum("ki,ki->k", base, base).double()))
    return NeuronMerge(
        parallel=parallel,
        orthogonal=orthogonal_merge(orth, cum_threshold, sign_method),
        parallel_energy=par_energy / total if total > 0 else 0.0,
    )
