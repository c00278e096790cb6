"""The bench's statistics over seeds and test examples (formulas: :mod:`neuromerge.evaluation.statistics` and
``docs/bench.md``, "Statistics"), the mean rows of a several-seed run, and :func:`recompute`, which rebuilds every
table and figure of a ``results.json`` from its per-example correctness alone.

- **Intervals**: per row, per task and for the means, ``x̄ ± t_{0.975, S−1} s/√S`` over the seeds (accuracies and
  normalized accuracies in %, in-domain and OOD; perplexities as they are); with one seed, none.
- **Comparisons**: every method (and ``--model``) row against Task Arithmetic and against TIES when the table has
  them: the paired, task-stratified bootstrap of the difference in mean normalized accuracy (B = 10,000, RNG seed
  0, percentile interval), the experts' accuracies held fixed as the table's denominators, over the seeds both rows
  have. Holm's adjustment runs over all comparisons of the table (α = 0.05).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..evaluation import statistics as st

if TYPE_CHECKING:
    from .protocol import BenchResults, Row

#: rows every method is compared with (registry names), when the table has them
REFERENCES = ("task_arithmetic", "ties")
ALPHA = 0.05
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------------- mean rows
def _nanmean(values: list[float]) -> float:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return sum(xs) / len(xs) if xs else float("nan")


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def mean_rows(per_seed: Mapping[int, list[Row]]) -> list[Row]:
    """One row per name: the mean over the seeds that computed it (skipped seeds left out) of every score; the
    parameters when all seeds chose the same, else each seed's; time = mean wall time per seed."""
    from .protocol import Row

    order: list[str] = []
    by_name: dict[str, list[Row]] = {}
    for rows in per_seed.values():
        for r in rows:
            if r.name not in by_name:
                order.append(r.name)
                by_name[r.name] = []
            by_name[r.name].append(r)
    out = []
    for name in order:
        group = by_name[name]
        done = [r for r in group if not r.skipped]
        first = group[0]
        row = Row(name=name, kind=first.kind, method=first.method, transductive=first.transductive)
        if not done:
            row.skipped = first.skipped
            row.params = dict(first.params)
            out.append(row)
            continue
        same = all(r.params == done[0].params for r in done)
        row.params = dict(done[0].params) if same else {
            "per seed": "; ".join(f"{r.seed}: {_params_text(r.params)}" for r in done)}
        for part in ("test", "normalized", "ood"):
            keys = list(dict.fromkeys(k for r in done for k in getattr(r, part)))
            setattr(row, part, {k: _nanmean([getattr(r, part).get(k, float("nan")) for r in done]) for k in keys})
        row.ood_metrics = {k: v for r in done for k, v in r.ood_metrics.items()}
        vals = [r.val_mean for r in done if r.val_mean is not None]
        row.val_mean = sum(vals) / len(vals) if vals else None
        row.time_s = sum(r.time_s for r in done) / len(done)
        row.storage_bytes = done[0].storage_bytes
        row.latency_ms = {k: _nanmean([r.latency_ms.get(k, float("nan")) for r in done]) for k in done[0].latency_ms}
        row.info = {"seeds": [r.seed for r in done]}
        if len(done) < len(group):
            row.info["skipped in seeds"] = {str(r.seed): r.skipped for r in group if r.skipped}
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------- intervals
def _scale(metric: str) -> float:
    return 1.0 if metric == "perplexity" else 100.0


def _interval(values: list[float]) -> dict[str, Any] | None:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return st.t_interval(xs, CONFIDENCE).to_dict() if xs else None


def row_intervals(rows: list[Row], metrics: Mapping[str, str]) -> dict[str, Any]:
    """t-intervals over the seeds of one row's ``rows`` (one per seed, skipped ones left out): per in-domain task
    (``test`` in %, ``normalized``), per OOD task, and the means (``mean``, ``mean_normalized``, ``ood_mean``)."""
    done = [r for r in rows if not r.skipped]
    out: dict[str, Any] = {"seeds": [r.seed for r in done]}
    for part in ("test", "normalized", "ood"):
        keys = list(dict.fromkeys(k for r in done for k in getattr(r, part)))
        factor = (lambda k: 1.0) if part == "normalized" else (lambda k: _scale(metrics.get(k, "accuracy")))
        out[part] = {k: _interval([factor(k) * getattr(r, part)[k] for r in done if k in getattr(r, part)])
                     for k in keys}
    for key, scale in (("mean", 100.0), ("mean_normalized", 1.0), ("ood_mean", 100.0)):
        vals = [getattr(r, key) for r in done]
        out[key] = _interval([scale * v for v in vals if v is not None])
    return out


# --------------------------------------------------------------------------------------------------- bootstrap
def _comparable(row: Row | None, tasks: list[str]) -> bool:
    return row is not None and not row.skipped and all(t in row.examples for t in tasks)


