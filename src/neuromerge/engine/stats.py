"""Statistics pass: exact *global* per-model top-k thresholds without concatenating a model.

The magnitude ``|τ|`` of an fp32 value is a non-negative float whose IEEE-754 bit pattern (its *key*), read as an
int32, is monotone in the value. A two-level radix select finds the ``k``-th largest magnitude exactly:

1. a streamed pass builds, per model, a 2¹⁵-bin histogram of the high 16 bits; the bin holding the ``k``-th
   largest entry follows from cumulative counts;
2. the low 16 bits of the entries in that bin (2¹⁶ bins) pin the threshold down to the exact float.

That is two reads of every chunk and a histogram update per entry. When a model's trim is partial (and there are
enough chunks), the high histograms of every :data:`SAMPLE_EVERY`-th chunk first predict its threshold bin, and one
*window* pass replaces both: it counts by their low bits only the entries of a few high bins around the prediction
(those the sample's ranks ``k`` ± a margin fall into, see :func:`_window`), and the entries above them with a
vectorized comparison. When the ``k``-th largest entry lies inside the window (the usual case) that is the exact
answer after one read; otherwise the two passes run after all (three reads). The prediction only decides how many
reads it takes, never the result.

**L1 mass** (NeuroMerging's σ) is kept exactly, as integers: a significand sum ``S`` in the exponent slot ``s``
stands for ``S · 2^(max(s, 1) − 150)``, and an entry is its 24-bit significand in the slot of its exponent. The
high histograms sum the significands per bin (all entries of a bin share the exponent); the window pass sums the
entries below and above the window per block, exactly, in int64 (``nm_abs_window``), and the window's own entries
have the mass count · value. Integer sums do not depend on the order of the additions, so every histogram is added
into per-thread arrays (no per-chunk histograms are allocated, returned and summed), and a mass is the same number
for any number of threads, any chunking, either number of reads, and with or without the fused kernels
(:mod:`neuromerge.kernels`; the torch path is the fallback and the reference). It is rounded to float64 once, at
the end, from the exact integer (:func:`_exponent_mass`).

Memory is a few histograms per model and thread, whatever the model size. Entries ``>=`` the threshold are kept
(ties kept), ``k = floor(density · N)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from .. import kernels
from ..kernels import EXPONENT_SLOTS, HIGH_BINS, LOW_BINS
from ..methods import GlobalStats
from ..tensors.selection import kept_count

#: every SAMPLE_EVERY-th chunk predicts the threshold bins (when there are at least MIN_SAMPLED_CHUNKS such chunks)
SAMPLE_EVERY = 8
MIN_SAMPLED_CHUNKS = 4
#: the window covers the sample's ranks k ± max(RANK_SIGMAS · √k, RANK_SPREAD · k) (k: the sample's kept count;
#: sampling noise, and chunks that are not alike), plus WINDOW_PAD high bins on either side, at most MAX_WINDOW bins
RANK_SIGMAS = 4.0
RANK_SPREAD = 0.02
WINDOW_PAD = 1
MAX_WINDOW = 32

ChunkReader = Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]]
Job = TypeVar("Job")
#: (first high bin, number of bins) whose entries a pass counts by their low 16 bits
Window = tuple[int, int]
# EXPONENT_SLOTS (kernels): a significand sum ``S`` in slot ``s`` of an exact L1 mass stands for
# ``S · 2^(max(s, 1) − 150)`` (an entry is its 24-bit significand in the slot of its exponent; slot 255 holds NaN/Inf)


@dataclass
class Histograms:
    """One model's histograms of ``|τ|`` in one pass, of one of two kinds. *High*: ``high_counts`` by the high 16
    bits and ``high_mass`` the int64 sums of the 24-bit significands per bin. *Window* (a ``window`` of high bins):
    ``low_counts`` the entries in it by their low 16 bits (rows of ``(count, 2¹⁶)``; their mass is count · value),
    ``counts`` = (entries above the window, all entries) and ``mass`` the exact L1 masses of the entries below /
    above the window by exponent slot ``(2, 256)``. The masses are None without L1 mass; with neither kind, the
    model is not counted in this pass."""

    high_counts: np.ndarray | None = None
    high_mass: np.ndarray | None = None
    window: Window | None = None
    low_counts: np.ndarray | None = None
    counts: np.ndarray | None = None
    mass: np.ndarray | None = None

    @classmethod
    def zeros(cls, high: bool, window: Window | None, l1: bool) -> Histograms:
        assert not (high and window), "a pass counts a model by high bins or by a window, not both"
        if window is not None:
            return cls(window=window, low_counts=np.zeros((window[1], LOW_BINS), np.int64),
                       counts=np.zeros(2, np.int64), mass=np.zeros((2, EXPONENT_SLOTS), np.int64) if l1 else None)
        if high:
            return cls(np.zeros(HIGH_BINS, np.int64), np.zeros(HIGH_BINS, np.int64) if l1 else None)
        return cls()

    def drop_zeros(self, count: int) -> None:
        """Remove ``count`` entries ``|τ| = 0`` (key 0: high bin 0, low bin 0) from the histograms: the zero task
        vectors of tensors no model changes, which are not part of the trim's population. Their mass is 0."""
        if count == 0:
            return
        if self.high_counts is not None:
            self.high_counts[0] -= count
        if self.window is not None:
            assert self.counts is not None and self.low_counts is not None
            self.counts[1] -= count
            if self.window[0] == 0:
                self.low_counts[0, 0] -= count

    def add(self, other: Histograms) -> None:
        for name in ("high_counts", "high_mass", "low_counts", "counts", "mass"):
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


