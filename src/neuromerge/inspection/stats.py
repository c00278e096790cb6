"""Streaming statistics of task vectors: small float64 sums per tensor, one row chunk at a time.

For a chunk of the base ``θ0`` and the experts ``θ_t`` (fp32, canonical layout: one neuron per row), with task
vectors ``τ_t = θ_t − θ0`` and trimmed entries ``m_t = [|τ_t| >= thr_t] ∧ [τ_t ≠ 0]`` (``thr_t`` the exact global
top-``density`` threshold of expert ``t``, :func:`neuromerge.engine.stats.global_thresholds`):

* ``gram[i, j] = Σ τ_i·τ_j`` (float64; pairwise cosines ``gram_ij / √(gram_ii·gram_jj)``), ``base_sq = Σ θ0²``;
* ``kept[t] = Σ m_t``; ``coverage[n] = #{coordinates with Σ_t m_t = n}`` (n = 0..T); ``overlap = #{coordinates
  with Σ_t m_t >= 2}``; ``conflicts = #{coordinates with Σ_t m_t >= 2 whose trimmed signs are not all equal}``
  (the sign disagreement TIES resolves, Yadav et al. 2023);
* for neuronal tensors (2-D canonical, docs/methods/spec.md §1.2), per row ``k`` the split of docs/methods/spec.md §1.3
  ``c_t^k = ⟨τ_t^k, w0^k⟩/‖w0^k‖²``, ``‖τ∥‖² = ⟨τ_t^k, w0^k⟩²/‖w0^k‖²`` (0 where ``w0^k = 0``):
  ``parallel[t] = Σ_k ‖τ∥,t^k‖²``, ``energy[t] = Σ_k ‖τ_t^k‖²``, the same two on the trimmed ``τ_t ⊙ m_t``
  (``parallel_trimmed``, ``energy_trimmed``: the vectors NeuroMerging actually splits), and a histogram over
  neurons of the per-neuron share ``‖τ∥,t^k‖²/‖τ_t^k‖²`` (:data:`BINS` equal bins on [0, 1]; rows with
  ``τ_t^k = 0`` are not counted).

Sums of a chunk are formed in float64 (the fp32 chunk is converted a block at a time, so dot products carry no
fp32 rounding), chunk results are added in
the plan's fixed (tensor, chunk) order, and torch runs single-threaded inside jobs: the numbers do not depend on
the thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..engine.plan import MergePlan, TensorPlan
from ..engine.reading import chunk_rows, read_all
from ..engine.stats import global_thresholds
from ..methods import GlobalStats

#: bins of the per-neuron parallel-share histogram over [0, 1]
BINS = 20
#: float64 conversion block (entries) for the Gram sums
BLOCK_ELEMENTS = 1 << 18
CPU = torch.device("cpu")


@dataclass
class Sums:
    """Additive float64 / integer sums over any set of coordinates (a chunk, a tensor, a block, a model)."""

    numel: int = 0
    tensors: int = 0
    base_sq: float = 0.0
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    overlap: int = 0
    conflicts: int = 0
    neurons: int = 0
    parallel: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    parallel_trimmed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energy_trimmed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    histogram: np.ndarray = field(default_factory=lambda: np.zeros((0, BINS), np.int64))

    @classmethod
    def zeros(cls, experts: int) -> Sums:
        t = experts
        return cls(gram=np.zeros((t, t)), kept=np.zeros(t, np.int64), coverage=np.zeros(t + 1, np.int64),
                   parallel=np.zeros(t), energy=np.zeros(t), parallel_trimmed=np.zeros(t), energy_trimmed=np.zeros(t),
                   histogram=np.zeros((t, BINS), np.int64))

    def add(self, other: Sums) -> Sums:
        """In-place ``self += other`` (field by field); returns ``self``."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def total(items: Iterable[Sums], experts: int) -> Sums:
    """Sum of ``items`` in their order."""
    acc = Sums.zeros(experts)
    for s in items:
        acc.add(s)
    return acc


