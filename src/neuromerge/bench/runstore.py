"""A run folder's finished rows, so that a killed run resumes and separate seeds combine.

Layout of a report folder ``OUT``::

    OUT/run.json                      what the rows were computed with (the run's identity, below) and its seeds
    OUT/rows/seed-<s>/environment.json  machine, threads and package versions of the process that ran seed s
    OUT/rows/seed-<s>/<row>.json      one finished row of seed s (scores, parameters, per-example correctness)
    OUT/results.json, results.md, *.png   the report (rewritten at the end of every run)

Every file is written to a temporary sibling and renamed into place (:func:`write_atomic`), so a kill loses at
most the row in progress. A rerun with the same ``-o`` reads the finished rows of its seeds and computes only the
others, after checking that the folder's identity matches its own: suite, suite fingerprint (backbone, versions,
training hyper-parameters), tasks with their split fingerprints, budget, expert mode, ``--quick`` and ``--model``.
A folder of another identity is refused with a :class:`~.suites.BenchError`, never mixed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .suites import BenchError

RUN_FORMAT = 1
RUN_FILE = "run.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and :func:`os.replace` (atomic on POSIX), fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json(obj: Any) -> str:
    from ..evaluation.report import strict_json

    return json.dumps(strict_json(obj), indent=1, default=str) + "\n"


def row_file(out: Path, seed: int, name: str) -> Path:
    """``OUT/rows/seed-<s>/<slug of the row name>.json``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "row"
    return out / "rows" / f"seed-{seed}" / f"{slug}.json"


def environment() -> dict[str, Any]:
    """Where this process runs: platform, machine, processor, CPU count, torch threads, Python and package
    versions (torch, neuromerge, transformers, numpy; None when not installed)."""
    import importlib.metadata
    import platform

    import torch

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "versions": {p: version(p) for p in ("torch", "neuromerge", "transformers", "numpy")}}


def identity(suite_name: str, suite_fingerprint: dict[str, Any], tasks: list[dict[str, Any]], budget: dict[str, Any],
             mode: str, quick: bool, model: str | None) -> dict[str, Any]:
    """What rows of one run folder must share (JSON-normalized, so a read-back copy compares equal)."""
    ident = {"format": RUN_FORMAT, "suite": suite_name, "suite_fingerprint": suite_fingerprint, "tasks": tasks,
             "budget": budget, "mode": mode, "quick": quick, "model": model}
    return json.loads(_json(ident))


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_run(out: Path) -> dict[str, Any] | None:
    """``OUT/run.json`` (None when absent); a :class:`BenchError` when unreadable."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchError(f"{path} is not a bench run file ({err}); use another -o folder") from None
    if not isinstance(data, dict) or not {"identity", "seeds", "rows"} <= set(data):
        raise BenchError(f"{path} is not a bench run file (no identity, seeds and rows); use another -o folder")
    return data


def open_run(out: Path, ident: dict[str, Any], seeds: Sequence[int], rows: Sequence[str]) -> None:
    """Start or resume the run folder ``out`` for ``seeds`` and the row names ``rows``: refuse a folder whose rows
    belong to another run (identity differs, or report files without a ``run.json``), then record the identity
    and the unions of seeds and of row names (in first-seen order)."""
    existing = read_run(out)
    if existing is None:
        if (out / "results.json").exists():
            raise BenchError(f"{out} holds a report without {RUN_FILE} (an older format): use another -o folder")
        known: list[int] = []
        names: list[str] = []
    else:
        diff = differences(existing["identity"], ident)
        if diff:
            raise BenchError(f"{out} holds rows of another run (different {', '.join(diff)}); use another -o folder "
                             "or the same settings as that run")
        known = [int(s) for s in existing["seeds"]]
        names = [str(n) for n in existing["rows"]]
    write_run(out, ident, known + [s for s in seeds if s not in known], names + [n for n in rows if n not in names])


def write_run(out: Path, ident: dict[str, Any], seeds: Sequence[int], rows: Sequence[str]) -> None:
    """``OUT/run.json``: the run's identity, its seeds and its row names (atomic)."""
    write_atomic(out / RUN_FILE, _json({"identity": ident, "seeds": list(seeds), "rows": list(rows)}))


def save_row(out: Path, seed: int, row: Any) -> None:
    """Write one finished row of ``seed`` atomically."""
    write_atomic(row_file(out, seed, row.name), _json(row.to_dict()))


def load_row(out: Path, seed: int, name: str) -> Any | None:
    """The finished row ``name`` of ``seed`` (None when absent or unreadable: it is then recomputed)."""
    from .protocol import Row

    path = row_file(out, seed, name)
    try:
        return Row.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def save_environment(out: Path, seed: int, env: dict[str, Any]) -> None:
    write_atomic(out / "rows" / f"seed-{seed}" / "environment.json", _json(env))


def load_environment(out: Path, seed: int) -> dict[str, Any]:
    try:
        return json.loads((out / "rows" / f"seed-{seed}" / "environment.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
