"""Low-rank factors of weight updates: truncated SVD into LoRA factors, exact concatenation of LoRA factors.

Conventions are PEFT's (``peft/tuners/lora/layer.py``): a LoRA update is ``ΔW = s · B A`` with ``A ∈ R^{r×n}``
(``lora_A``), ``B ∈ R^{m×r}`` (``lora_B``) and scaling ``s``. Both functions return factors meant for scaling
``s = 1`` (``lora_alpha = r`` without rsLoRA).

* :func:`truncated_svd_factors` — Eckart–Young: the best rank-``r`` approximation of ``ΔW = U S Vᵀ`` in Frobenius
  norm is ``U_r S_r V_rᵀ`` (Eckart & Young 1936); it is split symmetrically, ``B = U_r diag(√S_r)``,
  ``A = diag(√S_r) V_rᵀ``, so both factors have the same scale. The share of ``‖ΔW‖_F²`` left out is
  ``Σ_{i>r} σ_i² / Σ_i σ_i²`` = ``‖ΔW − B A‖_F² / ‖ΔW‖_F²``.
* :func:`concat_factors` — a linear combination of LoRA updates is a LoRA update of the summed rank:
  ``Σ_t c_t B_t A_t = [c_1 B_1, …, c_T B_T] · [A_1; …; A_T]`` (exact: no rounding beyond the products ``c_t B_t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def discarded_energy(singular_values: torch.Tensor, rank: int) -> float:
    """``Σ_{i>r} σ_i² / Σ_i σ_i²`` in float64 (0 for a zero matrix)."""
    energy = singular_values.to(torch.float64).square()
    total = float(energy.sum())
    return float(energy[rank:].sum()) / total if total > 0 else 0.0


def truncated_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``r`` LoRA factors of the 2-D ``delta`` (``m×n``): ``(A, B, discarded)`` with ``A = diag(√S_r) V_rᵀ``
    (``r×n``), ``B = U_r diag(√S_r)`` (``m×r``), ``B A`` the best rank-``r`` approximation of ``delta`` and
    ``discarded = Σ_{i>r} σ_i² / Σ_i σ_i²`` its relative squared Frobenius error.

    ``r = min(rank, m, n)``; the SVD runs in float32 (float64 input stays float64), the energies in float64.
    Singular values beyond the numerical rank give zero rows/columns (harmless for PEFT)."""
    if delta.dim() != 2:
        raise ValueError(f"truncated_svd_factors needs a 2-D matrix, got shape {list(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    work = delta if delta.dtype == torch.float64 else delta.to(torch.float32)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    return a, b, discarded_energy(s, r)


def concat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_cat, B_cat)`` with ``B_cat A_cat = Σ_t c_t B_t A_t``: ``A_cat = [A_1; …; A_T]`` (stacked along the rank
    dimension 0), ``B_cat = [c_1 B_1, …, c_T B_T]`` (along dimension 1). ``c_t`` carries everything that
    multiplies ``B_t A_t`` (merge coefficient × the adapter's scaling ``α/r`` or ``α/√r``). Works for linear
    factors (``A: r×n``, ``B: m×r``) and PEFT conv factors (``A: r×in×k×k``, ``B: out×r×1×1``)."""
    if not factors or len(factors) != len(coefficients):
        raise ValueError(f"need one coefficient per factor pair, got {len(factors)} pairs, {len(coefficients)}")
    a_cat = torch.cat([a for a, _ in factors], dim=0)
    b_cat = torch.cat([b * c for (_, b), c in zip(factors, coefficients, strict=True)], dim=1)
    return a_cat, b_cat


__all__ = ["concat_factors", "discarded_energy", "truncated_svd_factors"]
