"""Statistics pass: exact *global* per-model top-k thresholds without concatenating a model.

The magnitude ``|τ|`` of an fp32 value is a non-negative float whose IEEE-754 bit pattern, read as an int32, is
monotone in the value. A two-level radix select finds the ``k``-th largest magnitude exactly:

1. a streamed pass builds, per model, a 2¹⁵-bin histogram of the high 16 bits; the bin holding the ``k``-th
   largest entry follows from cumulative counts;
2. the low 16 bits of the entries in that bin (2¹⁶ bins) pin the threshold down to the exact float.

Step 2 needs a second read of every chunk — unless the first pass already counted that bin's low bits. So when a
model's trim is partial, the high histograms of every :data:`SAMPLE_EVERY`-th chunk first predict its threshold bin,
and the first pass also counts the low bits of the :data:`WINDOW` bins on either side of the prediction. When the
true bin is inside the window (the usual case) there is no second read; otherwise the second pass runs. The
prediction only decides how many reads it takes, never the result.

**L1 mass** (NeuroMerging's σ) is kept exactly, as integers: all entries of one high bin share their exponent, so
the bin's mass is ``S · 2^(e − 150)`` with ``S`` the int64 sum of the entries' 24-bit significands. Integer sums do
not depend on the order of the additions, so every histogram is added into per-thread arrays (no per-chunk
histograms are allocated, returned and summed) and the result is bitwise the same for any number of threads, any
chunking, and with or without the fused kernels (:mod:`neuromerge.kernels`, which fill the same arrays; the torch
path is the fallback and the reference). The float64 masses are formed once at the end, bin by bin in order.

Memory is a few histograms per model and thread, whatever the model size. Entries ``>=`` the threshold are kept
(ties kept), ``k = floor(density · N)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..methods import GlobalStats
from ..tensors.selection import kept_count

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
#: every SAMPLE_EVERY-th chunk predicts the threshold bins (when there are at least MIN_SAMPLED_CHUNKS such chunks)
SAMPLE_EVERY = 8
MIN_SAMPLED_CHUNKS = 4
#: high bins on each side of the predicted one whose low bits the first pass also counts
WINDOW = 2

ChunkReader = Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]]
#: (first high bin, number of bins) whose low bits a pass counts
Window = tuple[int, int]


@dataclass
class Histograms:
    """One model's histograms of ``|τ|``: ``high_*`` by the high 16 bits (None when not built), ``low_*`` by the low
    16 bits of the entries in the high bins ``window`` (rows of ``(count, 2¹⁶)``); ``*_counts`` entry counts,
    ``*_mass`` int64 sums of the 24-bit significands (None without L1 mass)."""

    high_counts: np.ndarray | None
    high_mass: np.ndarray | None
    window: Window | None
    low_counts: np.ndarray | None
    low_mass: np.ndarray | None

    @classmethod
    def zeros(cls, high: bool, window: Window | None, l1: bool) -> Histograms:
        n = window[1] if window else 0
        return cls(
            np.zeros(HIGH_BINS, np.int64) if high else None,
            np.zeros(HIGH_BINS, np.int64) if high and l1 else None,
            window,
            np.zeros((n, LOW_BINS), np.int64) if n else None,
            np.zeros((n, LOW_BINS), np.int64) if n and l1 else None,
        )

    def add(self, other: Histograms) -> None:
        for name in ("high_counts", "high_mass", "low_counts", "low_mass"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None:
                mine += theirs


class _KernelDeclined(Exception):
    """A chunk the fused kernel cannot count (a NaN/Inf): the statistics are recomputed on the torch path, which
    reports it (or counts it, with ``allow_nonfinite``)."""


def _significands(bits: torch.Tensor) -> torch.Tensor:
    """24-bit significands (int64) of non-negative fp32 bit patterns: the value is ``s · 2^(max(e, 1) − 150)``."""
    exponent_bits = bits >> 23
    return ((bits & 0x7FFFFF) | torch.where(exponent_bits > 0, 1 << 23, 0)).long()


def _torch_histograms(base: torch.Tensor, model: torch.Tensor, into: Histograms) -> None:
    """Add the histograms of ``|model − base|`` (fp32) to ``into`` (the torch path; the kernels' reference)."""
    bits = torch.sub(model, base).abs_().reshape(-1).view(torch.int32)
    high = (bits >> 16).long()
    l1 = into.high_mass is not None or into.low_mass is not None
    sig = _significands(bits) if l1 else None
    if into.high_counts is not None:
        into.high_counts += torch.bincount(high, minlength=HIGH_BINS).numpy()
        if into.high_mass is not None:
            assert sig is not None
            into.high_mass += torch.zeros(HIGH_BINS, dtype=torch.int64).index_add_(0, high, sig).numpy()
    if into.window is not None and into.low_counts is not None:
        lo, count = into.window
        sel = (high >= lo) & (high < lo + count)
        index = (high[sel] - lo) * LOW_BINS + (bits[sel] & 0xFFFF).long()
        into.low_counts += torch.bincount(index, minlength=count * LOW_BINS).numpy().reshape(count, LOW_BINS)
        if into.low_mass is not None:
            assert sig is not None
            mass = torch.zeros(count * LOW_BINS, dtype=torch.int64).index_add_(0, index, sig[sel])
            into.low_mass += mass.numpy().reshape(count, LOW_BINS)


def _histogram_pass(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None, high: bool,
                    windows: Sequence[Window | None], l1: bool, executor: ThreadPoolExecutor,
                    progress: Callable[[Iterable], Iterable]) -> list[Histograms]:
    """One streamed read of every chunk, adding each model's histograms into per-thread arrays, then summed.
    ``read_stored`` (the checkpoints' dtype) feeds the fused kernel; without it ``read`` (fp32) feeds torch."""
    local = threading.local()
    lock = threading.Lock()
    per_thread: list[list[Histograms]] = []

    def run(job: int) -> None:
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = [Histograms.zeros(high, w, l1) for w in windows]
            with lock:
                per_thread.append(acc)
        if read_stored is not None:
            base, models = read_stored(job)
            if not kernels.supports(base, models):
                raise _KernelDeclined
            for h, m in zip(acc, models, strict=True):
                if not kernels.add_histograms(base, m, h.high_counts, h.high_mass, h.window, h.low_counts,
                                              h.low_mass):
                    raise _KernelDeclined
            return
        base, models = read(job)
        for h, m in zip(acc, models, strict=True):
            _torch_histograms(base, m, h)

    for _ in progress(executor.map(run, jobs)):
        pass
    total = [Histograms.zeros(high, w, l1) for w in windows]
    for acc in per_thread:
        for t, h in zip(total, acc, strict=True):
            t.add(h)
    return total


def _select(counts: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the ``k``-th largest entry (counting from the top) and the rank ``r`` inside it."""
    above = np.cumsum(counts[::-1])[::-1] - counts  # entries in strictly higher bins
    b = int(np.nonzero((above < k) & (above + counts >= k))[0][-1])
    return b, k - int(above[b])


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _bin_scale(high_bins: np.ndarray) -> np.ndarray:
    """``2^(max(e, 1) − 150)`` of each high bin (exponent ``e = bin >> 7``); NaN/Inf bins (e = 255) are infinite."""
    exponent = np.maximum(high_bins >> 7, 1)
    return np.where(exponent == 255, np.inf, np.ldexp(1.0, (exponent - 150).astype(np.int32)))


def _mass(significands: np.ndarray, scale: np.ndarray | float) -> float:
    """Σ over bins of ``S · scale`` in float64 (bins without entries contribute nothing, even at scale ∞)."""
    with np.errstate(invalid="ignore"):  # 0 · ∞ of empty NaN/Inf bins, masked below
        values = significands.astype(np.float64) * scale
    return float(np.where(significands > 0, values, 0.0).sum())


def _predicted_windows(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None,
                       densities: Sequence[float], executor: ThreadPoolExecutor) -> list[Window | None]:
    """Each partially trimmed model's threshold bin as the high histograms of every :data:`SAMPLE_EVERY`-th chunk
    predict it, widened by :data:`WINDOW` bins on each side (None for the others, or for all when there are too few
    chunks to sample)."""
    sample = list(jobs)[::SAMPLE_EVERY]
    if len(sample) < MIN_SAMPLED_CHUNKS or all(d >= 1.0 for d in densities):
        return [None] * len(densities)
    hists = _histogram_pass(sample, read, read_stored, True, [None] * len(densities), False, executor, iter)
    windows: list[Window | None] = []
    for h, density in zip(hists, densities, strict=True):
        assert h.high_counts is not None
        n = int(h.high_counts.sum())
        k = kept_count(n, density)
        if k == 0 or k >= n:
            windows.append(None)
            continue
        b, _ = _select(h.high_counts, k)
        lo = max(0, b - WINDOW)
        windows.append((lo, min(HIGH_BINS, b + WINDOW + 1) - lo))
    return windows


def global_thresholds(jobs: Sequence[int], read: ChunkReader, densities: Sequence[float], *,
                      executor: ThreadPoolExecutor, progress: Callable[[Iterable], Iterable] = iter,
                      l1: bool = True, read_stored: ChunkReader | None = None) -> GlobalStats:
    """Exact global thresholds of each model over every chunk ``read(job)`` returns (base, models, fp32); with
    ``l1`` also the L1 mass below the threshold and in total. With ``read_stored`` (the chunk in the checkpoints'
    dtype) the histograms come from the fused kernel — the same integers; a chunk it declines (a NaN/Inf) sends the
    whole computation to the torch path, where ``read`` reports it."""
    if read_stored is not None:
        try:
            return _global_thresholds(jobs, read, read_stored, densities, executor, progress, l1)
        except _KernelDeclined:
            pass
    return _global_thresholds(jobs, read, None, densities, executor, progress, l1)


def _global_thresholds(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None,
                       densities: Sequence[float], executor: ThreadPoolExecutor,
                       progress: Callable[[Iterable], Iterable], l1: bool) -> GlobalStats:
    n_models = len(densities)
    windows = _predicted_windows(jobs, read, read_stored, densities, executor)
    first = _histogram_pass(jobs, read, read_stored, True, windows, l1, executor, progress)
    high_c = [h.high_counts for h in first]
    totals = [int(c.sum()) for c in high_c]  # type: ignore[union-attr]
    ks = [kept_count(n, d) for n, d in zip(totals, densities, strict=True)]

    # the bin of each partially trimmed model, and its low histograms: from the window, else from a second pass
    bins: list[int | None] = [None] * n_models
    ranks = [0] * n_models
    low: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * n_models
    missing: list[Window | None] = [None] * n_models
    for t, h in enumerate(first):
        if ks[t] == 0 or ks[t] >= totals[t]:
            continue
        assert h.high_counts is not None
        bins[t], ranks[t] = _select(h.high_counts, ks[t])
        b = bins[t]
        if h.window is not None and h.window[0] <= b < h.window[0] + h.window[1]:
            assert h.low_counts is not None
            row = b - h.window[0]
            low[t] = (h.low_counts[row], None if h.low_mass is None else h.low_mass[row])
        else:
            missing[t] = (b, 1)
    if any(w is not None for w in missing):
        second = _histogram_pass(jobs, read, read_stored, False, missing, l1, executor, progress)
        for t, h in enumerate(second):
            if missing[t] is not None:
                assert h.low_counts is not None
                low[t] = (h.low_counts[0], None if h.low_mass is None else h.low_mass[0])

    scale = _bin_scale(np.arange(HIGH_BINS))
    thresholds, removed, total_l1, kept = [], [], [], []
    for t, h in enumerate(first):
        total_l1.append(_mass(h.high_mass, scale) if h.high_mass is not None else 0.0)
        b = bins[t]
        if b is None:
            everything = ks[t] >= totals[t]
            thresholds.append(0.0 if everything else math.inf)
            removed.append(0.0 if everything else total_l1[t])
            kept.append(totals[t] if everything else 0)
            continue
        low_c, low_m = low[t]  # type: ignore[misc]
        position, _ = _select(low_c, ranks[t])
        thresholds.append(_bits_to_float((b << 16) | position))
        if h.high_mass is not None and low_m is not None:
            removed.append(_mass(h.high_mass[:b], scale[:b]) + _mass(low_m[:position], float(scale[b])))
        kept.append(int(high_c[t][b + 1:].sum()) + int(low_c[position:].sum()))  # type: ignore[index]
    if not l1:
        return GlobalStats(tuple(thresholds), (), (), tuple(kept), tuple(totals))
    return GlobalStats(tuple(thresholds), tuple(removed), tuple(total_l1), tuple(kept), tuple(totals))