def gram64(deltas: torch.Tensor, block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """``G = D Dᵀ`` in float64 for ``D`` = ``(T, n)``, converting ``D`` a block of columns at a time."""
    t, n = deltas.shape
    g = torch.zeros(t, t, dtype=torch.float64)
    step = max(1, block_elements // max(1, t))
    for start in range(0, n, step):
        block = deltas[:, start : start + step].to(torch.float64)
        g += block @ block.T
    return g.numpy()


@dataclass
class SignCounts:
    """Trimmed-sign counts of one chunk (see the module docstring) and the trimmed masks themselves."""

    kept: np.ndarray
    coverage: np.ndarray
    overlap: int
    conflicts: int
    masks: list[torch.Tensor]


def sign_conflicts(deltas: torch.Tensor, thresholds: Sequence[float]) -> SignCounts:
    """Trimmed masks ``m_t = [|τ_t| >= thr_t] ∧ [τ_t ≠ 0]`` of ``deltas`` (``(T, n)``) and their counts."""
    count = torch.zeros(deltas.shape[1], dtype=torch.int16)
    positive = torch.zeros_like(count)
    masks = []
    for d, thr in zip(deltas, thresholds, strict=True):
        m = (d.abs() >= thr) & (d != 0)
        count += m
        positive += m & (d > 0)
        masks.append(m)
    multi = count >= 2
    conflicts = multi & (positive != 0) & (positive != count)
    return SignCounts(
        kept=np.array([int(m.sum()) for m in masks], np.int64),
        coverage=torch.bincount(count.to(torch.int64), minlength=len(masks) + 1).numpy().astype(np.int64),
        overlap=int(multi.sum()), conflicts=int(conflicts.sum()), masks=masks,
    )


def neuron_split(deltas: torch.Tensor, base: torch.Tensor, masks: Sequence[torch.Tensor],
                 block_elements: int = BLOCK_ELEMENTS) -> dict[str, np.ndarray]:
    """Per-expert parallel / total energy (raw and trimmed) and the per-neuron share histogram of one neuronal
    chunk: ``deltas`` ``(T, rows, in)``, ``base`` ``(rows, in)``, ``masks`` the flat trimmed masks. Every dot
    product is formed in float64, a block of rows at a time."""
    t, rows, width = deltas.shape
    out = {k: np.zeros(t) for k in ("parallel", "energy", "parallel_trimmed", "energy_trimmed")}
    hist = np.zeros((t, BINS), np.int64)
    step = max(1, block_elements // max(1, width))
    for start in range(0, rows, step):
        w = base[start : start + step].to(torch.float64)
        sq = torch.einsum("ki,ki->k", w, w)
        safe = torch.where(sq > 0, sq, torch.ones((), dtype=sq.dtype))
        for i in range(t):
            d = deltas[i, start : start + step].to(torch.float64)
            m = masks[i].view(rows, width)[start : start + step]
            for suffix, x in (("", d), ("_trimmed", d * m)):
                dots = torch.einsum("ki,ki->k", x, w)
                par = torch.where(sq > 0, dots * dots / safe, torch.zeros((), dtype=sq.dtype))
                energy = torch.einsum("ki,ki->k", x, x)
                out[f"parallel{suffix}"][i] += float(par.sum())
                out[f"energy{suffix}"][i] += float(energy.sum())
                if not suffix:
                    live = energy > 0
                    share = (par[live] / energy[live]).clamp_(0.0, 1.0)
                    idx = (share * BINS).floor_().clamp_(max=BINS - 1).to(torch.int64)
                    hist[i] += torch.bincount(idx, minlength=BINS).numpy()
    return {**out, "histogram": hist}


def chunk_sums(base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float], neuronal: bool
               ) -> Sums:
    """:class:`Sums` of one chunk (canonical layout; ``neuronal``: 2-D rows are neurons)."""
    deltas = torch.stack([m.reshape(-1) for m in models]).sub_(base.reshape(1, -1))
    signs = sign_conflicts(deltas, thresholds)
    s = Sums.zeros(len(models))
    s.numel = int(base.numel())
    s.base_sq = float(gram64(base.reshape(1, -1))[0, 0])
    s.gram, s.kept, s.coverage = gram64(deltas), signs.kept, signs.coverage
    s.overlap, s.conflicts = signs.overlap, signs.conflicts
    if neuronal and base.dim() == 2:
        split = neuron_split(deltas.view(len(models), *base.shape), base, signs.masks)
        s.neurons = int(base.shape[0])
        for key, value in split.items():
            setattr(s, key, value)
    return s


@dataclass
class Collected:
    """What one streamed inspection gives: the global trim statistics and the sums of every merged tensor."""

    stats: GlobalStats
    tensors: list[tuple[TensorPlan, Sums]]


def collect(plan: MergePlan, density: float, *, executor: ThreadPoolExecutor,
            progress: Callable[[Iterable, int, str], Iterable]) -> Collected:
    """The streamed passes of :func:`global_thresholds` (exact global top-``density`` thresholds per expert),
    then one pass computing :func:`chunk_sums` of every (tensor, chunk) of the plan, summed per tensor in plan
    order. At most one chunk of every model per worker is in memory."""
    jobs = [(tp, chunk) for tp in plan.merged for chunk in tp.chunks]
    experts = len(plan.pool.models)

    def read(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tp, chunk = jobs[i]
        return read_all(plan.pool, tp, chunk_rows(tp, chunk), allow_nonfinite=plan.config.allow_nonfinite,
                        device=CPU)

    stats = global_thresholds(range(len(jobs)), read, [density] * experts, executor=executor,
                              progress=lambda it: progress(it, len(jobs), "thresholds"), l1=False)

    def job(i: int) -> Sums:
        base, models = read(i)
        return chunk_sums(base, models, stats.thresholds, jobs[i][0].layout != "point")

    per_tensor: dict[str, Sums] = {tp.name: Sums.zeros(experts) for tp in plan.merged}
    for i, sums in enumerate(progress(executor.map(job, range(len(jobs))), len(jobs), "inspect")):
        per_tensor[jobs[i][0].name].add(sums)
    for acc in per_tensor.values():
        acc.tensors = 1
    return Collected(stats, [(tp, per_tensor[tp.name]) for tp in plan.merged])


__all__ = ["BINS", "Collected", "SignCounts", "Sums", "chunk_sums", "collect", "gram64", "neuron_split",
           "sign_conflicts", "total"]
