"""Fused CPU kernels (``_fused.c``): one sweep over bf16/fp32 inputs per chunk instead of the torch path's ~10
elementwise passes. :func:`linear` (Task Arithmetic), :func:`ties` (TIES) and the statistics pass's histograms
(:func:`add_high_histograms`, :func:`add_window_histograms`) are bitwise identical to the torch path; NeuroMerging's
kernels (:func:`neuro_rows`, :func:`neuro_first`, :func:`orthogonal_mix`, :func:`neuro_second`) sum in float64 and
solve the per-row eigenproblems by Jacobi rotations, so they agree with it to rounding only. Which is which, for what
parameters, within what tolerance and checked by which test: the one table in ``docs/engine.md``, section "Fused
kernels: bitwise or to rounding".

The shared library is built at install time as an optional extension and loaded with :mod:`ctypes` (calls release
the GIL, so the engine's thread pool runs them in parallel). :func:`available` says whether it is there; every
caller falls back to the torch path when it is not, or when ``NEUROMERGE_NATIVE=0``. Inputs are contiguous CPU
tensors of one dtype (bfloat16 or float32), in canonical layout; the kernels never see NaN/Inf silently: they count
them and the caller then takes the torch path, which raises the usual error (or merges, with ``allow_nonfinite``).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

#: the signatures version this module calls (``NM_ABI`` in ``_fused.c``)
ABI = 8
#: dtype codes of the kernels
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes for a requested output ``dtype``: itself when the kernels write it, else float32
    (the caller converts, as the torch path converts its fp32 result)."""
    return dtype if dtype in DTYPE_CODES else torch.float32

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_F32 = ctypes.c_float


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("NEUROMERGE_NATIVE", "1") == "0":
        return None
    try:
        from . import _fused  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_fused.__file__)
    abi = getattr(lib, "nm_abi", None)
    if abi is None:
        return None
    abi.restype = _I64
    abi.argtypes = []
    if abi() != ABI:  # a stale build (the last rebuild failed): its signatures may differ from the calls below
        return None
    lib.nm_linear.restype = _I64
    lib.nm_linear.argtypes = [_I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int, _PTR, ctypes.c_int, _PTR, _F32,
                              ctypes.c_int, _F32, _I64, _I64, _I64, _PTR]
    lib.nm_ties.restype = _I64
    lib.nm_ties.argtypes = [_I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int, _PTR, ctypes.c_int, _PTR, _PTR, _F32,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int, _F32, _PTR]
    lib.nm_neuro_first.restype = _I64
    lib.nm_neuro_first.argtypes = [_I64, _I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR,
                                   _PTR]
    lib.nm_neuro_second.restype = _I64
    lib.nm_neuro_second.argtypes = [_I64, _I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR,
                                    _F32, _F32, _PTR, ctypes.c_int]
    lib.nm_orthogonal_mix.restype = _I64
    lib.nm_orthogonal_mix.argtypes = [_I64, ctypes.c_int, _PTR, ctypes.c_double, ctypes.c_int, _PTR]
    lib.nm_neuro_rows.restype = _I64
    lib.nm_neuro_rows.argtypes = [_I64, _I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int, _PTR, _PTR, ctypes.c_double,
                                  ctypes.c_int, _F32, _PTR, ctypes.c_int, _PTR, _PTR]
    lib.nm_set_portable.restype = None
    lib.nm_set_portable.argtypes = [ctypes.c_int]
    lib.nm_abs_hist.restype = _I64
    lib.nm_abs_hist.argtypes = [_I64, _PTR, _PTR, ctypes.c_int, _PTR, _PTR]
    lib.nm_abs_window.restype = _I64
    lib.nm_abs_window.argtypes = [_I64, _PTR, _PTR, ctypes.c_int, _I64, _I64, _PTR, _PTR, _PTR]
    return lib


def available() -> bool:
    """Whether the compiled kernels are installed and enabled (``NEUROMERGE_NATIVE`` is not ``0``)."""
    return _library() is not None


