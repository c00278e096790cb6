"""``neuromerge bench combine RUN… -o OUT``: finished runs of one protocol, made separately (other seeds, other
machines or days), merged into one report with intervals over all their seeds.

The runs must share one identity (:mod:`.runstore`: suite, suite fingerprint, tasks and their splits, budget,
mode, ``--quick``, ``--model``) and have no seed in common; every row a run lists must be finished for each of its
seeds (resume an interrupted run with its own command first). ``OUT`` is a new run folder: the rows and
environments are copied there, so it can be combined again, and the report is written as by a run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import runstore
from .suites import BenchError


def _results_json(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def combine_runs(folders: Sequence[str | Path], out: str | Path) -> Any:
    """Merge the run folders ``folders`` into a new report folder ``out`` (module doc); returns the
    :class:`~.protocol.BenchResults` of all their seeds. Errors (:class:`BenchError`): fewer than two folders, a
    folder that is not a run, runs of different identities, a seed in two runs, an unfinished row, or an ``out``
    that is one of the runs or is not empty."""
    from .protocol import assemble

    paths = [Path(f) for f in folders]
    target = Path(out)
    if len(paths) < 2:
        raise BenchError("bench combine needs at least two run folders")
    if len({p.resolve() for p in paths}) != len(paths):
        raise BenchError("bench combine: a run folder is given twice")
    if any(target.resolve() == p.resolve() for p in paths):
        raise BenchError(f"bench combine: the output {target} is one of the runs; give a new folder")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BenchError(f"bench combine: the output {target} exists and is not an empty folder")
    runs = []
    for p in paths:
        if not p.is_dir():
            raise BenchError(f"bench combine: {p} is not a folder")
        run = runstore.read_run(p)
        if run is None:
            raise BenchError(f"bench combine: {p} is not a bench run folder (no {runstore.RUN_FILE})")
        runs.append(run)
    ident = runs[0]["identity"]
    for p, run in zip(paths[1:], runs[1:], strict=True):
        diff = runstore.differences(ident, run["identity"])
        if diff:
            raise BenchError(f"bench combine: {p} is not the same protocol as {paths[0]} (different "
                             f"{', '.join(diff)}); only runs that differ by their seeds combine")
    owner: dict[int, Path] = {}
    for p, run in zip(paths, runs, strict=True):
        for s in run["seeds"]:
            if int(s) in owner:
                raise BenchError(f"bench combine: seed {s} is in both {owner[int(s)]} and {p}")
            owner[int(s)] = p
    names = list(dict.fromkeys(n for run in runs for n in run["rows"]))
    per_seed: dict[int, list[Any]] = {}
    env: dict[int, dict[str, Any]] = {}
    for p, run in zip(paths, runs, strict=True):
        for s in (int(x) for x in run["seeds"]):
            rows = {n: runstore.load_row(p, s, n) for n in run["rows"]}
            missing = [n for n, r in rows.items() if r is None]
            if missing:
                raise BenchError(f"bench combine: {p} seed {s} is unfinished (no row {', '.join(missing)}); resume "
                                 "it with its own command and -o first")
            per_seed[s] = [rows[n] for n in names if n in rows]
            env[s] = runstore.load_environment(p, s)
    # the new folder holds every row, so it resumes and combines like a run
    target.mkdir(parents=True, exist_ok=True)
    for p, run in zip(paths, runs, strict=True):
        for s in (int(x) for x in run["seeds"]):
            shutil.copytree(p / "rows" / f"seed-{s}", target / "rows" / f"seed-{s}")
    runstore.write_run(target, ident, sorted(per_seed), names)
    first = _results_json(paths[0])
    timings: dict[str, float] = {}
    for p in paths:
        for k, v in (_results_json(p).get("timings") or {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
    import datetime

    seeds = sorted(per_seed)
    results = assemble(ident["suite"], first.get("description", ""), bool(ident["quick"]), ident["mode"],
                       ident["budget"], ident["tasks"], first.get("experts", {}), {s: per_seed[s] for s in seeds},
                       timings, {s: env[s] for s in seeds},
                       datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    from .report import write_report

    results.out = str(target)
    write_report(results, target)
    return results
