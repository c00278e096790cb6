"""Wall time of one MERGE search with in-process evaluation, 1 worker and 2 workers (Optuna RDB on PostgreSQL).

The same search (suite, tasks, seed, budget, population) runs three times:

* ``local`` — ``neuromerge search`` evaluating in process (no database);
* ``workers_1`` / ``workers_2`` — the coordinator proposes each generation and queues its configurations in an
  Optuna study on a throwaway PostgreSQL server on loopback
  (:func:`neuromerge.search.local_postgres.throwaway_postgres`); 1 or 2 ``neuromerge search-worker`` processes
  evaluate them.

Every process uses one torch thread (``OMP_NUM_THREADS=1``), so on a 2-core machine two workers can at best halve
the evaluation time; the coordinator's surrogate and bookkeeping stay serial. Printed (JSON): the search wall time
of each run (``timings_s.search`` of the report: proposal + exact evaluations, excluding expert loading and the
reference points), the speed-up, and whether the three archives are identical (they must be: results are fed back
in proposal order). Experts come from the bench cache (trained on first use).

    python benchmarks/search_workers.py                       # text suite, quick budget, 60 evaluations
    python benchmarks/search_workers.py --budget 100 --out results-search-workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def run_search(cfg: dict[str, Any], out: Path, env: dict[str, str], workers: int, url: str | None) -> dict[str, Any]:
    """One search; with ``url``, ``workers`` worker processes serve it. Returns the report and the archive."""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, **({"storage_url": url} if url else {})}))
    procs = [subprocess.Popen([sys.executable, "-m", "neuromerge.cli", "search-worker", str(path), "--max-idle", "600"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers if url else 0)]
    t0 = time.perf_counter()
    try:
        coord = subprocess.run([sys.executable, "-m", "neuromerge.cli", "search", str(path), "-o", str(out),
                                "--no-progress"], env=env, capture_output=True, text=True, check=False)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    if coord.returncode != 0:
        raise SystemExit(f"search failed:\n{coord.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"workers": workers if url else 0, "search_s": report["timings_s"]["search"],
            "total_s": time.perf_counter() - t0, "evaluations": report["evaluations"],
            "archive": json.loads((out / "archive.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="text")
    ap.add_argument("--tasks", default=None, help="comma-separated in-domain tasks (default: all)")
    ap.add_argument("--full", action="store_true", help="the suite's normal budget (default: --quick)")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from neuromerge.search.local_postgres import throwaway_postgres

    cfg: dict[str, Any] = {"suite": args.suite, "quick": not args.full, "budget": args.budget,
                           "population": args.population}
    if args.tasks:
        cfg["tasks"] = args.tasks.split(",")
    if args.val_limit:
        cfg["val_limit"] = args.val_limit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = []
    with tempfile.TemporaryDirectory(prefix="nm-search-bench-") as tmp:
        root = Path(tmp)
        runs.append(run_search(cfg, root / "local", env, 0, None))
        with throwaway_postgres() as url:
            for w in (1, 2):
                cfg_w = {**cfg, "study_name": f"bench-{w}"}
                runs.append(run_search(cfg_w, root / f"workers-{w}", env, w, url))
    same = all(r["archive"] == runs[0]["archive"] for r in runs[1:])
    doc = {
        "config": cfg, "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
        "runs": {("local" if r["workers"] == 0 else f"workers_{r['workers']}"):
                 {k: v for k, v in r.items() if k != "archive"} for r in runs},
        "speedup_2_vs_1_workers": runs[1]["search_s"] / runs[2]["search_s"],
        "archives_identical": same, "front_size": len(runs[0]["archive"]),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
