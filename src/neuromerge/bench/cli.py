"""``neuromerge bench``: the command-line side of :func:`neuromerge.bench.run`."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import typer

from ..errors import NeuromergeError
from ..io.output_guard import check_output
from .suites import BenchError


def split_list(value: str | None, what: str) -> list[str] | None:
    """``"a, b"`` → ``["a", "b"]``; None stays None; an empty list is an error."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise BenchError(f"--{what} needs at least one name")
    return items


def parse_seeds(value: str | None) -> list[int] | None:
    """``"0,1,2"`` → ``[0, 1, 2]`` (None stays None); anything but distinct non-negative integers is an error."""
    items = split_list(value, "seeds")
    if items is None:
        return None
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise BenchError(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {value!r})") from None
    if any(s < 0 for s in out) or len(set(out)) != len(out):
        raise BenchError(f"--seeds takes distinct non-negative integers (got {value!r})")
    return out


def combine_command(runs: list[Path], out: Path) -> int:
    """``neuromerge bench combine RUN… -o OUT``: print the combined table and where the report is; 2 on bad input."""
    from . import combine

    try:
        results = combine(runs, out)
    except NeuromergeError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except OSError as err:
        typer.echo(f"error: cannot write or read {err.filename or out}: {err.strerror or err}", err=True)
        return 2
    typer.echo(results.markdown())
    typer.echo(f"\ncombined {len(runs)} runs (seeds {', '.join(map(str, results.seeds))}) into {out}")
    return 0


def default_out(suite: str) -> Path:
    """``bench-results/<suite>-<YYYYmmdd-HHMMSS>``."""
    return Path("bench-results") / f"{suite}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def bench_command(suite: str, *, methods: str | None = None, tasks: str | None = None, quick: bool = False,
                  out: Path | None = None, rebuild: bool = False, model: Path | None = None,
                  task_file: Path | None = None, seed: int = 0, progress: bool = True, threads: int | None = None,
                  mode: str | None = None, seeds: str | None = None, heads: str | None = None,
                  paper_defaults: bool | None = None) -> int:
    """Run a suite, print the Markdown table and where the report is; returns the exit code (2: bad input).
    ``threads`` sets torch's intra-op threads for this process (on a machine shared with other jobs, 1 thread
    avoids the stalls of a thread pool that waits for descheduled workers)."""
    from . import run

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        folder = out or default_out(suite)
        check_output(folder, [model, task_file])  # a report folder must not replace the model or task file it reads
        results = run(suite, methods=split_list(methods, "methods"), tasks=split_list(tasks, "tasks"),
                      quick=quick, out=folder, rebuild=rebuild, model=model, task_file=task_file, seed=seed,
                      progress=progress, mode=mode, seeds=parse_seeds(seeds), heads=heads,
                      paper_defaults=paper_defaults)
    except NeuromergeError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except OSError as err:  # disk full, read-only file system, a report path that is a file…
        where = f" {err.filename}" if err.filename else f" {folder}"
        typer.echo(f"error: cannot write or read{where}: {err.strerror or err}", err=True)
        return 2
    typer.echo(results.markdown())
    several = len(results.per_seed) > 1
    skipped = [r for rows in results.per_seed.values() for r in rows if r.skipped] or [
        r for r in results.rows if r.skipped]
    for r in skipped:
        typer.echo(f"note: {r.name}{f' (seed {r.seed})' if several else ''} skipped: {r.skipped}", err=True)
    failed = list(dict.fromkeys(r.name for r in skipped if (r.skipped or "").startswith("failed")))
    t = results.timings
    if several:
        typer.echo(f"\nseeds {', '.join(map(str, results.seeds))}: cells are mean ± half-width of the 95 % t-interval; "
                   "comparisons against Task Arithmetic and TIES in results.md")
    typer.echo(f"\nreport written to {folder} (results.md, results.json, plots) in {t['total']:.0f} s "
               f"(training {t.get('training', 0):.0f} s, merging {t.get('merging', 0):.0f} s, "
               f"evaluation {t.get('evaluation', 0) + t.get('baselines', 0):.0f} s)")
    if failed:
        typer.echo(f"error: {len(failed)} method(s) failed: {', '.join(failed)} (see the tracebacks above)", err=True)
        return 1
    return 0
