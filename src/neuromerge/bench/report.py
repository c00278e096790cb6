"""Reports of a benchmark run: a Markdown table, ``results.json``, ``results.md`` and two PNG plots.

- ``normalized_accuracy.png``: per-task normalized accuracy (``100 · acc / acc_expert``) of every row as grouped
  bars (one group per task, one bar per row), with the mean as a last group.
- ``in_vs_out_of_domain.png``: mean in-domain test accuracy against mean out-of-domain score, one point per row
  (the "individual experts" row has no single backbone and no OOD score).

With several seeds, every cell is ``mean ± half-width`` of the 95 % t-interval over the seeds and the plots carry
those intervals as error bars; a "Comparisons" table gives the paired bootstrap against Task Arithmetic and TIES
(:mod:`.stats`). With one seed there is no interval ("n/a (1 seed)"), never a fake one.

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


def _interval(results: BenchResults, row: str, part: str, key: str | None = None) -> dict[str, Any] | None:
    """The t-interval of ``row``'s ``part`` (``test`` / ``normalized`` / ``ood`` per ``key``, or a mean)."""
    ivs = results.statistics.get("intervals", {}).get(row, {})
    iv = ivs.get(part) if key is None else (ivs.get(part) or {}).get(key)
    return iv if isinstance(iv, dict) else None


def _pm(cell: str, iv: dict[str, Any] | None, digits: int = 1) -> str:
    """``cell ± half-width`` when the interval exists (several seeds)."""
    if cell == "–" or iv is None or iv.get("high") is None:
        return cell
    return f"{cell} ± {iv['high'] - iv['mean']:.{digits}f}"


