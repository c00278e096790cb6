"""Model Stock (Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv
2403.19522; official code ``naver-ai/model-stock``). Peer: mergekit ``model_stock``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from .base import UnweightedParams
from .define import merge_function

#: mergekit's guards: lower clamp of ‖τ_i‖‖τ_j‖ and the |1 + (k−1)cos| below which t = 0
NORM_PRODUCT_EPS = 1e-6
SINGULAR_EPS = 1e-6


def model_stock_ratio(deltas: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Interpolation ratio ``t = k cos / (1 + (k−1) cos)`` with ``cos`` the mean pairwise cosine of the task
    vectors (float64), one value per tensor (shape ``(1, 1)``) or per row (``(rows, 1)``, ``filter_wise``).

    As mergekit: each cosine is ``⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6)`` clamped to [−1, 1]; where
    ``|1 + (k−1) cos| < 1e-6`` the ratio is 0 (keep the base). ``t`` is not clamped to [0, 1].
    """
    k = len(deltas)
    if k < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    rows = deltas[0].shape[0] if filter_wise and deltas[0].dim() >= 2 else 1
    d = torch.stack([tau.reshape(rows, -1) for tau in deltas]).to(torch.float64)  # (k, rows, n)
    gram = torch.einsum("irn,jrn->rij", d, d)  # (rows, k, k)
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # (rows, k)
    i, j = torch.triu_indices(k, k, offset=1)
    cos = gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=NORM_PRODUCT_EPS)
    cos = cos.clamp(-1, 1).mean(dim=1, keepdim=True)  # (rows, 1)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denom))
    return t.to(deltas[0].dtype)


@merge_function(
    name="model_stock", summary="t·mean θ_t + (1−t)θ0, t = k cos/(1+(k−1)cos)",
    source="Jang et al. 2024, arXiv 2403.19522 (naver-ai/model-stock); mergekit model_stock",
    chunkable=False, min_models=2, params_base=UnweightedParams, ignored_params=("weight",),
)
def model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], *,
    filter_wise: Annotated[bool, Field(
        description="one ratio t per row (output neuron) instead of one per tensor")] = False,
) -> torch.Tensor:
    """``θ = t · mean_t θ_t + (1 − t) θ0`` with ``t = k cos / (1 + (k−1) cos)``, ``k`` the number of
    fine-tuned models and ``cos`` the mean pairwise cosine between their task vectors (per tensor, or per
    row with ``filter_wise``). Needs the base and ``k >= 2``; weights are not used."""
    t = model_stock_ratio(deltas, filter_wise)
    rows = t.shape[0]
    mean = torch.stack([m.reshape(rows, -1) for m in models]).mean(dim=0)
    return (t * mean + (1 - t) * base.reshape(rows, -1)).reshape(base.shape)


ModelStock = model_stock
ModelStockParams = ModelStock.Params

__all__ = ["ModelStock", "ModelStockParams", "UnweightedParams", "model_stock_ratio"]
