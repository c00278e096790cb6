"""Symmetric 8-bit quantization per output channel after percentile clipping (MERGE's module library).

MERGE (Qiu et al., arXiv 2602.06552; docs/methods/spec.md §2 step 3) stores its modules "range-clipped and 8-bit
quantized". Reconstruction, for a tensor ``W`` of shape ``(out, …)`` seen as rows ``w_o`` (output channels):

    c_o   = percentile_p(|w_o|)                  (linear interpolation between order statistics, numpy's default)
    s_o   = c_o / 127                            (fp32 scale; s_o = 0 for an all-zero row)
    q_o   = clamp(round(w_o / s_o), −127, 127)   (int8, symmetric: −128 is never used)
    Ŵ_o   = s_o · q_o

Entries with ``|w| ≤ c_o`` are off by at most ``s_o / 2``; larger ones (the top ``100 − p`` percent of the row)
are clipped to ``±c_o``. ``percentile=100`` clips nothing (``c_o = max |w_o|``).

Only tensors with ≥ 2 dimensions are quantized (linear / conv / embedding weights); 1-D tensors (biases, norm
weights, BN statistics) are a negligible share of the bytes and are kept in float32 (exact for fp32 models, and
fp16 would lose BatchNorm variances' precision) — see :func:`quantizable`.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantizable(t: torch.Tensor) -> bool:
    """True for floating tensors with at least 2 dimensions and at least one entry (stored as int8 + scales)."""
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 0


def row_percentile(a: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per-row percentile of a 2-D tensor ``(rows, n)`` with linear interpolation (``numpy.percentile``'s
    default): position ``p/100 · (n − 1)`` in the sorted row."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    s = a.sort(dim=1).values
    n = s.shape[1]
    pos = percentile / 100.0 * (n - 1)
    lo = min(int(pos), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s[:, lo] + (s[:, hi] - s[:, lo]) * frac


def quantize_per_channel(w: torch.Tensor, percentile: float = 99.9) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 of w's shape, scale fp32 (out,))`` (module docstring formulas; computed in float32)."""
    if not quantizable(w):
        raise ValueError(f"quantize_per_channel needs a floating tensor with >= 2 dims, got {w.dtype} {tuple(w.shape)}")
    rows = w.detach().float().reshape(w.shape[0], -1)
    clip = row_percentile(rows.abs(), percentile)
    scale = clip / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(rows / safe[:, None]), -QMAX, QMAX)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(w.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Ŵ = scale[:, None, …] · q`` in ``dtype``."""
    return (q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))).to(dtype)


def quant_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> dict[str, float]:
    """Error of a quantized tensor: ``max_abs`` ``max |W − Ŵ|``, ``rmse``, ``rel_fro`` ``‖W − Ŵ‖_F / ‖W‖_F``
    (0 for a zero tensor), ``clipped`` (fraction of entries above their row's clip value ``127 · s_o``),
    ``numel``."""
    x = w.detach().float()
    err = x - dequantize(q, scale)
    norm = float(x.norm())
    clip = (scale.float() * QMAX).reshape(-1, *([1] * (x.dim() - 1)))
    return {
        "max_abs": float(err.abs().max()) if err.numel() else 0.0,
        "rmse": float(err.pow(2).mean().sqrt()) if err.numel() else 0.0,
        "rel_fro": float(err.norm()) / norm if norm > 0 else 0.0,
        "clipped": float((x.abs() > clip).float().mean()) if x.numel() else 0.0,
        "numel": float(x.numel()),
    }


def combine_errors(stats: list[dict[str, float]]) -> dict[str, float]:
    """Aggregate :func:`quant_error` results: max of ``max_abs``, numel-weighted ``rmse`` (root of the mean
    square) and ``clipped`` fraction, ``rel_fro`` max over tensors, total ``numel``."""
    n = sum(s["numel"] for s in stats)
    if n == 0:
        return {"max_abs": 0.0, "rmse": 0.0, "rel_fro": 0.0, "clipped": 0.0, "numel": 0.0}
    return {
        "max_abs": max(s["max_abs"] for s in stats),
        "rmse": (sum(s["rmse"] ** 2 * s["numel"] for s in stats) / n) ** 0.5,
        "rel_fro": max(s["rel_fro"] for s in stats),
        "clipped": sum(s["clipped"] * s["numel"] for s in stats) / n,
        "numel": n,
    }
