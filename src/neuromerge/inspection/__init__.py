"""``neuromerge inspect``: see the interference between experts before choosing a merge.

Over the pool a merge config names (the same validation as ``merge``: :func:`neuromerge.engine.run.prepare`),
stream one tensor row chunk at a time exactly like the merge engine (one or two passes for the exact global trim
thresholds, :func:`neuromerge.engine.stats.global_thresholds`, then one pass of small float64 sums,
:mod:`.stats`), and report per tensor, block, component and for the whole model: pairwise cosine similarity of the
task vectors, trimmed-sign conflicts, the share of update energy parallel / orthogonal to the pre-trained neurons
(NeuroMerging's split) and its distribution over neurons, and the update norms (:mod:`.report`); a text summary
with a suggested method (:mod:`.summary`); PNG figures (:mod:`.figures`); and with a bench suite, per-component
mergeability (:mod:`.mergeability`).

``neuromerge.inspect(config, out)`` is this module's :func:`inspect`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import MergeConfig, load_config
from ..engine.memory import retain_freed_memory
from ..engine.plan import DEFAULT_CHUNK_ELEMENTS, MergePlan
from ..engine.run import Progress, prepare, single_threaded_torch
from ..engine.threads import one_torch_thread
from ..errors import ConfigError, NeuromergeError
from ..io.output_guard import check_output
from ..io.writer import write_error
from .components import block_order, component_of, component_order
from .report import GroupStats, InspectReport, Mergeability, MergeabilityRow, Suggestion, Summary, grouped
from .stats import Collected, collect, total
from .suite_pool import BENCH_MISSING, BenchUnavailable, SuiteExperts, load_suite_experts, write_pool
from .summary import summarize

__all__ = ["GroupStats", "InspectReport", "Mergeability", "MergeabilityRow", "Suggestion", "Summary", "inspect",
           "inspect_plan"]

ConfigSource = MergeConfig | dict[str, Any] | str | Path


def inspect(config: ConfigSource | None, out: str | Path | None = None, *, density: float = 0.2,
            threads: int | None = None, suite: str | Any = None, quick: bool = False, seed: int = 0,
            figures: bool = True, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, allow_download: bool = False,
            progress: bool | None = None) -> InspectReport:
    """Inspect the pool of ``config`` (YAML path, dict or MergeConfig; it needs a ``base_model``).

    ``out``: folder for ``inspect.json`` and the PNG figures (nothing is written when None); ``density``: kept
    fraction of the global per-expert trim used for sign conflicts (as TIES / NeuroMerging); ``threads``: workers
    (default: CPU cores; the numbers do not depend on it); ``suite``: for per-component mergeability, a
    :class:`~neuromerge.tasks.TaskSet` (any contract object with its experts) or a suite name resolved by the
    registered provider (the bench's; ``quick``/``seed``: its budget and expert seed); with ``config=None`` the
    pool itself is the suite's experts. ``chunk_elements`` bounds the rows read at once, as in ``merge``.
    """
    t_start = time.perf_counter()
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if config is None and suite is None:
        raise ConfigError("give a merge config, or a bench suite whose experts to inspect")
    if out is not None:
        check_output(out, _config_inputs(config))
    retain_freed_memory()
    bar = Progress(progress)
    experts: SuiteExperts | None = None
    kwargs = {"density": density, "threads": threads or os.cpu_count() or 1, "progress": bar,
              "chunk_elements": chunk_elements, "allow_download": allow_download}
    if config is None:
        experts = load_suite_experts(suite, quick=quick, seed=seed, progress=bar)
        with tempfile.TemporaryDirectory(prefix="neuromerge-inspect-") as tmp:
            report = _inspect_config(write_pool(experts, Path(tmp)), **kwargs)
        report.base_model = f"suite {experts.suite.name} (pre-trained backbone)"
        report.experts = [f"suite {experts.suite.name}: expert {t.name}" for t in experts.tasks]
        report.summary = summarize(report.model, report.blocks, report.labels, base=report.base_model,
                                   density=density)
    else:
        report = _inspect_config(config, **kwargs)

    if suite is not None:
        t0 = time.perf_counter()
        report.mergeability = _mergeability(suite, experts, quick=quick, seed=seed, progress=bar)
        if not report.mergeability.available:
            report.warnings.append(report.mergeability.note)
        report.timings_s["mergeability"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            if figures:
                from .figures import write_figures

                report.figures = write_figures(report, out)
            report.timings_s["figures"] = time.perf_counter() - t0
            report.timings_s["total"] = time.perf_counter() - t_start
            report.save(out / "inspect.json")
        except OSError as e:  # unwritable folder, disk full: one line, not a traceback
            raise write_error(out, e) from None
    else:
        report.timings_s["total"] = time.perf_counter() - t_start
    return report


def _config_inputs(config: ConfigSource | None) -> list[Any]:
    """What ``inspect`` reads, for :func:`~neuromerge.io.output_guard.check_output`: the config file and the models
    it names (paths or HF ids, resolved as the merge resolves them); an invalid config is left to the real load."""
    refs: list[Any] = [config] if isinstance(config, str | Path) else []
    if config is None:
        return refs
    try:
        cfg = load_config(config)
    except NeuromergeError:
        return refs
    return [*refs, cfg.base_model, *(m.model for m in cfg.models)]


def _inspect_config(config: ConfigSource, *, density: float, threads: int, progress: Progress,
                    chunk_elements: int, allow_download: bool) -> InspectReport:
    cfg = load_config(config)
    if cfg.base_model is None:
        raise ConfigError("inspect needs a `base_model`: task vectors are the experts' differences from it")
    t0 = time.perf_counter()
    plan = prepare(cfg, allow_download=allow_download, chunk_elements=chunk_elements)
    try:
        t_plan = time.perf_counter() - t0
        report = inspect_plan(plan, density, threads=threads, progress=progress)
    finally:
        plan.pool.close()
    report.timings_s = {"plan": t_plan, **report.timings_s}
    return report


def inspect_plan(plan: MergePlan, density: float = 0.2, *, threads: int = 1, progress: Any = None
                 ) -> InspectReport:
    """Statistics, summary and report of an already built :class:`~neuromerge.engine.plan.MergePlan` (its pool
    stays open; the caller closes it)."""
    bar = progress if callable(progress) else Progress(progress)
    t0 = time.perf_counter()
    with single_threaded_torch(), ThreadPoolExecutor(max_workers=max(1, threads),
                                                     initializer=one_torch_thread) as executor:
        collected = collect(plan, density, executor=executor, progress=bar)
    report = build_report(plan, collected, density)
    report.timings_s["statistics"] = time.perf_counter() - t0
    return report


def expert_labels(paths: list[str]) -> list[str]:
    """Short names for figures: the folder / file name, made unique with ``#i`` where two coincide."""
    names = [Path(p).name or p for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def build_report(plan: MergePlan, collected: Collected, density: float) -> InspectReport:
    """Group the per-tensor sums into tensors, components, blocks and the whole model; add the summary."""
    experts = len(plan.pool.models)
    where = {tp.name: component_of(tp.name) for tp, _ in collected.tensors}
    tensors = [GroupStats.from_sums(tp.name, "tensor", s, histogram=False, block=where[tp.name].block,
                                    component=where[tp.name].name) for tp, s in collected.tensors]
    blocks = [GroupStats.from_sums(name, "block", s, histogram=True)
              for name, s in grouped(((where[tp.name].block, s) for tp, s in collected.tensors), experts,
                                     block_order)]
    components = [GroupStats.from_sums(name, "component", s, histogram=False, block=name.partition("/")[0])
                  for name, s in grouped(((where[tp.name].name, s) for tp, s in collected.tensors), experts,
                                         component_order)]
    model = GroupStats.from_sums("model", "model", total((s for _, s in collected.tensors), experts),
                                 histogram=True)
    paths = [str(m.path) for m in plan.pool.models]
    labels = expert_labels(paths)
    base = str(plan.pool.base.path)
    summary = summarize(model, blocks, labels, base=base, density=density)
    return InspectReport(base_model=base, experts=paths, labels=labels, density=density,
                         thresholds=[float(t) if math.isfinite(t) else None for t in collected.stats.thresholds],
                         model=model, blocks=blocks,
                         components=components, tensors=tensors, summary=summary, warnings=list(plan.warnings))


def _mergeability(suite: str | Any, experts: SuiteExperts | None, *, quick: bool, seed: int, progress: Any
                  ) -> Mergeability:
    from .mergeability import component_mergeability

    try:
        se = experts or load_suite_experts(suite, quick=quick, seed=seed, progress=progress)
    except BenchUnavailable:
        return Mergeability(suite=str(suite), quick=quick, mode="", seed=seed, operator="", reference={}, rows=[],
                            available=False, note=BENCH_MISSING)
    return component_mergeability(se, progress=progress)
