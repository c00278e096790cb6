"""Statistics pass: exact *global* per-model top-k thresholds without concatenating a model.

The magnitude ``|τ|`` of an fp32 value is a non-negative float whose IEEE-754 bit pattern, read as an int32, is
monotone in the value. A two-level radix select finds the ``k``-th largest magnitude exactly:

1. one streamed pass builds, per model, a 2¹⁵-bin histogram of the high 16 bits (count and float64 L1 mass);
   the bin holding the ``k``-th largest entry follows from cumulative counts;
2. a second streamed pass histograms the low 16 bits of the entries that fall in that bin, which pins the
   threshold down to the exact float.

With the fused kernels (:mod:`neuromerge.kernels`) and no L1 mass asked for (TIES), the high histograms of every
:data:`SAMPLE_EVERY`-th chunk first predict each model's threshold bin; the full first pass then also counts the low
bits of the :data:`WINDOW` bins on either side of it, into per-thread arrays. When the true bin is inside the window
(the usual case) the second full read is skipped; otherwise it runs. The result does not depend on the prediction.

Memory is a few histograms per model, whatever the model size. Per-tensor histograms are summed in a fixed
(tensor, chunk) order, so the float64 L1 sums — and thus ``σ`` of NeuroMerging's λ2 rule — do not depend on the
number of threads. Entries ``>=`` the threshold are kept (ties kept), ``k = floor(density · N)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import kernels
from ..methods import GlobalStats
from ..tensors.selection import kept_count

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
#: entries per weighted (L1 mass) histogram call
MASS_PIECE = 1 << 20

ChunkReader = Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]]
Histogram = tuple[np.ndarray, np.ndarray | None]
#: (first high bin, number of bins) whose low histograms the first pass also builds
Window = tuple[int, int]
#: every SAMPLE_EVERY-th chunk predicts the threshold bins (when there are at least MIN_SAMPLED_CHUNKS such chunks)
SAMPLE_EVERY = 8
MIN_SAMPLED_CHUNKS = 4
#: high bins on each side of the predicted one whose low histograms the first pass builds
WINDOW = 2


def _abs_bits(base: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mag = torch.sub(model, base).abs_().reshape(-1)
    return mag, mag.view(torch.int32)


def _mass_histogram(index: torch.Tensor, mag: torch.Tensor, bins: int) -> np.ndarray:
    """``Σ mag`` per bin of ``index`` in float64, over pieces of :data:`MASS_PIECE` entries added in order (a
    float64 copy of a whole 4M-entry chunk is a 32 MiB allocation that glibc serves by a fresh ``mmap``: the
    page faults cost 3× the histogram)."""
    total = np.zeros(bins, np.float64)
    for start in range(0, index.numel(), MASS_PIECE):
        stop = start + MASS_PIECE
        total += torch.bincount(index[start:stop], weights=mag[start:stop].double(), minlength=bins).cpu().numpy()
    return total


def _high_histograms(base: torch.Tensor, models: Sequence[torch.Tensor], l1: bool
                     ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for m in models:
        mag, bits = _abs_bits(base, m)
        high = bits >> 16
        counts = torch.bincount(high, minlength=HIGH_BINS).cpu().numpy()
        sums = _mass_histogram(high, mag, HIGH_BINS) if l1 else None
        out.append((counts, sums))
    return out


def _low_histograms(base: torch.Tensor, models: Sequence[torch.Tensor], bins: Sequence[int | None], l1: bool
                    ) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
    out: list[tuple[np.ndarray, np.ndarray | None] | None] = []
    for m, b in zip(models, bins, strict=True):
        if b is None:
            out.append(None)
            continue
        mag, bits = _abs_bits(base, m)
        sel = (bits >> 16) == b
        low = bits[sel] & 0xFFFF
        counts = torch.bincount(low, minlength=LOW_BINS).cpu().numpy()
        sums = _mass_histogram(low, mag[sel], LOW_BINS) if l1 else None
        out.append((counts, sums))
    return out


def _stored_histograms(base: torch.Tensor, models: Sequence[torch.Tensor], bins: Sequence[int | None] | None,
                       l1: bool) -> list[Histogram | None] | None:
    """The high (``bins`` None) or low histograms by the fused kernel, from the checkpoints' dtype; None when the
    kernels cannot take these inputs or one holds NaN/Inf (then the fp32 path decides)."""
    if not kernels.supports(base, models):
        return None
    out: list[Histogram | None] = []
    for t, m in enumerate(models):
        b = None if bins is None else bins[t]
        if bins is not None and b is None:
            out.append(None)
            continue
        h = kernels.abs_histograms(base, m, high=bins is None, window=None if b is None else (b, 1), with_mass=l1,
                                   piece=MASS_PIECE)
        if h is None:
            return None
        high, low = h
        out.append(high if bins is None else (low[0][0], None if low[1] is None else low[1][0]))  # type: ignore[index]
    return out


class _KernelDeclined(Exception):
    """A chunk the fused kernel cannot count (NaN/Inf, or inputs it does not take): the counting pass is abandoned
    and the ordinary passes decide (and report a NaN/Inf as usual)."""


def _counting_pass(jobs: Sequence[int], read_stored: ChunkReader, windows: Sequence[Window | None],
                   executor: ThreadPoolExecutor, progress: Callable[[Iterable], Iterable]
                   ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """First pass without L1 mass: high-bit counts and the low-bit counts of each model's window, added by the fused
    kernel straight into per-thread arrays (integer counts: the order of the additions does not matter, so no
    per-chunk histograms are allocated, returned and summed)."""
    local = threading.local()
    lock = threading.Lock()
    per_thread: list[tuple[list[np.ndarray], list[np.ndarray | None]]] = []

    def count(job: int) -> None:
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = ([np.zeros(HIGH_BINS, np.int64) for _ in windows],
                               [None if w is None else np.zeros((w[1], LOW_BINS), np.int64) for w in windows])
            with lock:
                per_thread.append(acc)
        base, models = read_stored(job)
        if not kernels.supports(base, models):
            raise _KernelDeclined
        for t, m in enumerate(models):
            if not kernels.add_counts(base, m, acc[0][t], windows[t], acc[1][t]):
                raise _KernelDeclined

    for _ in progress(executor.map(count, jobs)):
        pass
    high = [sum((acc[0][t] for acc in per_thread), np.zeros(HIGH_BINS, np.int64)) for t in range(len(windows))]
    low: list[np.ndarray | None] = []
    for t, w in enumerate(windows):
        low.append(None if w is None else sum((acc[1][t] for acc in per_thread), np.zeros((w[1], LOW_BINS), np.int64)))
    return high, low


def _predicted_windows(jobs: Sequence[int], read_stored: ChunkReader, densities: Sequence[float],
                       executor: ThreadPoolExecutor) -> list[Window | None] | None:
    """Each model's threshold bin as predicted by the high histograms of every :data:`SAMPLE_EVERY`-th chunk, widened
    by :data:`WINDOW` bins on each side; None when there are too few chunks to sample or the kernel declines one."""
    sample = list(jobs)[::SAMPLE_EVERY]
    if len(sample) < MIN_SAMPLED_CHUNKS:
        return None
    counts = [np.zeros(HIGH_BINS, np.int64) for _ in densities]
    for hists in executor.map(lambda job: _stored_histograms(*read_stored(job), None, False), sample):
        if hists is None:
            return None
        for t, h in enumerate(hists):
            assert h is not None
            counts[t] += h[0]
    windows: list[Window | None] = []
    for c, density in zip(counts, densities, strict=True):
        n = int(c.sum())
        k = kept_count(n, density)
        if k == 0 or k >= n:
            windows.append(None)
            continue
        b, _ = _select(c, k)
        lo = max(0, b - WINDOW)
        windows.append((lo, min(HIGH_BINS, b + WINDOW + 1) - lo))
    return windows


def _select(counts: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the ``k``-th largest entry (counting from the top) and the rank ``r`` inside it."""
    above = np.cumsum(counts[::-1])[::-1] - counts  # entries in strictly higher bins
    b = int(np.nonzero((above < k) & (above + counts >= k))[0][-1])
    return b, k - int(above[b])


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def global_thresholds(jobs: Sequence[int], read: ChunkReader, densities: Sequence[float], *,
                      executor: ThreadPoolExecutor, progress: Callable[[Iterable], Iterable] = iter,
                      l1: bool = True, read_stored: ChunkReader | None = None) -> GlobalStats:
    """Exact global thresholds of each model over every chunk ``read(job)`` returns (base, models, fp32); with
    ``l1`` also the float64 L1 mass below the threshold and in total. With ``read_stored`` (the chunk in the
    checkpoints' dtype) the histograms come from the fused kernel, bitwise equal; ``read`` then serves only chunks
    the kernel declines (a NaN/Inf, which ``read`` reports)."""
    n_models = len(densities)
    high_c = [np.zeros(HIGH_BINS, np.int64) for _ in range(n_models)]
    high_s = [np.zeros(HIGH_BINS, np.float64) for _ in range(n_models)]
    windows = None
    win_c: list[np.ndarray | None] = [None] * n_models
    if read_stored is not None and not l1 and any(d < 1.0 for d in densities):
        windows = _predicted_windows(jobs, read_stored, densities, executor)
    if windows is not None:
        try:
            high_c, win_c = _counting_pass(jobs, read_stored, windows, executor, progress)  # type: ignore[arg-type]
        except _KernelDeclined:
            windows, win_c = None, [None] * n_models
            high_c = [np.zeros(HIGH_BINS, np.int64) for _ in range(n_models)]
    if windows is None:

        def pass1(job: int) -> list[Histogram]:
            if read_stored is not None:
                hists = _stored_histograms(*read_stored(job), None, l1)
                if hists is not None:
                    return hists  # type: ignore[return-value]
            base, models = read(job)
            return _high_histograms(base, models, l1)

        for hists in progress(executor.map(pass1, jobs)):
            for t, (c, s) in enumerate(hists):
                high_c[t] += c
                if s is not None:
                    high_s[t] += s

    totals = [int(c.sum()) for c in high_c]
    total_l1 = [float(s.sum()) for s in high_s]
    ks = [kept_count(n, d) for n, d in zip(totals, densities, strict=True)]
    bins: list[int | None] = []
    ranks: list[int] = []
    for t in range(n_models):
        if ks[t] == 0 or ks[t] >= totals[t]:
            bins.append(None)
            ranks.append(0)
        else:
            b, r = _select(high_c[t], ks[t])
            bins.append(b)
            ranks.append(r)

    low_c = [np.zeros(LOW_BINS, np.int64) for _ in range(n_models)]
    low_s = [np.zeros(LOW_BINS, np.float64) for _ in range(n_models)]
    missing = list(bins)  # bins whose low histogram the second pass must still build
    for t, b in enumerate(bins):
        window, counts = (windows[t] if windows else None), win_c[t]
        if b is not None and window is not None and counts is not None and window[0] <= b < window[0] + window[1]:
            low_c[t] = counts[b - window[0]]
            missing[t] = None
    if any(b is not None for b in missing):

        def pass2(job: int) -> list[Histogram | None]:
            if read_stored is not None:
                hists = _stored_histograms(*read_stored(job), missing, l1)
                if hists is not None:
                    return hists
            base, models = read(job)
            return _low_histograms(base, models, missing, l1)

        for hists in progress(executor.map(pass2, jobs)):
            for t, h in enumerate(hists):
                if h is not None:
                    low_c[t] += h[0]
                    if h[1] is not None:
                        low_s[t] += h[1]

    thresholds, removed, kept = [], [], []
    for t in range(n_models):
        b = bins[t]
        if b is None:
            everything = ks[t] >= totals[t]
            thresholds.append(0.0 if everything else math.inf)
            removed.append(0.0 if everything else total_l1[t])
            kept.append(totals[t] if everything else 0)
            continue
        low, _ = _select(low_c[t], ranks[t])
        thresholds.append(_bits_to_float((b << 16) | low))
        removed.append(float(high_s[t][:b].sum()) + float(low_s[t][:low].sum()))
        kept.append(int(high_c[t][b + 1:].sum()) + int(low_c[t][low:].sum()))
    if not l1:
        return GlobalStats(tuple(thresholds), (), (), tuple(kept), tuple(totals))
    return GlobalStats(tuple(thresholds), tuple(removed), tuple(total_l1), tuple(kept), tuple(totals))