def _sums(index: torch.Tensor, values: torch.Tensor, size: int) -> np.ndarray:
    """Exact int64 sums of ``values`` per ``index`` (``size`` bins)."""
    return torch.zeros(size, dtype=torch.int64).index_add_(0, index, values).numpy()


def _torch_histograms(base: torch.Tensor, model: torch.Tensor, into: Histograms) -> None:
    """Add the histograms of ``|model − base|`` (fp32) to ``into`` (the torch path; the kernels' reference)."""
    bits = torch.sub(model, base).abs_().reshape(-1).view(torch.int32)
    if into.window is not None:
        assert into.low_counts is not None and into.counts is not None
        lo, count = into.window
        offset = bits.long() - (lo << 16)
        inside = (offset >= 0) & (offset < count * LOW_BINS)
        above = offset >= count * LOW_BINS
        into.low_counts += torch.bincount(offset[inside], minlength=count * LOW_BINS).numpy().reshape(count, -1)
        into.counts += (int(above.sum()), bits.numel())
        if into.mass is not None:
            outside = ~inside
            slot = above[outside].long() * EXPONENT_SLOTS + (bits[outside] >> 23).clamp(min=1).long()
            into.mass += _sums(slot, _significands(bits[outside]), 2 * EXPONENT_SLOTS).reshape(2, -1)
    elif into.high_counts is not None:
        high = (bits >> 16).long()
        into.high_counts += torch.bincount(high, minlength=HIGH_BINS).numpy()
        if into.high_mass is not None:
            into.high_mass += _sums(high, _significands(bits), HIGH_BINS)


def _kernel_histograms(base: torch.Tensor, model: torch.Tensor, into: Histograms) -> bool:
    """Add the histograms with the fused kernels; False when an input holds NaN/Inf."""
    if into.window is not None:
        assert into.low_counts is not None and into.counts is not None
        return kernels.add_window_histograms(base, model, into.window, into.low_counts, into.counts, into.mass)
    if into.high_counts is not None:
        return kernels.add_high_histograms(base, model, into.high_counts, into.high_mass)
    return True


def _histogram_pass(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None, high: Sequence[bool],
                    windows: Sequence[Window | None], l1: bool, executor: ThreadPoolExecutor,
                    progress: Callable[[Iterable], Iterable]) -> list[Histograms]:
    """One streamed read of every chunk, adding each model's histograms (see :meth:`Histograms.zeros`) into
    per-thread arrays, then summed. ``read_stored`` (the checkpoints' dtype) feeds the fused kernel; without it
    ``read`` (fp32) feeds torch."""
    local = threading.local()
    lock = threading.Lock()
    per_thread: list[list[Histograms]] = []

    def fresh() -> list[Histograms]:
        return [Histograms.zeros(h, w, l1) for h, w in zip(high, windows, strict=True)]

    def run(job: int) -> None:
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = fresh()
            with lock:
                per_thread.append(acc)
        if read_stored is not None:
            base, models = read_stored(job)
            if not kernels.supports(base, models):
                raise _KernelDeclined
            for h, m in zip(acc, models, strict=True):
                if not _kernel_histograms(base, m, h):
                    raise _KernelDeclined
            return
        base, models = read(job)
        for h, m in zip(acc, models, strict=True):
            _torch_histograms(base, m, h)

    for _ in progress(executor.map(run, jobs)):
        pass
    total = fresh()
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


