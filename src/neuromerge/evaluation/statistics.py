"""Statistics of benchmark results: t-intervals over seeds, a paired, task-stratified bootstrap of a difference in
mean normalized accuracy, Holm's step-down adjustment and the minimum detectable difference.

Everything here works on plain numbers and per-example correctness arrays (no models), so the bench
(:mod:`neuromerge.bench.stats`) and a user of ``neuromerge evaluate`` compute the same figures the same way.
The formulas are stated once in ``docs/bench.md`` ("Statistics"):

- **t-interval** over ``S`` seeds: ``x̄ ± t_{0.975, S−1} · s / √S`` with ``s`` the sample standard deviation
  (``S − 1`` in the denominator); none with one seed (never a fake interval).
- **paired bootstrap** (Efron & Tibshirani 1993, ch. 13; percentile interval): in replicate ``b`` each task ``t``'s
  test examples are resampled with replacement (``n_t`` draws, the multinomial counts ``w_b``); the same counts
  serve both methods and the expert that normalizes them (the pairing) and every seed (the seeds share the fixed
  test split). ``Δ_b = mean_s mean_t 100 · (acc_A − acc_B)(w_b) / acc_E(w_b)``. Interval: the 2.5 / 97.5 %
  percentiles of ``Δ_b``; two-sided p-value ``min(1, 2 · min(#{Δ_b ≤ 0} + 1, #{Δ_b ≥ 0} + 1) / (B + 1))``.
- **Holm** (1979): p-values sorted ascending ``p_(1) ≤ … ≤ p_(m)``; adjusted ``p̃_(i) = max_{j ≤ i} min(1,
  (m − j + 1) p_(j))``; a comparison is significant when ``p̃ ≤ α`` (family-wise error ≤ α).
- **minimum detectable difference** at 80 % power and two-sided α = 0.05 (normal approximation):
  ``MDD = (z_{0.975} + z_{0.8}) · SE ≈ 2.80 · SE``.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: replicates of the paired bootstrap and its fixed RNG seed
BOOTSTRAP_REPLICATES = 10_000
BOOTSTRAP_SEED = 0
#: z_{1-α/2} + z_{power} for α = 0.05 two-sided and 80 % power: 1.959964 + 0.841621
MDD_FACTOR = 2.801585
#: replicates per block of the bootstrap (bounds its memory: block × n_t float32)
_BLOCK = 2_000


# --------------------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes, 3rd ed., §6.4)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom: ``1 − ½ I_{df/(df+x²)}(df/2, ½)`` for ``x ≥ 0``."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided t-interval (``low``/``high`` None when ``n < 2``)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "confidence": self.confidence}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``x̄ ± t_{(1+c)/2, n−1} · s / √n`` over ``values`` (NaN / None dropped); no interval for ``n < 2``. Raises
    :class:`ValueError` on no values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("t_interval needs at least one value")
    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    h = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - h, mean + h, n, confidence)


# --------------------------------------------------------------------------------------------------- Holm
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``
    over the ascending order (Holm 1979)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


# --------------------------------------------------------------------------------------------------- bits
def pack_correct(correct: Any) -> str:
    """A boolean vector as ``"<n>:<base64 of its bits>"`` (``numpy.packbits``, big-endian bit order)."""
    arr = np.asarray(correct, dtype=bool).ravel()
    return f"{arr.size}:{base64.b64encode(np.packbits(arr).tobytes()).decode('ascii')}"


def unpack_correct(packed: str) -> np.ndarray:
    """Inverse of :func:`pack_correct`: a boolean numpy vector. Raises :class:`ValueError` on a malformed string."""
    try:
        n_text, data = packed.split(":", 1)
        n = int(n_text)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(data, validate=True), dtype=np.uint8))
    except (ValueError, TypeError) as err:
        raise ValueError(f"not a packed correctness vector: {packed[:40]!r}") from err
    if n < 0 or bits.size < n or bits.size - n >= 8:
        raise ValueError(f"packed correctness vector of {n} examples holds {bits.size} bits")
    return bits[:n].astype(bool)


# --------------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Difference:
    """A paired bootstrap of ``Δ = mean normalized accuracy of A − of B`` (points of %, see module doc)."""

    estimate: float
    low: float
    high: float
    p_value: float
    se: float
    replicates: int
    #: per-seed estimates (the t-side of the minimum detectable difference)
    per_seed: tuple[float, ...] = ()

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def mdd_examples(self) -> float:
        """Smallest difference this test set detects (80 % power, α = 0.05): ``2.80 · SE_bootstrap``."""
        return MDD_FACTOR * self.se

    @property
    def mdd_seeds(self) -> float | None:
        """The same from the spread over seeds: ``2.80 · s(Δ_s) / √S`` (None with one seed)."""
        if len(self.per_seed) < 2:
            return None
        xs = self.per_seed
        m = sum(xs) / len(xs)
        return MDD_FACTOR * math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "p_value": self.p_value,
                "se": self.se, "replicates": self.replicates, "per_seed": list(self.per_seed),
                "excludes_zero": self.excludes_zero, "mdd_examples": self.mdd_examples, "mdd_seeds": self.mdd_seeds}


def _task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])


def bootstrap_accuracies(columns: Mapping[str, np.ndarray], *, replicates: int = BOOTSTRAP_REPLICATES,
                         seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """Per task, the accuracy of every column under each bootstrap replicate: ``columns[task]`` is an ``(n_t, K)``
    0/1 matrix (one column per (row, seed)); returns ``(replicates + 1, K)`` accuracies whose row 0 is the observed
    sample (all counts 1). Replicate ``b`` of task ``t`` draws ``n_t`` example indices uniformly with replacement
    from a generator seeded by ``(seed, crc32(t))``; their counts ``w_b ~ Mult(n_t, 1/n_t)`` give ``w_b · C / n_t``
    (one matrix product per block of replicates)."""
    out: dict[str, np.ndarray] = {}
    for task, cols in columns.items():
        c = np.asarray(cols, dtype=np.float32)
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"task {task!r}: needs an (n_examples > 0, columns) matrix, got shape {c.shape}")
        n = c.shape[0]
        rng = _task_rng(seed, task)
        parts = [c.mean(0, dtype=np.float64)[None, :]]
        for start in range(0, replicates, _BLOCK):
            block = min(_BLOCK, replicates - start)
            # n draws with replacement per replicate, counted per example: the multinomial counts w_b
            draws = rng.integers(0, n, size=(block, n)) + (np.arange(block) * n)[:, None]
            w = np.bincount(draws.ravel(), minlength=block * n).reshape(block, n).astype(np.float32)
            parts.append((w @ c).astype(np.float64) / n)
        out[task] = np.concatenate(parts, 0)
    return out


def difference_from_replicates(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                               expert: Mapping[str, np.ndarray], confidence: float = 0.95) -> Difference:
    """The :class:`Difference` from replicate accuracies (as :func:`bootstrap_accuracies` returns, row 0 observed):
    ``a[t]``, ``b[t]`` are ``(B + 1, S)`` (one column per seed, same seeds in the same order); ``expert[t]`` is
    ``(B + 1, S)`` too (the experts resampled with the same counts) or ``(S,)`` (their accuracies held fixed).
    ``Δ_b = mean_s mean_t 100 · (a − b) / expert``; a task whose expert scores 0 in a replicate gives NaN there,
    and such replicates are dropped."""
    tasks = list(a)
    if not tasks or set(tasks) != set(b) or set(tasks) != set(expert):
        raise ValueError("the bootstrap needs the same non-empty set of tasks for both methods and the expert")
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.stack([100.0 * (a[t] - b[t]) / expert[t] for t in tasks], 0)  # (T, B+1, S)
    per_seed = per.mean(0)  # (B+1, S)
    d = per_seed.mean(1)  # (B+1,)
    observed, reps = float(d[0]), d[1:]
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        raise ValueError("no bootstrap replicate is finite (an expert scores 0 on every resample)")
    alpha = 1.0 - confidence
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    n = reps.size
    p = min(1.0, 2.0 * min((np.count_nonzero(reps <= 0) + 1) / (n + 1), (np.count_nonzero(reps >= 0) + 1) / (n + 1)))
    return Difference(observed, float(low), float(high), float(p), float(reps.std(ddof=1)), int(n),
                      tuple(float(x) for x in per_seed[0]))


def paired_bootstrap(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                     expert: Sequence[Mapping[str, Any]], *, replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> Difference:
    """Paired, task-stratified bootstrap of the difference in mean normalized accuracy of method A and method B
    (module doc). ``a[s][task]``, ``b[s][task]``, ``expert[s][task]``: per-example correctness (bool / 0-1
    vectors) of seed ``s``, or for the expert a number (its accuracy, held fixed: the table's denominator); every seed
    and all must have the same tasks with the same number of examples per task (the same test split)."""
    if not (len(a) == len(b) == len(expert)) or not a:
        raise ValueError("paired_bootstrap needs the same non-zero number of seeds for A, B and the expert")
    tasks = list(a[0])
    columns: dict[str, np.ndarray] = {}
    fixed = all(np.ndim(e[t]) == 0 for e in expert for t in tasks)
    sources = (a, b) if fixed else (a, b, expert)
    for t in tasks:
        vecs = [np.asarray(src[s][t], dtype=bool).ravel() for src in sources for s in range(len(a))]
        if len({v.size for v in vecs}) != 1:
            raise ValueError(f"task {t!r}: the seeds and methods do not share one test split (sizes differ)")
        columns[t] = np.stack(vecs, 1)
    reps = bootstrap_accuracies(columns, replicates=replicates, seed=seed)
    s = len(a)
    den = ({t: np.array([float(e[t]) for e in expert]) for t in tasks} if fixed
           else {t: r[:, 2 * s:] for t, r in reps.items()})
    return difference_from_replicates({t: r[:, :s] for t, r in reps.items()},
                                      {t: r[:, s:2 * s] for t, r in reps.items()}, den, confidence)
