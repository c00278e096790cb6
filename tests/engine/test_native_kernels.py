"""The fused C kernels (neuromerge.kernels) against the torch path they replace: bitwise equal outputs, reports and
statistics for Task Arithmetic, TIES and the statistics pass, equal to rounding for NeuroMerging's sweeps, on
direct calls and through whole merges; NaN/Inf inputs fall back to the torch path's errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import neuromerge
from neuromerge import kernels
from neuromerge.engine import fused as fused_path
from neuromerge.engine import stats as engine_stats
from neuromerge.errors import NonFiniteError
from neuromerge.methods import registry
from neuromerge.methods.base import GlobalStats, MergeInput
from tests.helpers import write_config

INT_VIEW = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def test_kernels_are_built() -> None:
    """`make test` builds the extension; a missing build must not pass unnoticed (opt out: NEUROMERGE_NATIVE=0)."""
    if os.environ.get("NEUROMERGE_NATIVE") == "0":
        pytest.fail("NEUROMERGE_NATIVE=0: the fused kernels are disabled, their tests would compare nothing")
    assert kernels.available(), (
        "neuromerge.kernels._fused was not built: the extension is optional, so pip skips it quietly when the C "
        "compiler fails (a stale build of other signatures is refused too); `python setup.py build_ext --inplace` "
        "shows why"
    )


def test_a_stale_library_is_refused(monkeypatch) -> None:
    """A library of other signatures (a failed rebuild left the old one) is not called: the torch path runs."""
    kernels._library.cache_clear()
    monkeypatch.setattr(kernels, "ABI", kernels.ABI + 1)
    try:
        assert not kernels.available()
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()
    assert kernels.available()


@pytest.fixture(params=[False, True], ids=["fastest", "portable"])
def kernel_code(request):
    """Run a test with the kernels' fastest code for this CPU and again with their portable code."""
    kernels.set_portable(request.param)
    yield request.param
    kernels.set_portable(False)


def _family(dtype: torch.dtype, shape: tuple[int, ...], n: int = 3, seed: int = 0, flip: bool = False
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    sign = -1.0 if flip else 1.0
    models = [(base.float() + sign * (torch.randn(shape, generator=g) * 0.002 + 0.0005)).to(dtype) for _ in range(n)]
    return base, models


def _input(method: str, params: dict, weights: list[float], base: torch.Tensor, models: list[torch.Tensor],
           stats: GlobalStats | None = None, rows: tuple[int, int] | None = None,
           full_shape: tuple[int, ...] | None = None) -> MergeInput:
    cls = registry.get(method)
    P = cls.Params
    return MergeInput(
        name="w", kind="neuronal" if base.dim() == 2 else "point", base=base, models=models, params=P(**params),
        per_model=[P(**params, weight=w) for w in weights], stats=stats,
        rows=rows or (0, base.shape[0]), full_shape=full_shape or tuple(base.shape),
    )


def _both(method: str, params: dict, weights: list[float], base: torch.Tensor, models: list[torch.Tensor],
          **kw) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    m = registry.get(method)()
    ref_x = _input(method, params, weights, base.float(), [t.float() for t in models], **kw)
    ref = m.merge(ref_x).to(base.dtype)
    x = _input(method, params, weights, base, models, **kw)
    assert fused_path.fuses(m, x.params, x.per_model)
    fused = fused_path.merge_fused(m, x, base.dtype)
    assert fused is not None
    return ref, ref_x.report, fused[0], x.report


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    same = a.view(INT_VIEW[a.dtype]) == b.view(INT_VIEW[b.dtype])
    gap = float((a.float() - b.float()).abs().max())
    assert bool(same.all()), f"{int((~same).sum())} entries differ; max |Δ| {gap}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("weights", "lam", "normalize"), [
    ([1.0, 1.0, 1.0], 0.3, False), ([0.5, 1.3, 0.7], 1.0, True), ([0.5, -1.3, 0.7], 0.7, False), ([2.0], 0.5, False),
])
def test_linear_kernel_equals_torch(dtype, weights, lam, normalize) -> None:
    base, models = _family(dtype, (130, 77), n=len(weights))
    # a chunk starting at row 37 of a 300-row tensor: the sampled conflict rows are the same global rows
    ref, ref_rep, out, rep = _both("task_arithmetic", {"lambda": lam, "normalize": normalize}, weights, base, models,
                                   rows=(37, 167), full_shape=(300, 77))
    _assert_bitwise(ref, out)
    assert rep["sign_conflict"] == ref_rep["sign_conflict"]
    if len(weights) > 1:
        assert 0.0 < rep["sign_conflict"] < 1.0