def supports(base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels can take these inputs: available, CPU, one dtype among bfloat16/float32, equal
    sizes."""
    if not available() or base.device.type != "cpu" or base.dtype not in DTYPE_CODES:
        return False
    return all(m.device.type == "cpu" and m.dtype == base.dtype and m.numel() == base.numel() for m in models)


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _floats(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def _check(code: int) -> None:
    if code != 0:  # pragma: no cover - only on a model count outside 1..256 or an allocation failure
        raise RuntimeError(f"fused kernel failed with code {code}")


@dataclass(frozen=True)
class FusedResult:
    """A kernel's output (``None`` when an input held NaN/Inf: the caller takes the torch path) and counts."""

    out: torch.Tensor | None
    nonfinite_out: int
    counts: dict[str, int]


def linear(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], lam: float, *,
           normalize_by: float | None, out_dtype: torch.dtype, row_len: int, sample_first: int,
           sample_stride: int) -> FusedResult:
    """``θ = b + λ · acc`` with ``acc = Σ_t (x_t − b) w_t`` (in model order; ``/ normalize_by`` when given), as
    :class:`~neuromerge.methods.task_arithmetic.TaskVectorMerge`'s linear combine. Counts: ``conflicts`` and
    ``sampled`` entries of the rows ``sample_first + i · sample_stride`` (rows of ``row_len`` entries)."""
    lib = _library()
    assert lib is not None
    base = base.contiguous()
    models = [m.contiguous() for m in models]
    out = torch.empty(base.shape, dtype=out_dtype)
    stats = np.zeros(4, np.int64)
    _check(lib.nm_linear(
        base.numel(), len(models), base.data_ptr(), _pointers(models), DTYPE_CODES[base.dtype], out.data_ptr(),
        DTYPE_CODES[out_dtype], _floats(weights), lam, int(normalize_by is not None),
        1.0 if normalize_by is None else normalize_by, max(1, row_len), sample_first, max(1, sample_stride),
        stats.ctypes.data,
    ))
    counts = {"conflicts": int(stats[0]), "sampled": int(stats[1])}
    return FusedResult(None if stats[2] else out, int(stats[3]), counts)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], thresholds: Sequence[float],
         lam: float, *, sign_count: bool, zero_sign: float | None, variant: str, out_dtype: torch.dtype
         ) -> FusedResult:
    """TIES trim (``|τ_t| >= thr_t``), weighting, sign election (``zero_sign`` ±1, or None for the majority of the
    chunk) and disjoint merge, ``θ = b + τ_m · λ``, as :class:`~neuromerge.methods.task_arithmetic.TaskVectorMerge`
    with :class:`~neuromerge.methods.ties.Ties`'s sparsify. Counts: ``conflicts`` and ``kept_<t>``."""
    lib = _library()
    assert lib is not None
    base = base.contiguous()
    models = [m.contiguous() for m in models]
    out = torch.empty(base.shape, dtype=out_dtype)
    stats = np.zeros(6 + len(models), np.int64)
    if variant == "dis-sum":
        div_mode, min_w = 0, 0.0
    elif min(weights) > 0:
        div_mode, min_w = 1, float(min(weights))
    else:
        div_mode, min_w = 2, 0.0
    fill = 0 if zero_sign is None else (1 if zero_sign > 0 else -1)
    _check(lib.nm_ties(
        base.numel(), len(models), base.data_ptr(), _pointers(models), DTYPE_CODES[base.dtype], out.data_ptr(),
        DTYPE_CODES[out_dtype], _floats(weights), _floats(thresholds), lam, int(sign_count), fill,
        div_mode, min_w, stats.ctypes.data,
    ))
    counts = {"conflicts": int(stats[0]), "fill_entries": int(stats[3]),
              **{f"kept_{t}": int(stats[6 + t]) for t in range(len(models))}}
    if stats[1]:
        return FusedResult(None, 0, counts)
    return FusedResult(out, int(stats[2]), counts)


@dataclass(frozen=True)
class NeuronSweep:
    """What :func:`neuro_first` measures of a ``(rows, d)`` chunk: ``coef`` ``c_t^k`` ``(T, rows)`` fp32, the Gram
    matrices of the orthogonal parts ``(rows, T, T)`` and ``‖w0^k‖²`` ``(rows,)`` (float64), and the float64 sums
    ``Σ ‖τ'_t‖²`` (``total_energy``) and ``Σ (c_t^k)² ‖w0^k‖²`` (``parallel_energy``)."""

    coef: torch.Tensor
    gram: torch.Tensor
    sq_norm: torch.Tensor
    total_energy: float
    parallel_energy: float


