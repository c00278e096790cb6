"""Offline benchmark suites: experts trained once and cached, merges tuned on validation splits, reports.

``neuromerge.bench.run("text", methods=["ties", "neuromerging"], quick=True)`` returns a
:class:`~neuromerge.bench.protocol.BenchResults`; ``neuromerge bench text --quick`` is the same from the command
line. The suites are listed by :func:`available_suites` (``text``, ``vision``, ``llm``); see ``docs/bench.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .suites import HEADS, BenchError, available_suites, get_suite, with_heads
from .tasksets import register as _register_suites

_register_suites()  # the library resolves `suite: NAME` (search configs, inspect --suite) through the bench

if TYPE_CHECKING:
    from .protocol import BenchResults
    from .suite import Suite

__all__ = ["HEADS", "BenchError", "available_suites", "combine", "get_suite", "recompute", "run", "with_heads"]


def run(suite: str | Suite, methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
        quick: bool = False, out: str | Path | None = None, rebuild: bool = False, model: str | Path | None = None,
        task_file: str | Path | None = None, seed: int = 0, progress: bool | None = None, mode: str | None = None,
        seeds: Sequence[int] | None = None, heads: str | None = None, paper_defaults: bool | None = None
        ) -> BenchResults:
    """Benchmark merge methods on a suite (protocol: :mod:`neuromerge.bench.protocol`).

    ``methods``: registry names or aliases (default: the papers' static methods with a grid,
    ``grids.DEFAULT_METHODS`` — with ``quick``, the suite's ``quick_methods`` where it has some (llm: TA, TIES,
    NeuroMerging); none when ``model`` is given);
    ``tasks``: a subset of the suite's task names (default: all, OOD included); ``quick``: small subsets, short
    training, capped grids; ``out``: folder for ``results.json``, ``results.md`` and the plots (nothing is written
    when None); ``rebuild``: retrain cached experts and probes; ``model``: also score an existing merged model
    folder (its backbone tensors, the experts' heads); ``task_file``: a YAML file of extra tasks
    (:mod:`neuromerge.bench.taskfile`); ``seed``: expert training and random merges (splits are fixed);
    ``progress``: tqdm bars on stderr (default: when stderr is a terminal); ``mode``: expert fine-tuning (``full``
    or ``lora``; default the suite's first mode — routed LoRA methods such as MIN-Merging need ``lora``);
    ``seeds``: several seeds (experts trained per seed, the same splits), e.g. ``[0, 1, 2]`` — ``rows`` are then
    means over the seeds, ``per_seed`` holds each seed's rows and ``statistics`` the 95 % t-intervals and the
    paired-bootstrap comparisons (docs/bench.md, "Statistics"); ``seed`` is the one seed when ``seeds`` is None.
    With ``out``, every finished (seed, row) is written there at once, and the same call again resumes.
    ``heads``: the experts' head protocol on suites with task heads (text, vision): ``"frozen"`` (default: heads fit
    on θ0 and fixed while the experts train, as in the papers) or ``"trained"`` (zero heads trained with the
    backbone); see :func:`~neuromerge.bench.suites.with_heads`; ``paper_defaults``: also score every static method
    with parameters once at its paper defaults, without validation (:data:`~neuromerge.bench.grids.PAPER_DEFAULTS`,
    rows ``"<method> (paper default)"``; default: in the normal budget, not with ``quick``).
    """
    from .protocol import run_suite

    if heads is not None:
        suite = with_heads(get_suite(suite) if isinstance(suite, str) else suite, heads)

    return run_suite(suite, methods, tasks, quick=quick, out=out, rebuild=rebuild, model=model,
                     task_file=task_file, seed=seed, progress=progress, mode=mode, seeds=seeds,
                     paper_defaults=paper_defaults)


def combine(folders: Sequence[str | Path], out: str | Path) -> BenchResults:
    """Merge finished run folders of one protocol that differ by their seeds into one report in ``out`` (a new
    folder): :func:`neuromerge.bench.combining.combine_runs`."""
    from .combining import combine_runs

    return combine_runs(folders, out)


def recompute(results_json: str | Path | dict) -> BenchResults:  # type: ignore[type-arg]
    """Every table and figure of a ``results.json`` rebuilt from its per-example correctness
    (:func:`neuromerge.bench.stats.recompute`)."""
    from .stats import recompute as _recompute

    return _recompute(results_json)
