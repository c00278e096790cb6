"""Read one tensor (or row chunk) of every model of a pool as fp32 in canonical layout, checking finiteness."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError
from .layout import from_canonical, to_canonical
from .plan import Pool, TensorPlan


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf. A NaN or Inf makes the sum non-finite, so the (vectorised, ~20× cheaper
    than ``isfinite().all()``) sum decides; only when it is non-finite — a NaN/Inf, or an overflow of huge
    finite values — is the exact elementwise test run."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def read_fp32(pool: Pool, plan: TensorPlan, rows: tuple[int, int] | None, *, model: int,
              allow_nonfinite: bool, device: torch.device) -> torch.Tensor:
    """Model ``model`` (−1 = base) of tensor ``plan`` rows ``rows`` (None = whole), fp32, canonical layout."""
    ckpt = pool.base if model < 0 else pool.models[model]
    name = plan.name if model < 0 else plan.sources[model]
    raw = ckpt.read(name, rows)
    t = raw.to(device=device, dtype=torch.float32)
    if not allow_nonfinite and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        where = f" rows {rows[0]}..{rows[1] - 1}" if rows else ""
        raise NonFiniteError(
            f"{ckpt.path}: tensor {name!r}{where} holds {bad} NaN/Inf values; "
            "set `allow_nonfinite: true` to merge anyway"
        )
    return to_canonical(t, plan.layout)


def read_all(pool: Pool, plan: TensorPlan, rows: tuple[int, int] | None, *, allow_nonfinite: bool,
             device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and every model's copy of one chunk, in the pool's fixed model order (rows permuted to the output
    vocabulary first for a ``remapped`` tensor)."""
    if plan.remapped:
        return _remapped(pool, plan, rows, allow_nonfinite=allow_nonfinite, device=device)
    base = read_fp32(pool, plan, rows, model=-1, allow_nonfinite=allow_nonfinite, device=device)
    models = [
        read_fp32(pool, plan, rows, model=i, allow_nonfinite=allow_nonfinite, device=device)
        for i in range(len(pool.models))
    ]
    return base, models


def read_stored_all(pool: Pool, plan: TensorPlan, rows: tuple[int, int] | None
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and every model's copy of one chunk in canonical layout, in the checkpoints' dtype when they share
    bfloat16 or float32 (the fused kernels' inputs), else all as float32. Not checked for NaN/Inf: the kernels
    count them and the caller then reads through :func:`read_all`, which does."""
    if plan.remapped:  # float32 (the permuted rows are computed in float32)
        return _remapped(pool, plan, rows, allow_nonfinite=True, device=torch.device("cpu"))
    names = [(pool.base, plan.name), *zip(pool.models, plan.sources, strict=True)]
    raw = kernel_inputs([to_canonical(ckpt.read(name, rows), plan.layout) for ckpt, name in names])
    return raw[0], raw[1:]


def _remapped(pool: Pool, plan: TensorPlan, rows: tuple[int, int] | None, *, allow_nonfinite: bool,
              device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and models of a ``remapped`` tensor: every distinct checkpoint's whole copy (fp32, rows = token ids)
    permuted to the output vocabulary (:meth:`~neuromerge.io.tokenizer_merge.VocabularyMerge.remap`), cut to
    ``rows``, in canonical layout. A checkpoint listed twice gets copies (a method may work in place)."""
    assert pool.vocabulary is not None
    ckpts = pool.checkpoints
    index = {id(pool.base): -1, **{id(m): i for i, m in reversed(list(enumerate(pool.models)))}}
    raw = []
    for ckpt in ckpts:
        i = index[id(ckpt)]
        t = read_fp32(pool, plan, None, model=i, allow_nonfinite=allow_nonfinite, device=device)
        raw.append(from_canonical(t, plan.layout, tuple(t.shape)) if plan.layout == "in_out" else t)
    permuted = pool.vocabulary.remap(raw)
    if rows is not None:
        permuted = [t[rows[0]:rows[1]] for t in permuted]
    by_id = {id(c): to_canonical(t, plan.layout) for c, t in zip(ckpts, permuted, strict=True)}
    base = by_id[id(pool.base)]
    seen = {id(base)}
    models = []
    for m in pool.models:
        t = by_id[id(m)]
        models.append(t.clone() if id(t) in seen else t)
        seen.add(id(t))
    return base, models


def kernel_inputs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as they are when they share bfloat16 or float32 (what the fused kernels read), else as float32."""
    if len({t.dtype for t in tensors}) != 1 or tensors[0].dtype not in (torch.bfloat16, torch.float32):
        return [t.float() for t in tensors]
    return tensors


def chunk_rows(plan: TensorPlan, chunk: tuple[int, int]) -> tuple[int, int] | None:
    """Rows argument for a reader: None when the chunk is the whole tensor (0-d and transposed tensors too)."""
    if not plan.shape or (chunk == (0, plan.shape[0]) and plan.extra_rows is None):
        return None
    return chunk