def _exponent_mass(slots: np.ndarray) -> float:
    """The L1 mass ``Σ_s S_s · 2^(max(s, 1) − 150)`` of exponent-slot significand sums ``S`` (int64), added exactly
    (as an integer) and rounded once to float64: equal sums in any distribution over the slots give the same float.
    Infinite when slot 255 (NaN/Inf entries) holds any."""
    if slots[255] > 0:
        return math.inf
    exact = sum(int(v) << (max(e, 1) - 1) for e, v in enumerate(slots.tolist()) if v)  # units of 2^-149
    return math.ldexp(float(exact), -149)


def _window_mass(window: Window, low_counts: np.ndarray, stop: int | None = None) -> np.ndarray:
    """Exponent-slot significand sums of the window's entries (those of its first ``stop`` keys): each row is one
    high bin, whose entries share an exponent; an entry's significand follows from its key."""
    lo, count = window
    slots = np.zeros(EXPONENT_SLOTS, np.int64)
    for row in range(count):
        n = LOW_BINS if stop is None else max(0, min(LOW_BINS, stop - row * LOW_BINS))
        if n == 0:
            continue
        high = lo + row
        implicit = 1 << 23 if high >> 7 > 0 else 0
        significand = ((high & 0x7F) << 16 | np.arange(n, dtype=np.int64)) | implicit
        slots[max(high >> 7, 1)] += int(low_counts[row, :n] @ significand)
    return slots