@pytest.mark.parametrize("shape", [(1000,), (20, 33)])
def test_linear_kernel_exact_conflicts_on_small_tensors(shape) -> None:
    base, models = _family(torch.bfloat16, shape)
    ref, ref_rep, out, rep = _both("task_arithmetic", {}, [1.0, 1.0, 1.0], base, models)
    _assert_bitwise(ref, out)
    assert rep["sign_conflict"] == ref_rep["sign_conflict"] > 0.0


def _thresholds(base: torch.Tensor, models: list[torch.Tensor], keep: float) -> GlobalStats:
    taus = [(m.float() - base.float()).abs().flatten() for m in models]
    thr = tuple(float(t.kthvalue(max(1, int((1 - keep) * t.numel()))).values) for t in taus)
    return GlobalStats(thr, (), (), (0,) * len(models), (1,) * len(models))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(("weights", "params"), [
    ([1.0, 1.0, 1.0], {}),
    ([0.5, 1.3, 0.7], {"variant": "dis-sum", "lambda": 0.7}),
    ([0.5, -1.3, 0.7], {}),
    ([1.0, 1.0, 1.0], {"zero_sign": "positive"}),
    ([1.0, 2.0, 1.0], {"sign_method": "count", "zero_sign": "positive"}),
    ([1.0, 1.0, 1.0], {"density": 1.0}),
])
def test_ties_kernel_equals_torch(dtype, flip, weights, params) -> None:
    """Majority fill of both signs (``flip`` makes the chunk's majority negative), variants, weights, no trim; base
    entries of +0 and −0 (where the fill decides the sign of a zero output) with unchanged or changed experts."""
    base, models = _family(dtype, (64, 50), flip=flip)
    zeros = torch.tensor([0.0, -0.0] * 6, dtype=dtype)
    base.view(-1)[:12] = zeros
    for m in models:
        m.view(-1)[:8] = zeros[:8]  # τ = 0 everywhere: the fill decides −0's sign
        m.view(-1)[8:12] = 0.01  # kept entries over a zero base
    stats = _thresholds(base, models, 0.2)
    per_model_density = params.pop("density", 0.2)
    params = {**params, "density": per_model_density}
    ref, ref_rep, out, rep = _both("ties", params, weights, base, models, stats=stats)
    _assert_bitwise(ref, out)
    assert rep["sign_conflict"] == ref_rep["sign_conflict"]
    assert rep["kept_density"] == ref_rep["kept_density"]


def test_ties_kernel_majority_sign_is_per_chunk() -> None:
    """The zero-election fill follows the chunk's majority: negative on a flipped family, so the kernel's second
    (fill −1) result is the one returned, and it differs from the fill +1 result."""
    base, models = _family(torch.bfloat16, (64, 50), flip=True)
    stats = _thresholds(base, models, 0.2)
    x = _input("ties", {"density": 0.2}, [1.0, 1.0, 1.0], base, models, stats=stats)
    m = registry.get("ties")()
    fused = fused_path.merge_fused(m, x, torch.bfloat16)
    x_pos = _input("ties", {"density": 0.2, "zero_sign": "positive"}, [1.0, 1.0, 1.0], base, models, stats=stats)
    positive = fused_path.merge_fused(m, x_pos, torch.bfloat16)
    assert fused is not None and positive is not None
    assert not torch.equal(fused[0], positive[0])


def test_ties_kernel_declines_per_tensor_trim() -> None:
    m = registry.get("ties")()
    P = m.Params
    assert not fused_path.fuses(m, P(scope="tensor"), [P(scope="tensor", density=0.2)])
    assert fused_path.fuses(m, P(scope="tensor"), [P(scope="tensor", density=1.0)])


def test_kernels_decline_nonfinite_inputs() -> None:
    base, models = _family(torch.bfloat16, (8, 16))
    models[1][3, 4] = float("nan")
    x = _input("task_arithmetic", {}, [1.0] * 3, base, models)
    assert fused_path.merge_fused(registry.get("task_arithmetic")(), x, torch.bfloat16) is None
    for high, window in ((True, None), (False, (0, 2))):
        bad, good = (engine_stats.Histograms.zeros(high, window, True) for _ in range(2))
        assert not engine_stats._kernel_histograms(base, models[1], bad)
        assert engine_stats._kernel_histograms(base, models[0], good)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("l1", [False, True])
