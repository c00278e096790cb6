"""Reports of a benchmark run: a Markdown table, ``results.json``, ``results.md`` and two PNG plots.

- ``normalized_accuracy.png``: per-task normalized accuracy (``100 · acc / acc_expert``) of every row as grouped
  bars (one group per task, one bar per row), with the mean as a last group.
- ``in_vs_out_of_domain.png``: mean in-domain test accuracy against mean out-of-domain score, one point per row
  (the "individual experts" row has no single backbone and no OOD score).

Plots use matplotlib's object API with the Agg canvas (no global backend switch, no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.report import strict_json

if TYPE_CHECKING:
    from .protocol import BenchResults, Row

PLOTS = ("normalized_accuracy.png", "in_vs_out_of_domain.png")


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def _score(results: BenchResults, task: str, value: float | None) -> str:
    metric = next((t["metric"] for t in results.tasks if t["name"] == task), "accuracy")
    return _num(value, 2) if metric == "perplexity" else _pct(value)


def markdown_table(results: BenchResults) -> str:
    """The results table: test accuracy (%) per in-domain task, mean, mean normalized accuracy, OOD score,
    chosen parameters, the transductive flag and wall time."""
    ind, ood = results.in_domain, results.out_of_domain
    latency = any(r.latency_ms for r in results.rows)
    head = ["method", "params", "transductive", *ind, "mean", "norm. mean", *(f"OOD {t}" for t in ood),
            "storage (MB)", *(["latency b1 / b32 (ms)"] if latency else []), "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in results.rows:
        if r.skipped:
            cells = [r.name, f"skipped: {r.skipped}", "yes" if r.transductive else "no",
                     *(["–"] * (len(head) - 3))]
        else:
            lat = [f"{_num(r.latency_ms.get('batch_1'))} / {_num(r.latency_ms.get('batch_32'))}"
                   if r.latency_ms else "–"] if latency else []
            cells = [r.name, _params(r.params) if r.kind != "baseline" else _baseline_params(results),
                     "yes" if r.transductive else "no", *(_score(results, t, r.test.get(t)) for t in ind),
                     _pct(r.mean), _num(r.mean_normalized), *(_score(results, t, r.ood.get(t)) for t in ood),
                     _mb(r.storage_bytes), *lat, _num(r.time_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _baseline_params(results: BenchResults) -> str:
    """The "pretrained + heads" row: linear probes, or zero-shot label words for suites without heads."""
    return "zero-shot label words" if results.suite == "llm" else "linear probes"


def _timings(results: BenchResults) -> str:
    order = ["data", "training", "baselines", "merging", "evaluation", "report", "total"]
    t = results.timings
    keys = [k for k in order if k in t] + [k for k in t if k not in order]
    return ", ".join(f"{k} {t[k]:.1f} s" for k in keys)


def markdown_report(results: BenchResults) -> str:
    """``results.md``: setup, the table, the tuning traces and the timings."""
    b = results.budget
    out = [f"# neuromerge bench {results.suite}{' --quick' if results.quick else ''}", "",
           f"{results.description}. Created {results.created}; seed {results.seed}; experts: {results.mode} "
           f"fine-tuning, {b.get('train_steps')} steps of batch {b.get('batch_size')}{_heads(results)}.", "",
           "Test accuracy (%) per task with each task's expert head; `norm. mean` = mean over in-domain tasks of "
           "100 · acc / acc_expert; OOD = a fresh linear probe on frozen merged features. Hyper-parameters were "
           "chosen on the validation splits (mean validation accuracy over the in-domain tasks).", "",
           markdown_table(results), "", "## Tasks", "",
           "Standard error (points) of a test accuracy p on n examples: 100 · √(p(1−p)/n), at p = the individual "
           "expert's accuracy (in domain) or the pretrained + heads row's (OOD), and at most (p = 0.5).", "",
           "| task | in domain | classes | train / val / test | std. error | std. error at most | source |",
           "|---|---|---:|---|---:|---:|---|"]
    for t in results.tasks:
        s = t["sizes"]
        p = _reference_accuracy(results, t)
        se = "–" if p is None else _num(100 * standard_error(p, s["test"]))
        out.append(f"| {t['name']} | {'yes' if t['in_domain'] else 'no'} | {len(t['classes'])} | "
                   f"{s['train']} / {s['val']} / {s['test']} | {se} | {_num(100 * standard_error(0.5, s['test']))} | "
                   f"{t['source']} |")
    out += ["", "## Validation grids", ""]
    for r in results.rows:
        if r.grid:
            trace = "; ".join(f"{_params(g['params'])}: {_pct(g['val_mean'])}" for g in r.grid)
            out.append(f"- **{r.name}** (chosen {_params(r.params)}): {trace}")
    out += ["", "## Timings", "", _timings(results), ""]
    return "\n".join(out)


def _heads(results: BenchResults) -> str:
    """``", heads frozen"`` (or trained) when the experts record their head protocol (text, vision)."""
    heads = sorted({str(e.get("meta", {}).get("heads")) for e in results.experts.values()
                    if e.get("meta", {}).get("heads")})
    if not heads:
        return ""
    what = {"frozen": "frozen at the base probe", "trained": "trained with the backbone"}
    return ", heads " + " / ".join(what.get(h, h) for h in heads)


def standard_error(p: float, n: int) -> float:
    """Standard error ``√(p(1−p)/n)`` of an accuracy ``p`` measured on ``n`` independent examples (binomial); NaN
    when ``n`` is 0."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def _reference_accuracy(results: BenchResults, task: dict[str, Any]) -> float | None:
    """The accuracy a task's standard error is given at: its expert's (in domain) or the base row's (OOD); None
    for a perplexity task or when the row is missing."""
    if task.get("metric", "accuracy") != "accuracy":
        return None
    name = task["name"]
    for r in results.rows:
        if task["in_domain"] and r.kind == "experts" and name in r.test:
            return r.test[name]
        if not task["in_domain"] and r.kind == "baseline" and name in r.ood:
            return r.ood[name]
    return None


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _plotted(results: BenchResults) -> list[Row]:
    return [r for r in results.rows if not r.skipped and r.kind != "experts"]