def _window(counts: np.ndarray, density: float) -> Window | None:
    """The high bins where a sample's histogram ``counts`` places the ``k``-th largest entry of the whole: those of
    the sample's ranks ``k ± max(RANK_SIGMAS · √k, RANK_SPREAD · k)``, padded by :data:`WINDOW_PAD` bins, at most
    :data:`MAX_WINDOW` bins around the sample's own bin. None when the trim keeps everything or nothing."""
    n = int(counts.sum())
    k = kept_count(n, density)
    if k == 0 or k >= n:
        return None
    margin = math.ceil(max(RANK_SIGMAS * math.sqrt(k), RANK_SPREAD * k))
    top, _ = _select(counts, max(1, k - margin))
    bottom, _ = _select(counts, min(n, k + margin))
    b, _ = _select(counts, k)
    lo = max(0, bottom - WINDOW_PAD, b - MAX_WINDOW // 2)
    hi = min(HIGH_BINS, top + WINDOW_PAD + 1, lo + MAX_WINDOW)
    return lo, hi - lo


def _predicted_windows(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None,
                       densities: Sequence[float], executor: ThreadPoolExecutor,
                       zeros: Callable[[Sequence[int]], int] | None = None) -> list[Window | None]:
    """Each partially trimmed model's window (:func:`_window`) as the high histograms of every
    :data:`SAMPLE_EVERY`-th chunk predict it (None for the others, or for all when there are too few chunks to
    sample). ``zeros(sample)``: the entries of sampled chunks where no model differs from the base, left out of the
    prediction as they are left out of the population (a chunk stands for its tensor here: a prediction only)."""
    sample = list(jobs)[::SAMPLE_EVERY]
    if len(sample) < MIN_SAMPLED_CHUNKS or all(d >= 1.0 for d in densities):
        return [None] * len(densities)
    n_models = len(densities)
    hists = _histogram_pass(sample, read, read_stored, [True] * n_models, [None] * n_models, False, executor, iter)
    unchanged = zeros(sample) if zeros is not None else 0
    windows = []
    for h, density in zip(hists, densities, strict=True):
        assert h.high_counts is not None
        h.drop_zeros(unchanged)
        windows.append(_window(h.high_counts, density))
    return windows


@dataclass
class _Selection:
    """A model's exact statistics as integers: the threshold's key (None: keep everything or nothing), the kept
    count of its ``entries``, and the exponent-slot significand sums of the entries below the threshold and of all
    entries."""

    key: int | None
    kept: int
    entries: int
    below: np.ndarray
    total: np.ndarray

    @classmethod
    def whole(cls, k: int, n: int, total: np.ndarray) -> _Selection | None:
        """A trim of ``k`` of ``n`` entries that keeps everything or nothing (no threshold to find), else None."""
        if 0 < k < n:
            return None
        everything = k >= n
        return cls(None, n if everything else 0, n, np.zeros(EXPONENT_SLOTS, np.int64) if everything else total, total)


def _from_high(h: Histograms, k: int, low_counts: np.ndarray | None) -> _Selection:
    """Statistics from high histograms and, for a partial trim, the low counts of the threshold's bin."""
    assert h.high_counts is not None
    n = int(h.high_counts.sum())
    mass = h.high_mass if h.high_mass is not None else np.zeros(HIGH_BINS, np.int64)
    by_exponent = mass.reshape(EXPONENT_SLOTS, -1)
    total = by_exponent.sum(axis=1)
    whole = _Selection.whole(k, n, total)
    if whole is not None:
        return whole
    assert low_counts is not None
    b, rank = _select(h.high_counts, k)
    position, _ = _select(low_counts, rank)
    lower_bins = by_exponent.copy()
    lower_bins.reshape(-1)[b:] = 0
    below = lower_bins.sum(axis=1)
    if h.high_mass is not None:
        below += _window_mass((b, 1), low_counts[None], position)
    kept = int(h.high_counts[b + 1:].sum()) + int(low_counts[position:].sum())
    return _Selection((b << 16) | position, kept, n, below, total)


def _from_window(h: Histograms, k: int) -> _Selection | None:
    """Statistics from a window pass; None when the ``k``-th largest entry lies outside the window."""
    assert h.window is not None and h.low_counts is not None and h.counts is not None
    above, n = int(h.counts[0]), int(h.counts[1])
    mass = h.mass if h.mass is not None else np.zeros((2, EXPONENT_SLOTS), np.int64)
    total = mass[0] + mass[1] + (_window_mass(h.window, h.low_counts) if h.mass is not None else 0)
    whole = _Selection.whole(k, n, total)
    if whole is not None:
        return whole
    inside = h.low_counts.reshape(-1)
    if not above < k <= above + int(inside.sum()):
        return None
    position, _ = _select(inside, k - above)
    below = mass[0] + (_window_mass(h.window, h.low_counts, position) if h.mass is not None else 0)
    return _Selection((h.window[0] << 16) + position, above + int(inside[position:].sum()), n, below, total)


class _Unchanged:
    """Which chunks read so far hold no change at all (every model equals the base there), and how many entries
    they have: the readers of a pass are wrapped to record it (once per job, on the chunk as read). A tensor
    (``group``) is *unchanged* when all its chunks are: its task vectors are exactly zero in every model, so it
    cannot change the merge, and its entries are left out of the global trim's population."""

    def __init__(self, group_of: Callable[[int], Hashable]):
        self.group_of = group_of
        self.chunks: dict[int, tuple[bool, int]] = {}  # job → (no model differs from the base, entries)

    def watch(self, reader: ChunkReader) -> ChunkReader:
        def read(job: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
            base, models = reader(job)
            if job not in self.chunks:
                self.chunks[job] = (all(_equal(base, m) for m in models), base.numel())
            return base, models

        return read

    def sampled(self, jobs: Sequence[int]) -> int:
        """Entries of the unchanged chunks among ``jobs`` (for the window prediction)."""
        return sum(n for j in jobs for same, n in [self.chunks[j]] if same)

    def tensors(self, jobs: Sequence[int]) -> tuple[int, int]:
        """(entries, tensors) of the unchanged tensors, once every job of ``jobs`` was read."""
        changed: dict[Hashable, bool] = {}
        entries: dict[Hashable, int] = {}
        for job in jobs:
            same, n = self.chunks[job]
            g = self.group_of(job)
            changed[g] = changed.get(g, False) or not same
            entries[g] = entries.get(g, 0) + n
        unchanged = [g for g, c in changed.items() if not c]
        return sum(entries[g] for g in unchanged), len(unchanged)


#: integer dtypes of each item size, to compare floating tensors bit for bit
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: entries compared first: a changed chunk almost always differs among them, so it costs next to nothing
_HEAD = 64


def _equal(base: torch.Tensor, model: torch.Tensor) -> bool:
    """Whether ``model`` equals ``base`` entry for entry, so that ``model − base`` is exactly zero: bit for bit when
    the dtypes agree (a ``−0`` against a ``+0`` counts as a change: the tensor then merely stays in the
    population), by value in fp32 otherwise (a LoRA view's fp32 rows over a bf16 base)."""
    if base.shape != model.shape:
        return False
    a, b = base.reshape(-1), model.reshape(-1)
    if a.device.type != "cpu":
        return torch.equal(a.float(), b.float()) if a.dtype != b.dtype else torch.equal(a, b)
    if a.dtype != b.dtype:
        return (torch.equal(a[:_HEAD].float(), b[:_HEAD].float())
                and bool(np.array_equal(a.float().numpy(), b.float().numpy())))
    if a.element_size() not in _BITS:
        return torch.equal(a, b)
    bits = _BITS[a.element_size()]
    a, b = a.view(bits), b.view(bits)
    return torch.equal(a[:_HEAD], b[:_HEAD]) and bool(np.array_equal(a.numpy(), b.numpy()))


def global_thresholds(jobs: Sequence[int], read: ChunkReader, densities: Sequence[float], *,
                      executor: ThreadPoolExecutor, progress: Callable[[Iterable], Iterable] = iter,
                      l1: bool = True, read_stored: ChunkReader | None = None,
                      group_of: Callable[[int], Hashable] | None = None) -> GlobalStats:
    """Exact global thresholds of each model over every chunk ``read(job)`` returns (base, models, fp32); with
    ``l1`` also the L1 mass below the threshold and in total. With ``read_stored`` (the chunk in the checkpoints'
    dtype) the histograms come from the fused kernel — the same integers; a chunk it declines (a NaN/Inf) sends the
    whole computation to the torch path, where ``read`` reports it.

    ``group_of(job)`` names the tensor a chunk belongs to. With it, the population of the trim is the entries of
    the tensors some model changes: a tensor whose task vectors are exactly zero in every model (an unadapted
    module of a LoRA pool, a frozen layer) does not count, so ``k = ⌊density · N⌋`` with ``N`` the entries that can
    change (``GlobalStats.total``; the left-out ones in ``unchanged_entries``). Without it, every entry counts."""
    if read_stored is not None:
        try:
            return _global_thresholds(jobs, read, read_stored, densities, executor, progress, l1, group_of)
        except _KernelDeclined:
            pass
    return _global_thresholds(jobs, read, None, densities, executor, progress, l1, group_of)


def _global_thresholds(jobs: Sequence[int], read: ChunkReader, read_stored: ChunkReader | None,
                       densities: Sequence[float], executor: ThreadPoolExecutor,
                       progress: Callable[[Iterable], Iterable], l1: bool,
                       group_of: Callable[[int], Hashable] | None = None) -> GlobalStats:
    n_models = len(densities)
    watch = _Unchanged(group_of) if group_of is not None else None
    if watch is not None:
        read = watch.watch(read)
        read_stored = watch.watch(read_stored) if read_stored is not None else None
    windows = _predicted_windows(jobs, read, read_stored, densities, executor,
                                 zeros=watch.sampled if watch is not None else None)
    high = [w is None for w in windows]
    first = _histogram_pass(jobs, read, read_stored, high, windows, l1, executor, progress)
    unchanged, unchanged_tensors = watch.tensors(jobs) if watch is not None else (0, 0)
    for h in first:
        h.drop_zeros(unchanged)
    selections: list[_Selection | None] = [None] * n_models
    for t, h in enumerate(first):
        if not high[t]:
            assert h.counts is not None
            selections[t] = _from_window(h, kept_count(int(h.counts[1]), densities[t]))
    misses = [not high[t] and selections[t] is None for t in range(n_models)]
    if any(misses):  # the window missed: the high histograms after all
        again = _histogram_pass(jobs, read, read_stored, misses, [None] * n_models, l1, executor, progress)
        for t in range(n_models):
            if misses[t]:
                again[t].drop_zeros(unchanged)
                first[t], high[t] = again[t], True

    # the low counts of each partially trimmed model's bin, from one more pass
    ns = [int(h.high_counts.sum()) if h.high_counts is not None else 0 for h in first]
    ks = [kept_count(n, d) for n, d in zip(ns, densities, strict=True)]
    rows: list[Window | None] = [None] * n_models
    for t, h in enumerate(first):
        if high[t] and 0 < ks[t] < ns[t]:
            assert h.high_counts is not None
            rows[t] = (_select(h.high_counts, ks[t])[0], 1)
    second: list[Histograms] = []
    if any(r is not None for r in rows):  # the bins' masses follow from their counts: no L1 arrays
        second = _histogram_pass(jobs, read, read_stored, [False] * n_models, rows, False, executor, progress)
        for h in second:
            h.drop_zeros(unchanged)
    for t, h in enumerate(first):
        if high[t]:
            low = second[t].low_counts if rows[t] is not None else None
            selections[t] = _from_high(h, ks[t], None if low is None else low[0])

    done = [sel for sel in selections if sel is not None]
    assert len(done) == n_models
    thresholds = tuple(
        (0.0 if sel.kept == sel.entries else math.inf) if sel.key is None else _bits_to_float(sel.key) for sel in done
    )
    kept, totals = tuple(sel.kept for sel in done), tuple(sel.entries for sel in done)
    if not l1:
        return GlobalStats(thresholds, (), (), kept, totals, unchanged, unchanged_tensors)
    return GlobalStats(thresholds, tuple(_exponent_mass(sel.below) for sel in done),
                       tuple(_exponent_mass(sel.total) for sel in done), kept, totals, unchanged, unchanged_tensors)


class TrimGroup(Protocol):
    """A global trim of some models over some tensors (:class:`~neuromerge.engine.plan.StatisticsGroup`)."""

    models: tuple[int, ...]
    densities: tuple[float, ...]
    tensors: frozenset[str]


@dataclass
class TrimStatistics:
    """The statistics pass's result: each group's :class:`GlobalStats` (its models in the group's order), and per
    tensor the :class:`GlobalStats` a method sees (one entry per model, each from the group holding that model's
    trim of the tensor)."""

    groups: list[tuple[TrimGroup, GlobalStats]]
    n_models: int

    def __post_init__(self) -> None:
        self._assembled: dict[tuple[int, ...], GlobalStats] = {}

    def for_tensor(self, name: str) -> GlobalStats | None:
        """The statistics of tensor ``name``; with one group of every model, that group's (for every tensor, as
        the method decides per tensor whether it trims globally); None for a tensor outside every group otherwise."""
        if len(self.groups) == 1 and len(self.groups[0][0].models) == self.n_models:
            return self.groups[0][1]
        where: list[tuple[int, int]] = []  # per model: (group index, position in the group)
        for t in range(self.n_models):
            found = next(((g, g_spec.models.index(t)) for g, (g_spec, _) in enumerate(self.groups)
                          if t in g_spec.models and name in g_spec.tensors), None)
            if found is None:
                return None
            where.append(found)
        key = tuple(g for g, _ in where)
        if key not in self._assembled:
            parts = [(self.groups[g][1], i) for g, i in where]
            l1 = all(s.total_l1 for s, _ in parts)
            self._assembled[key] = GlobalStats(
                thresholds=tuple(s.thresholds[i] for s, i in parts),
                removed_l1=tuple(s.removed_l1[i] for s, i in parts) if l1 else (),
                total_l1=tuple(s.total_l1[i] for s, i in parts) if l1 else (),
                kept=tuple(s.kept[i] for s, i in parts), total=tuple(s.total[i] for s, i in parts),
                unchanged_entries=parts[0][0].unchanged_entries, unchanged_tensors=parts[0][0].unchanged_tensors)
        return self._assembled[key]


def trim_statistics(groups: Sequence[TrimGroup], jobs: Sequence[Job], tensor_of: Callable[[Job], str],
                    read: Callable[[Job], tuple[torch.Tensor, list[torch.Tensor]]], n_models: int, *,
                    executor: ThreadPoolExecutor, progress: Callable[[int], Callable[[Iterable], Iterable]],
                    l1: bool, read_stored: Callable[[Job], tuple[torch.Tensor, list[torch.Tensor]]] | None = None
                    ) -> TrimStatistics:
    """:func:`global_thresholds` of each group over the chunks (``jobs``) of its tensors, reading only its models.
    ``progress(n)`` wraps the iteration over a group's ``n`` chunks."""
    done: list[tuple[TrimGroup, GlobalStats]] = []
    for group in groups:
        sel = [j for j in jobs if tensor_of(j) in group.tensors]
        models = list(group.models)

        def only(reader: Callable[[Job], tuple[torch.Tensor, list[torch.Tensor]]], sel: list[Job] = sel,
                 models: list[int] = models) -> ChunkReader:
            def chunk(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
                base, ms = reader(sel[i])
                return base, ms if len(models) == len(ms) else [ms[t] for t in models]
            return chunk

        stats = global_thresholds(range(len(sel)), only(read), list(group.densities), executor=executor,
                                  progress=progress(len(sel)), l1=l1,
                                  read_stored=only(read_stored) if read_stored is not None else None,
                                  group_of=lambda i, sel=sel: tensor_of(sel[i]))
        done.append((group, stats))
    return TrimStatistics(done, n_models)
