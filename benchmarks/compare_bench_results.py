"""Compare two `neuromerge bench` results.json files, ignoring what legitimately differs between runs.

Used to check that a refactoring leaves the suites' tables unchanged:

    NEUROMERGE_CACHE=/tmp/c1 neuromerge bench text --quick --threads 1 -o before/text   # on the old commit
    NEUROMERGE_CACHE=/tmp/c2 neuromerge bench text --quick --threads 1 -o after/text    # on the new commit
    python benchmarks/compare_bench_results.py before/text/results.json after/text/results.json

Prints every differing field and exits 1 when a field other than timings, creation time, output paths and cache
paths differs (0: the same numbers).
"""

from __future__ import annotations

import json
import sys
from typing import Any

#: fields that differ between two runs of the same code: wall-clock times, dates, where things were written
VOLATILE = ("seconds", "timings", "latency", "time_s", "created", "out", "adapter_dir", "cached", "peak_rss")


def differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Every ``(path, value in a, value in b)`` where the two JSON documents differ, in document order."""
    if type(a) is not type(b):
        return [(path, a, b)]
    if isinstance(a, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                out.append((f"{path}/{key}", a.get(key, "<absent>"), b.get(key, "<absent>")))
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [(path, f"{len(a)} items", f"{len(b)} items")]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def volatile(path: str) -> bool:
    """A field under a volatile key (``/timings/…``, ``…/train_seconds``, ``/created``)."""
    parts = [p.split("[")[0] for p in path.split("/") if p]
    return any(v in part for part in parts for v in VOLATILE)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    with open(argv[0], encoding="utf-8") as fa, open(argv[1], encoding="utf-8") as fb:
        diffs = differences(json.load(fa), json.load(fb))
    real = [d for d in diffs if not volatile(d[0])]
    for path, x, y in real:
        print(f"{path}: {x!r} -> {y!r}")
    print(f"{len(diffs)} differing fields, {len(diffs) - len(real)} of them timings / dates / paths; "
          f"{len(real)} others")
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