@pytest.mark.parametrize("window", [None, "narrow", "wide"])
def test_histograms_equal_torch(dtype, l1, window, kernel_code) -> None:
    """Counts and significand sums of the high histograms, the window's low histograms and the counts above it,
    kernel vs torch, added twice into the same arrays; and what they count, against the keys themselves."""
    base, models = _family(dtype, (300, 70))
    keys = torch.cat([(m.float() - base.float()).abs().reshape(-1).view(torch.int32).long() for m in models[:2]])
    mode = int((keys >> 16).mode().values)
    bins = {None: None, "narrow": (mode - 1, 3), "wide": (mode - 200, 400)}[window]
    high = bins is None  # a pass counts a model by high bins or by a window
    ref = engine_stats.Histograms.zeros(high, bins, l1)
    got = engine_stats.Histograms.zeros(high, bins, l1)
    for m in models[:2]:
        engine_stats._torch_histograms(base.float(), m.float(), ref)
        assert engine_stats._kernel_histograms(base, m, got)
    for name in ("high_counts", "high_mass", "low_counts", "counts"):
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype == np.int64
            assert (a == b).all(), name
    values = keys.int().view(torch.float32).double()
    if high:
        assert ref.high_counts is not None and (ref.high_counts == np.bincount(keys >> 16, minlength=1 << 15)).all()
        if l1:  # the significand sums are the exact L1 mass, rounded once
            by_exponent = ref.high_mass.reshape(engine_stats.EXPONENT_SLOTS, -1).sum(axis=1)
            assert engine_stats._exponent_mass(by_exponent) == math.fsum(values.tolist())
    if bins is not None:
        lo, count = bins
        inside = keys[(keys >= lo << 16) & (keys < (lo + count) << 16)] - (lo << 16)
        assert ref.low_counts is not None and inside.numel() > 0
        assert (ref.low_counts.reshape(-1) == np.bincount(inside, minlength=count << 16)).all()
        assert ref.counts is not None
        assert list(ref.counts) == [int((keys >= (lo + count) << 16).sum()), keys.numel()]
        _assert_window_masses(ref, got, keys, values)


def _assert_window_masses(ref, got, keys: torch.Tensor, values: torch.Tensor) -> None:
    """The masses of a window pass, below and above the window and (from the counts) inside it: kernel and torch
    equal to the correctly rounded exact sums (math.fsum), however the kernel spread them over the slots."""
    if ref.mass is None:
        assert got.mass is None
        return
    lo, count = ref.window
    regions = [keys < lo << 16, keys >= (lo + count) << 16]
    for r, where in enumerate(regions):
        exact = math.fsum(values[where].tolist())
        assert engine_stats._exponent_mass(ref.mass[r]) == exact == engine_stats._exponent_mass(got.mass[r]), r
    inside = math.fsum(values[~(regions[0] | regions[1])].tolist())
    assert engine_stats._exponent_mass(engine_stats._window_mass(ref.window, ref.low_counts)) == inside


def test_window_masses_of_mixed_magnitudes(kernel_code) -> None:
    """Blocks whose magnitudes span more than the kernel's exact block sums allow (zeros, subnormals, tiny and huge
    entries beside ordinary ones) take the entry-by-entry path; both paths give the exact masses."""
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(8, 4096, generator=g) * 0.01
    tau[1, ::7] = 0.0
    tau[2, ::5] = torch.ldexp(torch.ones(1), torch.tensor(-140))  # subnormal
    tau[3, ::9] = 1e-30
    tau[4, ::11] = 3e25  # exponent >= 200
    tau[5] = 1e-12  # a whole block of tiny entries
    base = torch.zeros_like(tau)
    keys = tau.abs().reshape(-1).view(torch.int32).long()
    mode = int((keys >> 16).mode().values)
    window = (mode - 1, 3)
    ref, got = (engine_stats.Histograms.zeros(False, window, True) for _ in range(2))
    engine_stats._torch_histograms(base, tau, ref)
    assert engine_stats._kernel_histograms(base, tau, got)
    assert (ref.low_counts == got.low_counts).all() and (ref.counts == got.counts).all()
    _assert_window_masses(ref, got, keys, tau.abs().reshape(-1).double())


