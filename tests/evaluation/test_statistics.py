"""The statistics module on constructed data with known answers: t quantiles, interval coverage, the paired
bootstrap (significant when built to be, not otherwise), Holm, packing of per-example correctness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuromerge.evaluation import statistics as st


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 200])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(df, p):
    scipy_stats = pytest.importorskip("scipy.stats")
    assert st.t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-9, abs=1e-9)
    assert st.t_quantile(1 - p, df) == pytest.approx(-st.t_quantile(p, df), rel=1e-12)


def test_t_quantile_known_values():
    # textbook table: t_{0.975,1} = 12.706, t_{0.975,2} = 4.303, t_{0.975,10} = 2.228
    assert st.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert st.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert st.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    with pytest.raises(ValueError):
        st.t_quantile(1.0, 3)


def test_t_interval_formula_and_one_seed():
    xs = [70.0, 72.0, 77.0]
    iv = st.t_interval(xs)
    mean = sum(xs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
    h = 4.302652729911275 * sd / math.sqrt(3)
    assert iv.mean == pytest.approx(mean) and iv.low == pytest.approx(mean - h) and iv.high == pytest.approx(mean + h)
    one = st.t_interval([81.5])
    assert one.mean == 81.5 and one.low is None and one.high is None and one.n == 1
    with pytest.raises(ValueError):
        st.t_interval([])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_t_interval_covers_a_known_mean_at_the_stated_rate(n):
    """2000 simulated experiments of n normal draws: the 95 % interval contains the true mean in ~95 % of them
    (binomial tolerance: 4 standard errors of a proportion, ±1.9 points)."""
    rng = np.random.default_rng(12)
    sims, mu = 2000, 3.7
    draws = rng.normal(mu, 2.5, size=(sims, n))
    covered = 0
    for row in draws:
        iv = st.t_interval(row.tolist())
        covered += iv.low <= mu <= iv.high
    rate = covered / sims
    tol = 4 * math.sqrt(0.95 * 0.05 / sims)
    assert abs(rate - 0.95) <= tol, rate
    # a z-interval (1.96 instead of t) would under-cover badly with 2 or 3 seeds: the t quantile matters
    if n <= 3:
        z_cover = np.mean([abs(r.mean() - mu) <= 1.96 * r.std(ddof=1) / math.sqrt(n) for r in draws])
        assert z_cover < 0.95 - tol


def test_holm_known_example():
    # Holm (1979)-style textbook example: p = (0.01, 0.04, 0.03, 0.005), m = 4
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005=0.02, 3·0.01=0.03, 2·0.03=0.06, max(0.06, 1·0.04)=0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert st.holm([]) == []
    adj = st.holm([0.01, 0.04, 0.03, 0.005])
    assert [a <= 0.05 for a in adj] == [True, False, False, True]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 401])
def test_pack_roundtrip(n):
    rng = np.random.default_rng(n)
    v = rng.random(n) < 0.4
    packed = st.pack_correct(v)
    assert np.array_equal(st.unpack_correct(packed), v)
    assert len(packed) <= 4 + math.ceil(n / 8) * 4 / 3 + 8  # about one bit per example
    with pytest.raises(ValueError):
        st.unpack_correct("12:***")
    with pytest.raises(ValueError):
        st.unpack_correct(f"{n + 9}:" + packed.split(":", 1)[1])


def _correct(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    return rng.random(n) < p


def _seeds(rng, tasks, n, p_by_task, seeds):
    return [{t: _correct(rng, n, p_by_task[t]) for t in tasks} for _ in range(seeds)]


def test_bootstrap_is_significant_when_built_to_be():
    """A is B with 12 % of B's errors fixed on every task: a real, paired gain of a few points."""
    rng = np.random.default_rng(0)
    tasks = ["t0", "t1", "t2"]
    expert = _seeds(rng, tasks, 300, dict.fromkeys(tasks, 0.9), 2)
    b = _seeds(rng, tasks, 300, dict.fromkeys(tasks, 0.75), 2)
    a = [{t: s[t] | (rng.random(300) < 0.12) for t in tasks} for s in b]
    d = st.paired_bootstrap(a, b, expert, replicates=2000)
    exact = np.mean([np.mean([100 * (a[s][t].mean() - b[s][t].mean()) / expert[s][t].mean() for t in tasks])
                     for s in range(2)])
    assert d.estimate == pytest.approx(exact, rel=1e-6)
    assert d.excludes_zero and d.low > 0 and d.p_value < 0.001
    assert d.low < d.estimate < d.high and d.mdd_examples == pytest.approx(st.MDD_FACTOR * d.se)
    assert d.mdd_seeds is not None and len(d.per_seed) == 2