def plot_normalized(results: BenchResults, path: Path) -> None:
    rows = _plotted(results)
    groups = [*results.in_domain, "mean"]
    fig, ax = _figure(max(6.0, 1.2 * len(groups) + 0.25 * len(rows) * len(groups) / 2), 4.2 + 0.2 * len(rows) / 4)
    width = 0.8 / max(1, len(rows))
    cmap = _colors(len(rows))
    shown: list[float] = []
    for j, r in enumerate(rows):
        vals = [r.normalized.get(t, float("nan")) for t in results.in_domain] + [r.mean_normalized or float("nan")]
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, vals, width=width, label=r.name, color=cmap[j])
        shown += [v for v in vals if not math.isnan(v)]
    if shown:  # zoom on the bars: differences of a few points are the point of the plot
        ax.set_ylim(max(0.0, 5 * math.floor(min(shown) / 5) - 5), max(105.0, max(shown) + 2))
    ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("normalized accuracy (% of expert)")
    ax.set_title(f"{results.suite}: per-task normalized test accuracy")
    ax.legend(fontsize=7, ncol=min(4, max(1, len(rows))), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path)


def plot_in_vs_out(results: BenchResults, path: Path) -> None:
    fig, ax = _figure(6.0, 4.5)
    rows = [r for r in _plotted(results) if r.mean is not None]
    cmap = _colors(len(rows))
    for j, r in enumerate(rows):
        y = r.ood_mean
        ax.scatter([100 * r.mean], [100 * y if y is not None else float("nan")], color=cmap[j], label=r.name)
        if y is not None:
            ax.annotate(r.name, (100 * r.mean, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean in-domain test accuracy (%)")
    ax.set_ylabel("out-of-domain score (%, fresh probe)" if results.out_of_domain else "no out-of-domain task")
    ax.set_title(f"{results.suite}: in-domain vs out-of-domain")
    fig.tight_layout()
    fig.savefig(path)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def write_report(results: BenchResults, out: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out`` (created); returns the paths."""
    import time

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", *(out / p for p in PLOTS)]
    plot_normalized(results, paths[2])
    plot_in_vs_out(results, paths[3])
    results.timings["report"] = time.perf_counter() - t0
    if "total" in results.timings:
        results.timings["total"] += results.timings["report"]
    paths[1].write_text(markdown_report(results))
    paths[0].write_text(json.dumps(strict_json(results.to_dict()), indent=2, default=str) + "\n")
    return paths