def _merge(tmp: Path, cfg: Path, name: str, native: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Merge into ``tmp / name``; returns how often each kernel ran."""
    calls = {"linear": 0, "ties": 0, "add_high_histograms": 0, "add_window_histograms": 0, "neuro_rows": 0}
    with monkeypatch.context() as m:
        if not native:
            m.setattr(kernels, "_library", lambda: None)
        for fn in calls:
            def counted(*args, _fn=getattr(kernels, fn), _name=fn, **kw):
                calls[_name] += 1
                return _fn(*args, **kw)

            m.setattr(kernels, fn, counted)
        neuromerge.merge(cfg, tmp / name, threads=2, chunk_elements=256)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {"lambda": 0.4}),
    ("ties", {"density": 0.3}),
    ("neuromerging", {"density": 0.3, "lambda2": "auto"}),
])
def test_whole_merge_native_equals_torch(tmp_path, make_family, monkeypatch, dtype, method, params) -> None:
    """A whole merge (row chunks, two threads, statistics pass) gives the same bytes, per-tensor report and global
    statistics with the kernels as without them; float16 inputs go through the kernels as float32."""
    base, experts = make_family("llama", dtype=dtype)
    cfg = write_config(tmp_path / "c.yaml", method, base, experts, parameters=params,
                       dtype={torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype])
    fast_calls = _merge(tmp_path, cfg, "fast", True, monkeypatch)
    assert not any(_merge(tmp_path, cfg, "slow", False, monkeypatch).values())
    used = {"task_arithmetic": ["linear"], "ties": ["ties", "add_high_histograms", "add_window_histograms"],
            "neuromerging": ["neuro_rows", "add_high_histograms", "add_window_histograms"]}
    assert all(fast_calls[k] > 0 for k in used[method]), fast_calls
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    a, b = load_file(fast / "model.safetensors"), load_file(slow / "model.safetensors")
    assert a.keys() == b.keys()
    ra, rb = (json.loads((d / "merge_report.json").read_text()) for d in (fast, slow))
    assert ra["global_statistics"] == rb["global_statistics"]
    if method != "neuromerging":
        for k in a:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        assert ra["tensors"] == rb["tensors"]
        return
    # NeuroMerging's fused sweeps sum inner products in float64 (torch: fp32 einsum): equal up to rounding
    base_sd = load_file(base / "model.safetensors")
    for k in a:
        update = (b[k].float() - base_sd[k].float()).abs().max()
        gap = (a[k].float() - b[k].float()).abs()
        if dtype == torch.float32:
            assert float(gap.max()) <= 1e-5 * float(update) + 1e-7, k
        else:  # a rounding to the output dtype may flip: at most one unit in the last place, rarely
            ulp = b[k].float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
            assert bool((gap <= ulp * 1.01 + 1e-12).all()), k
            assert float((gap > 0).float().mean()) < 0.02, k
    for name, rep in ra["tensors"].items():
        other = rb["tensors"][name]
        assert rep.keys() == other.keys()
        for key, value in rep.items():
            assert value == pytest.approx(other[key], rel=1e-4, abs=1e-7), (name, key)


def test_nonfinite_input_still_raises(tmp_path, make_family) -> None:
    base, experts = make_family("llama", dtype=torch.bfloat16)
    t = load_file(experts[1] / "model.safetensors")
    name = next(k for k in t if k.endswith("down_proj.weight"))
    t[name][0, 0] = float("inf")
    from safetensors.torch import save_file

    save_file(t, experts[1] / "model.safetensors", metadata={"format": "pt"})
    for method, params in [("task_arithmetic", {}), ("ties", {"density": 0.3})]:
        cfg = write_config(tmp_path / f"{method}.yaml", method, base, experts, parameters=params)
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            neuromerge.merge(cfg, tmp_path / f"out-{method}")
        assert not (tmp_path / f"out-{method}").exists()


def _chunks(n_jobs: int = 40) -> tuple[list[tuple[torch.Tensor, list[torch.Tensor]]], list[float]]:
    """Chunks of one distribution (the sample predicts their threshold bins) and per-model densities."""
    return [_family(torch.bfloat16, (64, 256), seed=j) for j in range(n_jobs)], [0.2, 0.35, 1.0]


@pytest.mark.parametrize("l1", [False, True])
def test_sampled_window_statistics_equal_two_passes(monkeypatch, l1) -> None:
    """The window of low-bit counts (its bins predicted from every 8th chunk) gives the same statistics as the torch
    path's two passes after one read when the prediction holds; a misprediction costs the two passes after all."""
    from concurrent.futures import ThreadPoolExecutor

    chunks, densities = _chunks()
    reads = {"stored": 0}

    def read(j: int):
        base, models = chunks[j]
        return base.float(), [m.float() for m in models]

    def read_stored(j: int):
        reads["stored"] += 1
        return chunks[j]

    jobs = range(len(chunks))
    with ThreadPoolExecutor(2) as pool:
        ref = engine_stats.global_thresholds(jobs, read, densities, executor=pool, l1=l1)
        hit = engine_stats.global_thresholds(jobs, read, densities, executor=pool, l1=l1, read_stored=read_stored)
        hit_reads = reads["stored"]
        reads["stored"] = 0
        monkeypatch.setattr(engine_stats, "_predicted_windows",
                            lambda *a, **k: [(0, 3), (100, 3), None])  # bins far below the true ones
        miss = engine_stats.global_thresholds(jobs, read, densities, executor=pool, l1=l1, read_stored=read_stored)
    assert hit == ref == miss
    assert ref.thresholds[2] == 0.0 and ref.thresholds[0] > ref.thresholds[1] > 0
    n_sampled = len(range(0, len(chunks), engine_stats.SAMPLE_EVERY))
    assert hit_reads == n_sampled + len(chunks)  # the sample and one full pass
    assert reads["stored"] == 3 * len(chunks)  # a miss: the window pass, then the high and low passes


def test_window_covers_the_sample_ranks_margin() -> None:
    """The predicted window holds the bins of the sample's ranks k ± max(4√k, 2 % k) plus one bin on each side, is
    capped at MAX_WINDOW bins around the sample's own bin, and is None for a trim that keeps everything or nothing."""
    rng = np.random.default_rng(0)
    keys = (np.abs(rng.normal(0, 0.01, 200_000)).astype(np.float32).view(np.int32) >> 16).astype(np.int64)
    counts = np.bincount(keys, minlength=engine_stats.HIGH_BINS)
    ranked = np.sort(keys)[::-1]  # high bin of the r-th largest entry: ranked[r - 1]
    k = int(0.2 * keys.size)
    margin = max(4 * k**0.5, 0.02 * k)
    lo, count = engine_stats._window(counts, 0.2)
    assert lo == ranked[int(k + margin) - 1] - 1 and lo + count - 1 == ranked[int(k - margin) - 1] + 1
    spread = np.bincount(np.arange(engine_stats.HIGH_BINS) % 3000, minlength=engine_stats.HIGH_BINS)  # flat
    lo, count = engine_stats._window(spread, 0.5)
    b, _ = engine_stats._select(spread, int(0.5 * spread.sum()))
    assert count == engine_stats.MAX_WINDOW and lo <= b < lo + count
    assert engine_stats._window(counts, 1.0) is None and engine_stats._window(counts, 1e-9) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_neuron_sweeps_equal_the_torch_formulas(dtype) -> None:
    """``neuro_first``: c_t, Gram matrices of τ⊥ and energies as split_parallel / gram64 compute them (a zero base
    row included); ``neuro_second``: θ0 + λ2 Σ_t a_t τ⊥_t + λ1 p w0."""
    from neuromerge.tensors.neurons import gram64, split_parallel

    base, models = _family(dtype, (40, 300))
    base[3] = 0.0
    weights, thresholds = [1.0, 0.5, 2.0], [0.0015, 0.0, 0.002]
    taus = torch.stack([
        torch.where((m.float() - base.float()).abs() >= thr, m.float() - base.float(), 0.0) * w
        for m, w, thr in zip(models, weights, thresholds, strict=True)
    ])
    coef, orth = split_parallel(taus.double(), base.double())
    sweep = kernels.neuro_first(base, models, weights, thresholds)
    assert sweep is not None
    torch.testing.assert_close(sweep.coef.double(), coef, rtol=1e-5, atol=1e-9)
    assert bool((sweep.coef[:, 3] == 0).all())
    torch.testing.assert_close(sweep.gram, gram64(orth), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(sweep.sq_norm, (base.double() ** 2).sum(-1))
    assert sweep.total_energy == pytest.approx(float((taus.double() ** 2).sum()), rel=1e-9)
    assert sweep.parallel_energy == pytest.approx(float((coef ** 2 * (base.double() ** 2).sum(-1)).sum()), rel=1e-5)

    g = torch.Generator().manual_seed(1)
    mix, par = torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    out, bad = kernels.neuro_second(base, models, weights, thresholds, sweep.coef, mix, par, 0.7, 1.3, torch.float32)
    orth32 = taus - sweep.coef.unsqueeze(-1) * base.float()
    expected = base.float() + 1.3 * torch.einsum("tk,tki->ki", mix, orth32) + 0.7 * par.unsqueeze(-1) * base.float()
    assert bad == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_neuron_sweep_one_pass_inner_products_equal_dot_by_dot(t) -> None:
    """For T <= 4 the row's inner products come from one fused pass, for more models dot by dot; both sum each inner
    product in the same lane order, so the coefficients and Gram entries of the first T models are bitwise the same
    when two more models join (c_t and <o_s, o_t> depend only on models s and t)."""
    base, models = _family(torch.bfloat16, (24, 203), n=t + 2, seed=3)
    weights, thresholds = [1.0 + 0.1 * i for i in range(t + 2)], [0.001] * (t + 2)
    few = kernels.neuro_first(base, models[:t], weights[:t], thresholds[:t])
    many = kernels.neuro_first(base, models, weights, thresholds)
    assert few is not None and many is not None
    assert torch.equal(few.coef, many.coef[:t])
    assert torch.equal(few.gram, many.gram[:, :t, :t])
    assert torch.equal(few.sq_norm, many.sq_norm)


def test_neuron_gram_is_accurate_when_task_vectors_are_nearly_parallel() -> None:
    """τ = 0.5·w0 + 1e-4·r: the Gram matrix of τ⊥ (expanded from the row's inner products in float64) matches a
    float64 reference to 1e-6 of ``sqrt(G_ss G_tt)`` although ‖τ‖²/‖τ⊥‖² ≈ 10⁷ (measured 3e-8; a Gram matrix of an
    fp32 τ⊥, the torch path's, is off by 2e-5)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(16, 512, generator=g)
    models = [base + 0.5 * base + 1e-4 * torch.randn(16, 512, generator=g) for _ in range(3)]
    sweep = kernels.neuro_first(base, models, [1.0] * 3, [0.0] * 3)
    assert sweep is not None
    taus = torch.stack([m - base for m in models]).double()  # fp32 subtraction, as the kernel
    orth = taus - sweep.coef.double().unsqueeze(-1) * base.double()
    reference = torch.einsum("ski,tki->kst", orth, orth)
    diagonal = torch.diagonal(reference, dim1=-2, dim2=-1)
    scale = (diagonal.unsqueeze(-1) * diagonal.unsqueeze(-2)).sqrt()
    assert float(((sweep.gram - reference).abs() / scale).max()) <= 1e-6


@pytest.mark.parametrize("t", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("cum_threshold", [1.0, 0.6])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_orthogonal_mix_kernel_equals_torch(t, cum_threshold, sign_method) -> None:
    """``nm_orthogonal_mix`` (Jacobi eigenpairs, the elections in C) against ``neurons.orthogonal_mix`` (LAPACK,
    torch), with an all-zero row, a task with τ⊥ = 0 and a rank-deficient row among random Gram matrices."""
    from neuromerge.tensors.neurons import orthogonal_mix

    g = torch.Generator().manual_seed(t)
    orth = torch.randn(120, t, 40, dtype=torch.float64, generator=g)
    orth[3] = 0.0
    orth[5, 0] = 0.0
    if t > 1:
        orth[7, 1] = 2.0 * orth[7, 0]
    gram = orth @ orth.transpose(1, 2)
    ref = orthogonal_mix(gram, cum_threshold, sign_method)
    got = kernels.orthogonal_mix(gram, cum_threshold, sign_method == "count")
    assert got is not None and got.shape == ref.shape == (t, 120)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert bool((got[:, 3] == 0).all()) and float(got[0, 5]) == 0.0
    assert float(ref.abs().max()) > 0.1  # the comparison is not between zeros


def test_orthogonal_mix_kernel_declines_more_models_than_it_holds() -> None:
    gram = torch.eye(kernels.MIX_MAX + 1, dtype=torch.float64).expand(4, -1, -1)
    assert kernels.orthogonal_mix(gram, 1.0, False) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("cum_threshold", "sign_count"), [(1.0, False), (0.6, True)])
def test_neuro_rows_is_the_two_sweeps_in_one(dtype, cum_threshold, sign_count) -> None:
    """``nm_neuro_rows`` (λ1 = 0, one sweep per row) gives the bytes and energies of ``neuro_first`` →
    ``orthogonal_mix`` → ``neuro_second``; a NaN input makes it decline (the torch path then reports it)."""
    base, models = _family(dtype, (48, 260))
    base[2] = 0.0
    weights, thresholds = [1.0, 0.5, 2.0], [0.0015, 0.0, 0.002]
    sweep = kernels.neuro_first(base, models, weights, thresholds)
    assert sweep is not None
    mix = kernels.orthogonal_mix(sweep.gram, cum_threshold, sign_count)
    assert mix is not None
    two, bad = kernels.neuro_second(base, models, weights, thresholds, sweep.coef, mix.float(), None, 0.0, 1.4, dtype)
    one = kernels.neuro_rows(base, models, weights, thresholds, cum_threshold, sign_count, 1.4, dtype)
    assert one is not None and bad == one.bad == 0
    assert torch.equal(one.out.view(INT_VIEW[dtype]), two.view(INT_VIEW[dtype]))
    assert not torch.equal(one.out, base)
    assert (one.total_energy, one.parallel_energy) == (sweep.total_energy, sweep.parallel_energy)
    models[1][5, 7] = float("nan")
    assert kernels.neuro_rows(base, models, weights, thresholds, cum_threshold, sign_count, 1.4, dtype) is None


@pytest.mark.parametrize("n_models", [kernels.MIX_MAX, kernels.MIX_MAX + 1])
def test_neuromerging_fused_with_many_models(n_models, monkeypatch) -> None:
    """Up to MIX_MAX models the one-sweep kernel runs; one more takes the two sweeps with the eigenproblems in torch.
    Both agree with the torch path to rounding."""
    calls = []
    for name in ("neuro_rows", "neuro_first"):
        def counted(*args, _fn=getattr(kernels, name), _name=name, **kw):
            calls.append(_name)
            return _fn(*args, **kw)

        monkeypatch.setattr(kernels, name, counted)
    base, models = _family(torch.float32, (24, 90), n=n_models, seed=4)
    stats = _thresholds(base, models, 0.3)
    stats = GlobalStats(stats.thresholds, (0.1,) * n_models, (1.0,) * n_models, stats.kept, stats.total)
    weights = [1.0 + 0.05 * i for i in range(n_models)]
    m = registry.get("neuromerging")()
    ref = m.merge(_input("neuromerging", {"density": 0.3}, weights, base, models, stats=stats))
    x = _input("neuromerging", {"density": 0.3}, weights, base, models, stats=stats)
    fused = fused_path.merge_fused(m, x, torch.float32)
    assert fused is not None
    assert calls == (["neuro_rows"] if n_models <= kernels.MIX_MAX else ["neuro_first"])
    assert float((fused[0] - ref).abs().max()) <= 1e-5 * float((ref - base).abs().max())


@pytest.mark.parametrize("params", [
    {}, {"lambda1": 0.5}, {"lambda1": 0.5, "parallel_reconstruction": "official"}, {"cum_threshold": 0.6},
    {"sign_method": "count", "lambda2": 1.5}, {"density": 1.0, "lambda2": 1.0},
])
def test_neuromerging_fused_equals_torch(params) -> None:
    base, models = _family(torch.float32, (64, 200))
    stats = _thresholds(base, models, 0.3)
    stats = GlobalStats(stats.thresholds, (0.1, 0.2, 0.15), (1.0, 1.0, 1.0), stats.kept, stats.total)
    params = {"density": 0.3, **params}
    m = registry.get("neuromerging")()
    ref_x = _input("neuromerging", params, [1.0, 0.8, 1.2], base, models, stats=stats)
    ref = m.merge(ref_x)
    x = _input("neuromerging", params, [1.0, 0.8, 1.2], base, models, stats=stats)
    fused = fused_path.merge_fused(m, x, torch.float32)
    assert fused is not None
    update = float((ref - base).abs().max())
    assert float((fused[0] - ref).abs().max()) <= 1e-5 * update
    assert x.report.keys() == ref_x.report.keys()
    for key, value in x.report.items():
        assert value == pytest.approx(ref_x.report[key], rel=1e-5, abs=1e-9), key