def test_bootstrap_is_not_significant_when_built_not_to_be():
    """A and B are two independent draws from the same accuracy: over 40 such pairs, the 95 % interval excludes 0
    about 5 % of the time (at most 6 of 40, a binomial tail of ~1.5 %), and p-values spread over (0, 1]."""
    rng = np.random.default_rng(1)
    tasks = ["t0", "t1"]
    hits, ps = 0, []
    for _ in range(40):
        expert = _seeds(rng, tasks, 200, dict.fromkeys(tasks, 0.9), 1)
        a = _seeds(rng, tasks, 200, dict.fromkeys(tasks, 0.7), 1)
        b = _seeds(rng, tasks, 200, dict.fromkeys(tasks, 0.7), 1)
        d = st.paired_bootstrap(a, b, expert, replicates=1000)
        hits += d.excludes_zero
        ps.append(d.p_value)
        assert d.mdd_seeds is None  # one seed: no spread over seeds
    assert hits <= 6
    assert 0.3 < float(np.median(ps)) < 0.7


def test_bootstrap_identical_methods_and_pairing():
    """A == B: every replicate is exactly 0 (the same counts for both: pairing), p = 1. Shifting the pairing
    (B resampled independently) would give a non-zero spread."""
    rng = np.random.default_rng(2)
    a = _seeds(rng, ["t"], 150, {"t": 0.6}, 3)
    e = _seeds(rng, ["t"], 150, {"t": 0.9}, 3)
    d = st.paired_bootstrap(a, a, e, replicates=500)
    assert d.estimate == 0 and d.low == 0 and d.high == 0 and d.p_value == 1.0 and d.se == 0


def test_bootstrap_is_deterministic_and_checks_shapes():
    rng = np.random.default_rng(3)
    a = _seeds(rng, ["x", "y"], 50, {"x": 0.6, "y": 0.5}, 2)
    b = _seeds(rng, ["x", "y"], 50, {"x": 0.5, "y": 0.5}, 2)
    e = _seeds(rng, ["x", "y"], 50, {"x": 0.9, "y": 0.9}, 2)
    assert st.paired_bootstrap(a, b, e, replicates=300) == st.paired_bootstrap(a, b, e, replicates=300)
    assert st.paired_bootstrap(a, b, e, replicates=300, seed=1) != st.paired_bootstrap(a, b, e, replicates=300)
    bad = [dict(s, x=s["x"][:40]) for s in b]
    with pytest.raises(ValueError, match="share one test split"):
        st.paired_bootstrap(a, bad, e, replicates=10)
    with pytest.raises(ValueError, match="number of seeds"):
        st.paired_bootstrap(a, b[:1], e, replicates=10)


def test_bootstrap_se_matches_the_binomial_formula():
    """One task, one seed, B = 10,000: SE of (acc_A − acc_B)·100/acc_E ≈ 100/acc_E · sd(c_A − c_B)/√n with an
    expert that is always right (acc_E = 1 in every replicate)."""
    rng = np.random.default_rng(4)
    n = 400
    a, b = rng.random(n) < 0.8, rng.random(n) < 0.7
    e = np.ones(n, dtype=bool)
    d = st.paired_bootstrap([{"t": a}], [{"t": b}], [{"t": e}])
    expected = 100 * np.std(a.astype(float) - b.astype(float)) / math.sqrt(n)
    assert d.replicates == st.BOOTSTRAP_REPLICATES
    assert d.se == pytest.approx(expected, rel=0.05)


def test_bootstrap_with_fixed_expert_accuracies():
    """Experts given as numbers (the table's denominators) are held fixed; the estimate is the exact difference."""
    rng = np.random.default_rng(5)
    a = _seeds(rng, ["x", "y"], 120, {"x": 0.8, "y": 0.6}, 2)
    b = _seeds(rng, ["x", "y"], 120, {"x": 0.7, "y": 0.6}, 2)
    e = [{"x": 0.9, "y": 0.75}, {"x": 0.85, "y": 0.7}]
    d = st.paired_bootstrap(a, b, e, replicates=400)
    exact = np.mean([np.mean([100 * (a[s][t].mean() - b[s][t].mean()) / e[s][t] for t in "xy"]) for s in range(2)])
    assert d.estimate == pytest.approx(exact, rel=1e-6) and d.low < d.estimate < d.high


def test_bootstrap_interval_agrees_with_scipy_paired_percentile_bootstrap():
    """One task, one seed, an expert that is always right: Δ = 100·(mean a − mean b), which
    ``scipy.stats.bootstrap(paired=True, method="percentile")`` also resamples. Other random draws, so the
    endpoints agree within Monte-Carlo error (0.15 SE at B = 10,000 is ~0.1 points here; tolerance 0.25 SE)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(6)
    n = 300
    a, b = rng.random(n) < 0.78, rng.random(n) < 0.7
    d = st.paired_bootstrap([{"t": a}], [{"t": b}], [{"t": 1.0}])
    ref = scipy_stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis=-1: 100 * (
        x.mean(axis) - y.mean(axis)), paired=True, vectorized=True, n_resamples=10_000, method="percentile",
        rng=np.random.default_rng(0))
    assert d.low == pytest.approx(ref.confidence_interval.low, abs=0.25 * d.se)
    assert d.high == pytest.approx(ref.confidence_interval.high, abs=0.25 * d.se)
    assert d.se == pytest.approx(ref.standard_error, rel=0.05)
