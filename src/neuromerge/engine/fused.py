"""The fused-kernel fast paths, in one place: which (method, parameters) a kernel of :mod:`neuromerge.kernels` takes,
and how a chunk is handed to it. A method's module holds its formula only (:meth:`MergeMethod.merge`); the engine and
the in-memory merge ask :func:`fuses` and then call :func:`merge_fused`.

Every path reads the chunk in the checkpoints' dtype (bfloat16 or float32, one dtype), canonical layout, and
returns the merged chunk in ``out_dtype`` (or float32 when the kernel cannot write ``out_dtype``) with its NaN/Inf
count, and fills ``x.report`` as :meth:`merge` does; or None (an input holds NaN/Inf, an unsupported shape) to take
:meth:`merge`. Task Arithmetic and TIES are bitwise equal to :meth:`merge` rounded to the output dtype; NeuroMerging
agrees to rounding (float64 inner products, Jacobi eigenvectors; ``tests/engine/test_native_kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..methods._common import global_trim_thresholds
from ..methods.base import MergeInput, MergeMethod
from ..methods.neuromerging import NeuroMerging
from ..methods.task_arithmetic import TaskVectorMerge, require_whole_tensor, weight_sum
from ..tensors.neurons import merge_coefficients, orthogonal_mix
from ..tensors.sparsify import sign_conflict_sample

Result = tuple[torch.Tensor, int]


@dataclass(frozen=True)
class FusedPath:
    """``applies(params, per_model)``: whether the kernel takes these resolved parameters; ``run(method, x,
    out_dtype)``: the merged chunk, or None to fall back to :meth:`MergeMethod.merge`."""

    applies: Callable[[Any, Sequence[Any]], bool]
    run: Callable[[Any, MergeInput[Any], torch.dtype], Result | None]


def _linear_applies(params: Any, per_model: Sequence[Any]) -> bool:
    return True


def _linear(method: TaskVectorMerge[Any], x: MergeInput[Any], out_dtype: torch.dtype) -> Result | None:
    """Task Arithmetic in one pass (:func:`neuromerge.kernels.linear`), the same sampled sign-conflict rows."""
    if not kernels.supports(x.base, x.models):
        return None
    rows = x.base.shape[0] if x.base.dim() >= 2 else 1
    first, step = sign_conflict_sample(x.base.dim(), rows, x.rows[0], x.full_shape[0] if x.full_shape else None)
    weights = x.weights
    res = kernels.linear(
        x.base, x.models, weights, x.params.lam, normalize_by=weight_sum(weights) if x.params.normalize else None,
        out_dtype=kernels.output_dtype(out_dtype),
        row_len=x.base.numel() // max(1, rows), sample_first=first, sample_stride=step,
    )
    if res.out is None:
        return None
    sampled = res.counts["sampled"]
    x.report["sign_conflict"] = res.counts["conflicts"] / sampled if sampled else 0.0
    return res.out, res.nonfinite_out


def _trim_applies(params: Any, per_model: Sequence[Any]) -> bool:
    """The kernels trim by given thresholds: global ones from the statistics pass, or none (every density 1)."""
    return params.scope == "global" or all(p.density >= 1.0 for p in per_model)


def _ties(method: TaskVectorMerge[Any], x: MergeInput[Any], out_dtype: torch.dtype) -> Result | None:
    """TIES in one pass (:func:`neuromerge.kernels.ties`)."""
    p = x.params
    for reason in method.whole_tensor_reasons(p):
        require_whole_tensor(x, f"{method.name} with {reason}")
    if not _trim_applies(p, x.per_model) or not kernels.supports(x.base, x.models):
        return None
    thresholds = global_trim_thresholds(x, [m.density for m in x.per_model])
    res = kernels.ties(
        x.base, x.models, x.weights, thresholds, p.lam, sign_count=p.sign_method == "count",
        zero_sign=None if p.zero_sign == "majority" else 1.0, variant=p.variant,
        out_dtype=kernels.output_dtype(out_dtype),
    )
    if res.out is None:
        return None
    n = x.base.numel()
    x.report["sign_conflict"] = res.counts["conflicts"] / n if n else 0.0
    if n:
        fractions = [res.counts[f"kept_{t}"] / n for t in range(len(x.models))]
        x.report["kept_density"] = sum(fractions) / len(fractions)
    else:
        x.report["kept_density"] = 0.0
    return res.out, res.nonfinite_out


def _share(part: float, total: float) -> float:
    """``part / total``, 0 when ``total`` is 0 (the parallel energy share of a chunk with no task vector)."""
    return part / total if total > 0 else 0.0


def _neuromerging(method: NeuroMerging, x: MergeInput[Any], out_dtype: torch.dtype) -> Result | None:
    """NeuroMerging for neuronal tensors with the fused kernels. With ``λ1 = 0`` (the default) and at most
    :data:`~neuromerge.kernels.MIX_MAX` models, one sweep (:func:`neuromerge.kernels.neuro_rows`): per row the
    coefficients ``c_t``, the Gram matrix of ``τ⊥``, its eigenproblem and TIES elections
    (:func:`~neuromerge.kernels.orthogonal_mix`) and ``θ0 + λ2 ψ⊥``, while the row is in cache. Otherwise two
    sweeps (:func:`~neuromerge.kernels.neuro_first`, then :func:`~neuromerge.kernels.neuro_second`:
    ``θ0 + λ2 ψ⊥ + λ1 ψ∥``) with the mix and the chunk-wide election of ``c̄`` in between, as in ``merge``. The
    same formulas, but the inner products are summed in float64 (torch: fp32 ``einsum``) and the eigenvectors come
    from Jacobi rotations (torch: LAPACK), so the result agrees with ``merge`` to rounding, not bitwise. Point
    tensors take ``merge``."""
    p = x.params
    if x.kind == "point" or x.base.dim() != 2 or not _trim_applies(p, x.per_model):
        return None
    if not kernels.supports(x.base, x.models):
        return None
    densities = [q.density for q in x.per_model]
    thresholds = global_trim_thresholds(x, densities)
    weights = x.weights
    lam2 = method._lambda2(x, densities)
    sign_count = p.sign_method == "count"
    if p.lambda1 == 0.0 and len(x.models) <= kernels.MIX_MAX:
        rows = kernels.neuro_rows(x.base, x.models, weights, thresholds, p.cum_threshold, sign_count, lam2,
                                  kernels.output_dtype(out_dtype))
        if rows is None:
            return None
        x.report["parallel_energy_share"] = _share(rows.parallel_energy, rows.total_energy)
        return rows.out, rows.bad
    sweep = kernels.neuro_first(x.base, x.models, weights, thresholds)
    if sweep is None:
        return None
    mix = kernels.orthogonal_mix(sweep.gram, p.cum_threshold, sign_count)
    if mix is None:
        mix = orthogonal_mix(sweep.gram, p.cum_threshold, p.sign_method)
    parallel = None
    if p.lambda1 != 0.0:
        merged = merge_coefficients(sweep.coef, p.sign_method)
        if p.parallel_reconstruction == "paper":
            parallel = merged
        else:
            norm = sweep.sq_norm.sqrt().to(torch.float32)
            parallel = torch.where(norm > 0, merged / torch.where(norm > 0, norm, 1.0), 0.0)
    x.report["parallel_energy_share"] = _share(sweep.parallel_energy, sweep.total_energy)
    return kernels.neuro_second(x.base, x.models, weights, thresholds, sweep.coef, mix.to(torch.float32),
                                parallel, p.lambda1, lam2, kernels.output_dtype(out_dtype))


#: method name -> its fused path (methods not listed always take ``merge``)
FUSED: dict[str, FusedPath] = {
    "task_arithmetic": FusedPath(_linear_applies, _linear),
    "ties": FusedPath(_trim_applies, _ties),
    "neuromerging": FusedPath(_trim_applies, _neuromerging),
}


def fuses(method: MergeMethod[Any], params: Any, per_model: Sequence[Any]) -> bool:
    """Whether a fused kernel takes ``method`` with these resolved parameters (so that the engine reads the chunk
    in the checkpoints' dtype for it): the native library is loaded and the method's path applies."""
    path = FUSED.get(method.name)
    return path is not None and kernels.available() and path.applies(params, per_model)


def merge_fused(method: MergeMethod[Any], x: MergeInput[Any], out_dtype: torch.dtype) -> Result | None:
    """The merged chunk through the method's fused kernel (module docstring), or None to take ``merge``."""
    path = FUSED.get(method.name)
    if path is None or not kernels.available():
        return None
    return path.run(method, x, out_dtype)


__all__ = ["FUSED", "FusedPath", "fuses", "merge_fused"]
