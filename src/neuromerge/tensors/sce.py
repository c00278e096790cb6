"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990;
mergekit 0.1.5 ``merge_methods/sce``).

Over the stacked task vectors ``τ`` of shape ``(T, ...)``: *select* the entries where the models vary most, weight
each model by its mean squared task vector (*calculate*), *erase* the entries whose sign disagrees with the elected
sign, and take the weighted mean of what remains.
"""

from __future__ import annotations

import torch

#: mergekit's guards: a weight sum below this gives uniform weights; the divisor is clamped below at this
SCE_EPS = 1e-6


def sce_select_mask(taus: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Boolean mask over one model's shape keeping the ``k = ⌊select_topk · nnz(σ²)⌋`` entries of largest variance
    ``σ² = Var_t(τ_t)`` (population variance across models; ``nnz`` counts the entries where it is non-zero). All
    entries for ``select_topk >= 1``, none for ``<= 0`` or ``k = 0``."""
    shape = taus.shape[1:]
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.bool, device=taus.device)
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=taus.device)
    if k > 0:
        mask[torch.topk(var.reshape(-1), k=k, largest=True).indices] = True
    return mask.reshape(shape)


def sce_weights(taus: torch.Tensor) -> torch.Tensor:
    """Per-model weights ``w_t = mean(τ_t²) / Σ_s mean(τ_s²)``; uniform ``1/T`` when ``Σ_s mean(τ_s²) < 1e-6``
    (mergekit's absolute guard)."""
    energy = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < SCE_EPS:
        return torch.full_like(energy, 1.0 / taus.shape[0])
    return energy / total


def sce_merge_deltas(taus: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """The merged task vector: ``τ̂ = τ ⊙ select``, ``γ = sign(Σ_t τ̂_t)`` with ``γ = +1`` where the sum is ``>= 0``,
    ``m_t = [sign(τ̂_t) = γ]`` (a zero entry never agrees), ``w`` = :func:`sce_weights` of ``τ̂`` and
    ``Σ_t w_t m_t τ̂_t / max(Σ_t w_t m_t, 1e-6)``."""
    if select_topk < 1:
        taus = taus * sce_select_mask(taus, select_topk)
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
    agree = (taus.sign() == elected).to(taus.dtype)
    w = sce_weights(taus).reshape(-1, *([1] * (taus.dim() - 1)))
    erased = w * agree
    return (taus * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=SCE_EPS)