def half_width(iv: dict[str, Any] | None) -> float:
    """Half-width of a t-interval (0 without one: one seed)."""
    return 0.0 if iv is None or iv.get("high") is None else float(iv["high"] - iv["mean"])


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
            n = r.name
            cells = [n, _params(r.params) if r.kind != "baseline" else _baseline_params(results),
                     "yes" if r.transductive else "no",
                     *(_pm(_score(results, t, r.test.get(t)), _interval(results, n, "test", t)) for t in ind),
                     _pm(_pct(r.mean), _interval(results, n, "mean")),
                     _pm(_num(r.mean_normalized), _interval(results, n, "mean_normalized")),
                     *(_pm(_score(results, t, r.ood.get(t)), _interval(results, n, "ood", t)) for t in ood),
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


def _seeds_text(results: BenchResults) -> str:
    seeds = results.seeds or [results.seed]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {', '.join(map(str, seeds))}"


def comparisons_table(results: BenchResults) -> str:
    """The paired-bootstrap comparisons: Δ mean normalized accuracy (points), its 95 % percentile interval
    (``*``: excludes 0), p-values raw and Holm-adjusted (``†``: ≤ 0.05), and the minimum detectable differences."""
    st = results.statistics
    comps = st.get("comparisons") or []
    if not comps:
        return f"No comparison: {st.get('comparisons_note') or 'no method row'}."
    lines = ["| method | vs | Δ norm. mean | 95 % interval | p | p (Holm) | MDD test examples | MDD seeds | seeds |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in comps:
        mark = ("*" if c["excludes_zero"] else "") + ("†" if c["significant"] else "")
        mdd_seeds = "n/a (1 seed)" if c["mdd_seeds"] is None else f"{c['mdd_seeds']:.2f}"
        lines.append(f"| {c['method']} | {c['reference']} | {c['estimate']:+.2f}{mark} | "
                     f"[{c['low']:+.2f}, {c['high']:+.2f}] | {c['p_value']:.4f} | {c['p_holm']:.4f} | "
                     f"{c['mdd_examples']:.2f} | {mdd_seeds} | {len(c['seeds'])} |")
    return "\n".join(lines)


def _environment(results: BenchResults) -> list[str]:
    out = []
    for seed, env in results.environment.items():
        if not env:
            continue
        v = env.get("versions", {})
        out.append(f"- seed {seed}: {env.get('platform')}, {env.get('cpu_count')} CPUs, {env.get('torch_threads')} "
                   f"torch threads; python {env.get('python')}, "
                   + ", ".join(f"{k} {v.get(k)}" for k in ("torch", "neuromerge", "transformers", "numpy")))
    return out


def markdown_report(results: BenchResults) -> str:
    """``results.md``: setup, the table (intervals over seeds), the comparisons, the tuning traces, the machine
    and the timings."""
    b = results.budget
    several = len(results.seeds) > 1
    out = [f"# neuromerge bench {results.suite}{' --quick' if results.quick else ''}", "",
           f"{results.description}. Created {results.created}; {_seeds_text(results)}; experts: {results.mode} "
           f"fine-tuning, {b.get('train_steps')} steps of batch {b.get('batch_size')}{_heads(results)}.", "",
           ("Each cell: mean over the seeds ± half-width of the 95 % t-interval (docs/bench.md, Statistics)."
            if several else "One seed: intervals over seeds are n/a (1 seed); the comparisons below resample test "
            "examples only."), "",
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
    out += ["", "## Comparisons (paired bootstrap)", "",
            "Δ = difference in mean normalized accuracy (points of %), method minus reference; paired bootstrap "
            "stratified by task (B = 10,000, RNG seed 0, percentile interval). `*`: the 95 % interval excludes 0; "
            "`†`: significant after Holm's adjustment over all comparisons of this table (α = 0.05). MDD: the "
            "smallest difference detectable with 80 % power, from the test examples (2.8 × bootstrap SE) and from "
            "the spread over seeds (2.8 × s/√S).", "", comparisons_table(results)]
    out += ["", "## Validation grids", ""]
    for seed, rows in (results.per_seed or {results.seed: results.rows}).items():
        for r in rows:
            if r.grid:
                trace = "; ".join(f"{_params(g['params'])}: {_pct(g['val_mean'])}" for g in r.grid)
                out.append(f"- **{r.name}**{f' (seed {seed})' if several else ''} (chosen {_params(r.params)}): "
                           f"{trace}")
    env = _environment(results)
    if env:
        out += ["", "## Machine", "", *env]
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
        errs = [half_width(_interval(results, r.name, "normalized", t)) for t in results.in_domain] + [
            half_width(_interval(results, r.name, "mean_normalized"))]
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, vals, width=width, label=r.name, color=cmap[j], yerr=errs if any(errs) else None,
               error_kw={"elinewidth": 0.8, "capsize": 1.5})
        shown += [v for v in vals if not math.isnan(v)]
    if shown:  # zoom on the bars: differences of a few points are the point of the plot
        ax.set_ylim(max(0.0, 5 * math.floor(min(shown) / 5) - 5), max(105.0, max(shown) + 2))
    ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("normalized accuracy (% of expert)")
    ax.set_title(f"{results.suite}: per-task normalized test accuracy"
                 + (f" (95 % t-intervals, {len(results.seeds)} seeds)" if len(results.seeds) > 1 else " (1 seed)"))
    ax.legend(fontsize=7, ncol=min(4, max(1, len(rows))), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path)


def plot_in_vs_out(results: BenchResults, path: Path) -> None:
    fig, ax = _figure(6.0, 4.5)
    rows = [r for r in _plotted(results) if r.mean is not None]
    cmap = _colors(len(rows))
    for j, r in enumerate(rows):
        y = r.ood_mean
        xe, ye = half_width(_interval(results, r.name, "mean")), half_width(_interval(results, r.name, "ood_mean"))
        if xe or ye:
            ax.errorbar([100 * r.mean], [100 * y if y is not None else float("nan")], xerr=xe, yerr=ye,
                        color=cmap[j], linewidth=0.8, capsize=2)
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


