"""RAM: Reinforced Agent Merging (arXiv 2601.13572; mergekit 0.1.5 ``merge_methods/ram``).

A task-vector entry *contributes* when ``|τ_t| > ε``. An entry only one model changes keeps that model's value
(instead of being averaged down by the models that leave it alone); entries several models change are averaged over
those models. RAM+ (tensor-local) also amplifies the unique entries of a model by how much it overlaps with others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def contributions(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(τ_t ⊙ [|τ_t| > ε] stacked (T, ...), c)``, ``c = Σ_t [|τ_t| > ε]`` the number of contributing models per
    entry."""
    stacked = torch.stack(list(taus))
    nonzero = stacked.abs() > epsilon
    return torch.where(nonzero, stacked, torch.zeros((), dtype=stacked.dtype)), nonzero.sum(dim=0)


def ram_merge_deltas(taus: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """``Σ_t τ_t [|τ_t| > ε] / max(c, 1)``: the mean over the contributing models (their value where only one
    contributes, 0 where none does). Elementwise."""
    kept, count = contributions(taus, epsilon)
    return kept.sum(dim=0) / count.clamp(min=1)


def ramplus_lambdas(taus: Sequence[torch.Tensor], epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
                    ) -> list[float]:
    """RAM+ amplification per model over the tensor: ``λ_t = 1 + r · clamp(ρ_t, 0, α)``, ``ρ_t = S_t / max(U_t, ε)``
    with ``S_t`` / ``U_t`` the numbers of entries where model ``t`` contributes together with others (``c > 1``) /
    alone (``c = 1``)."""
    stacked = torch.stack(list(taus))
    nonzero = stacked.abs() > epsilon
    count = nonzero.sum(dim=0)
    shared = (nonzero & (count > 1)).reshape(len(taus), -1).sum(dim=1).to(torch.float64)
    unique = (nonzero & (count == 1)).reshape(len(taus), -1).sum(dim=1).to(torch.float64)
    rho = shared / unique.clamp(min=epsilon)
    return [1.0 + r * float(v) for v in rho.clamp(min=0, max=alpha)]


def ramplus_merge_deltas(taus: Sequence[torch.Tensor], epsilon: float = 1e-5, r: float = 0.1,
                         alpha: float = 0.2) -> torch.Tensor:
    """``Σ_t (λ_t τ_t [c = 1] + τ_t [c > 1] / c) [|τ_t| > ε]`` with :func:`ramplus_lambdas`: unique entries scaled
    by their model's ``λ_t``, shared ones averaged."""
    lambdas = ramplus_lambdas(taus, epsilon, r, alpha)
    kept, count = contributions(taus, epsilon)
    scale = torch.tensor(lambdas, dtype=kept.dtype, device=kept.device).reshape(-1, *([1] * (kept.dim() - 1)))
    unique = (count == 1).to(kept.dtype)
    shared = (count > 1).to(kept.dtype) / count.clamp(min=1)
    return (kept * unique * scale + kept * shared).sum(dim=0)