def comparisons(per_seed: Mapping[int, list[Row]], tasks: list[str], *, replicates: int = st.BOOTSTRAP_REPLICATES,
                seed: int = st.BOOTSTRAP_SEED) -> tuple[list[dict[str, Any]], str | None]:
    """Paired bootstraps of every method / model row against each reference row (:data:`REFERENCES`) over the
    in-domain accuracy ``tasks``, Holm-adjusted together; returns ``(comparisons, why none)``."""
    if not tasks:
        return [], "no in-domain accuracy task"
    seeds = list(per_seed)
    table = {sd: {r.name: r for r in rows} for sd, rows in per_seed.items()}
    names = list(dict.fromkeys(r.name for rows in per_seed.values() for r in rows
                               if r.kind in ("method", "model")))
    refs = [n for n in REFERENCES if any(_comparable(table[sd].get(n), tasks) for sd in seeds)]
    if not refs:
        return [], "no Task Arithmetic or TIES row with per-example results"
    experts = {sd: table[sd].get("individual experts") for sd in seeds}
    # one bootstrap per task over every (row, seed) column: the same counts for every row (the pairing)
    cols: dict[tuple[str, int], int] = {}
    mats: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for sd in seeds:
        for n in names:
            r = table[sd].get(n)
            if _comparable(r, tasks) and experts[sd] is not None:
                cols[(n, sd)] = len(cols)
                for t in tasks:
                    mats[t].append(st.unpack_correct(r.examples[t]))
    if not cols:
        return [], "no row has per-example results"
    sizes = {t: {m.size for m in mats[t]} for t in tasks}
    bad = [t for t, s in sizes.items() if len(s) != 1]
    if bad:
        return [], f"task {bad[0]!r} has test splits of different sizes across rows or seeds"
    reps = st.bootstrap_accuracies({t: np.stack(mats[t], 1) for t in tasks}, replicates=replicates, seed=seed)
    out: list[dict[str, Any]] = []
    for ref in refs:
        for n in names:
            if n == ref:
                continue
            both = [sd for sd in seeds if (n, sd) in cols and (ref, sd) in cols]
            if not both:
                continue
            ia, ib = [cols[(n, sd)] for sd in both], [cols[(ref, sd)] for sd in both]
            den = {t: np.array([experts[sd].test[t] for sd in both]) for t in tasks}  # type: ignore[union-attr]
            d = st.difference_from_replicates({t: reps[t][:, ia] for t in tasks}, {t: reps[t][:, ib] for t in tasks},
                                              den, CONFIDENCE)
            out.append({"method": n, "reference": ref, "seeds": both, **d.to_dict()})
    for c, p in zip(out, st.holm([c["p_value"] for c in out]), strict=True):
        c["p_holm"] = p
        c["significant"] = p <= ALPHA
    return out, None


def statistics(results: BenchResults, *, replicates: int = st.BOOTSTRAP_REPLICATES) -> dict[str, Any]:
    """Intervals of every row over the seeds and the bootstrap comparisons of ``results`` (module doc)."""
    metrics = {t["name"]: t.get("metric", "accuracy") for t in results.tasks}
    by_name: dict[str, list[Row]] = {}
    for rows in results.per_seed.values():
        for r in rows:
            by_name.setdefault(r.name, []).append(r)
    tasks = [t["name"] for t in results.tasks if t["in_domain"] and t.get("metric", "accuracy") == "accuracy"]
    comps, why = comparisons(results.per_seed, tasks, replicates=replicates)
    return {"seeds": list(results.per_seed), "confidence": CONFIDENCE,
            "intervals": {n: row_intervals(rows, metrics) for n, rows in by_name.items()},
            "comparisons": comps, "comparisons_note": why,
            "bootstrap": {"replicates": replicates, "rng_seed": st.BOOTSTRAP_SEED, "interval": "percentile",
                          "stratified_by": "task", "tasks": tasks, "references": list(REFERENCES),
                          "multiple_comparisons": f"Holm over the {len(comps)} comparisons of this table, "
                                                  f"alpha = {ALPHA}",
                          "mdd_factor": st.MDD_FACTOR}}


# --------------------------------------------------------------------------------------------------- recompute
def recompute(results_json: str | Path | Mapping[str, Any]) -> BenchResults:
    """Every table and figure of a ``results.json`` (a path or its parsed content) from its per-example
    correctness: each seed's accuracies are the means of the stored bits, normalized accuracies divide them by that
    seed's expert accuracy (the "individual experts" row), then the mean rows and the statistics are computed
    again. Scores without per-example data (perplexities) are taken as stored. Returns the rebuilt results
    (``.rows``, ``.statistics``, ``.markdown()``)."""
    from .protocol import EXPERT_ROW, Row, assemble, normalized_accuracy

    data = json.loads(Path(results_json).read_text(encoding="utf-8")) if isinstance(results_json, str | Path) \
        else dict(results_json)
    metrics = {t["name"]: t.get("metric", "accuracy") for t in data["tasks"]}
    in_domain = {t["name"] for t in data["tasks"] if t["in_domain"]}
    per_seed: dict[int, list[Row]] = {}
    for sd_text, rows in data["per_seed"].items():
        built = [Row.from_dict(r) for r in rows]
        experts = next((r for r in built if r.name == EXPERT_ROW), None)
        for r in built:
            if r.skipped or r.kind == "experts":
                continue
            for task, packed in r.examples.items():
                acc = float(np.mean(st.unpack_correct(packed))) if packed.split(":", 1)[0] != "0" else float("nan")
                if task in in_domain:
                    r.test[task] = acc
                    if experts is not None and task in experts.test:
                        r.normalized[task] = normalized_accuracy(acc, experts.test[task], metrics.get(task,
                                                                                                       "accuracy"))
                else:
                    r.ood[task] = acc
        per_seed[int(sd_text)] = built
    env = {int(k): v for k, v in (data.get("environment") or {}).items()}
    return assemble(data["suite"], data.get("description", ""), bool(data.get("quick")), data.get("mode", ""),
                    data.get("budget", {}), data["tasks"], data.get("experts", {}), per_seed,
                    dict(data.get("timings", {})), env, data.get("created", ""))