def neuro_first(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                thresholds: Sequence[float]) -> NeuronSweep | None:
    """First NeuroMerging sweep over a 2-D chunk: with ``τ'_t = w_t (x_t − b) [|x_t − b| >= thr_t]`` per row,
    ``c_t = ⟨τ'_t, b⟩ / ‖b‖²`` and the Gram matrix of ``τ'_t − c_t b`` (see ``nm_neuro_first``). None when an input
    holds NaN/Inf."""
    lib = _library()
    assert lib is not None
    base = base.contiguous()
    models = [m.contiguous() for m in models]
    rows, d = base.shape
    t = len(models)
    coef = torch.empty(t, rows, dtype=torch.float32)
    gram = torch.empty(rows, t, t, dtype=torch.float64)
    sq_norm = torch.empty(rows, dtype=torch.float64)
    energy = np.zeros(2, np.float64)
    bad = lib.nm_neuro_first(rows, d, t, base.data_ptr(), _pointers(models), DTYPE_CODES[base.dtype],
                             _floats(weights), _floats(thresholds), coef.data_ptr(), gram.data_ptr(),
                             sq_norm.data_ptr(), energy.ctypes.data)
    _check(min(0, int(bad)))
    if bad:
        return None
    return NeuronSweep(coef, gram, sq_norm, float(energy[0]), float(energy[1]))


def neuro_second(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                 thresholds: Sequence[float], coef: torch.Tensor, mix: torch.Tensor, parallel: torch.Tensor | None,
                 lam1: float, lam2: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Second NeuroMerging sweep: ``θ = b + λ2 Σ_t mix_t (τ'_t − c_t b) [+ λ1 (p b)]`` per row (``mix``, ``coef``:
    ``(T, rows)`` fp32; ``parallel`` ``p``: ``(rows,)`` fp32), in ``out_dtype``, with its NaN/Inf count."""
    lib = _library()
    assert lib is not None
    base = base.contiguous()
    models = [m.contiguous() for m in models]
    rows, d = base.shape
    out = torch.empty(rows, d, dtype=out_dtype)
    coef = coef.to(torch.float32).contiguous()
    mix = mix.to(torch.float32).contiguous()
    par = (parallel if parallel is not None else torch.zeros(rows)).to(torch.float32).contiguous()
    bad = lib.nm_neuro_second(rows, d, len(models), base.data_ptr(), _pointers(models), DTYPE_CODES[base.dtype],
                              _floats(weights), _floats(thresholds), coef.data_ptr(), mix.data_ptr(), par.data_ptr(),
                              lam1 if parallel is not None else 0.0, lam2, out.data_ptr(), DTYPE_CODES[out_dtype])
    _check(min(0, int(bad)))
    return out, int(bad)


#: the most models the C per-row eigenproblem takes (``MIX_MAX`` in ``_fused.c``); more go through torch
MIX_MAX = 16


def orthogonal_mix(gram: torch.Tensor, cum_threshold: float, sign_count: bool) -> torch.Tensor | None:
    """:func:`neuromerge.tensors.neurons.orthogonal_mix` in C (``nm_orthogonal_mix``: Jacobi eigenpairs of each
    ``T × T`` Gram matrix, the same selection and elections): the mix ``(T, rows)`` float64, or None for more than
    :data:`MIX_MAX` models. The eigenvectors come from another algorithm than torch's LAPACK call, so the mix agrees
    with the reference to rounding."""
    lib = _library()
    assert lib is not None
    rows, t, _ = gram.shape
    if not 1 <= t <= MIX_MAX:
        return None
    gram = gram.to(torch.float64).contiguous()
    mix = torch.empty(t, rows, dtype=torch.float64)
    _check(lib.nm_orthogonal_mix(rows, t, gram.data_ptr(), cum_threshold, int(sign_count), mix.data_ptr()))
    return mix


@dataclass(frozen=True)
class NeuronRows:
    """What :func:`neuro_rows` returns: the merged chunk, its NaN/Inf count, and the energies (as in
    :class:`NeuronSweep`)."""

    out: torch.Tensor
    bad: int
    total_energy: float
    parallel_energy: float


def neuro_rows(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
               thresholds: Sequence[float], cum_threshold: float, sign_count: bool, lam2: float,
               out_dtype: torch.dtype) -> NeuronRows | None:
    """NeuroMerging with ``λ1 = 0`` in one sweep (``nm_neuro_rows``): per row the split of :func:`neuro_first`, the mix
    of :func:`orthogonal_mix` and the output of :func:`neuro_second`, ``θ = b + λ2 Σ_t a_t τ⊥_t``, while the row is
    in cache. None when an input holds NaN/Inf or there are more than :data:`MIX_MAX` models."""
    lib = _library()
    assert lib is not None
    if not 1 <= len(models) <= MIX_MAX:
        return None
    base = base.contiguous()
    models = [m.contiguous() for m in models]
    rows, d = base.shape
    out = torch.empty(rows, d, dtype=out_dtype)
    energy = np.zeros(2, np.float64)
    stats = np.zeros(2, np.int64)
    _check(lib.nm_neuro_rows(rows, d, len(models), base.data_ptr(), _pointers(models), DTYPE_CODES[base.dtype],
                             _floats(weights), _floats(thresholds), cum_threshold, int(sign_count), lam2,
                             out.data_ptr(), DTYPE_CODES[out_dtype], energy.ctypes.data, stats.ctypes.data))
    if stats[0]:
        return None
    return NeuronRows(out, int(stats[1]), float(energy[0]), float(energy[1]))


def set_portable(on: bool) -> None:
    """Make the kernels take their portable code even where the CPU has a faster path (the AVX2 window counts and
    block masses of :func:`add_window_histograms`), so that tests can compare the two; both give the same integers."""
    lib = _library()
    assert lib is not None
    lib.nm_set_portable(int(on))


#: the statistics histograms' layout: bins of the high 16 bits of a key, of the low 16 bits, and exponent slots
HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
EXPONENT_SLOTS = 256


def _int64_array(a: np.ndarray | None, shape: tuple[int, ...]) -> int | None:
    if a is None:
        return None
    assert a.dtype == np.int64 and a.shape == shape and a.flags.c_contiguous, (a.dtype, a.shape)
    return a.ctypes.data


def _abs_inputs(base: torch.Tensor, model: torch.Tensor) -> tuple[int, int, int, int]:
    """The histogram kernels' leading arguments; ``base`` and ``model`` must be contiguous, and the caller keeps
    them alive through the call (the kernel gets bare pointers)."""
    assert base.is_contiguous() and model.is_contiguous()
    return base.numel(), base.data_ptr(), model.data_ptr(), DTYPE_CODES[base.dtype]


def add_high_histograms(base: torch.Tensor, model: torch.Tensor, counts: np.ndarray, mass: np.ndarray | None
                        ) -> bool:
    """Add the histograms of the fp32 bits of ``|x − b|`` by their high 16 bits (``(2¹⁵,)`` int64 arrays) to
    ``counts`` and, when given, the sums of the 24-bit significands to ``mass`` (``nm_abs_hist``). False when an
    input holds NaN/Inf (the arrays are then spoilt)."""
    lib = _library()
    assert lib is not None
    base, model = base.contiguous(), model.contiguous()
    bad = lib.nm_abs_hist(*_abs_inputs(base, model), _int64_array(counts, (HIGH_BINS,)),
                          _int64_array(mass, (HIGH_BINS,)))
    return bad == 0


def add_window_histograms(base: torch.Tensor, model: torch.Tensor, window: tuple[int, int], low_counts: np.ndarray,
                          counts: np.ndarray, mass: np.ndarray | None) -> bool:
    """Add, for the fp32 bits ``k`` of ``|x − b|`` and the high bins ``window = (lo, count)`` (``nm_abs_window``):
    the window's entries by their key to ``low_counts`` (``(count, 2¹⁶)``), (entries above the window, all entries)
    to ``counts`` (``(2,)``) and, when given, the exact L1 masses of the entries below / above the window as
    significand sums per exponent slot to ``mass`` (``(2, 256)``). False when an input holds NaN/Inf (the arrays
    are then spoilt)."""
    lib = _library()
    assert lib is not None
    lo, count = window
    base, model = base.contiguous(), model.contiguous()
    bad = lib.nm_abs_window(*_abs_inputs(base, model), lo << 16, (lo + count) << 16,
                            _int64_array(low_counts, (count, LOW_BINS)), _int64_array(counts, (2,)),
                            _int64_array(mass, (2, EXPONENT_SLOTS)))
    return bad == 0


__all__ = [
    "FusedResult", "NeuronSweep", "add_high_histograms", "add_window_histograms", "available", "linear",
    "neuro_first", "neuro_rows", "neuro_second", "orthogonal_mix", "output_dtype", "set_portable", "supports",
    "ties",
]
