"""The report of :func:`~neuromerge.evaluation.evaluate`: ``results.json``, ``results.md`` and
``normalized_accuracy.png``.

- ``results.md``: per split, a table with one row per model (experts, base, then the models given), one column per
  task (score in %, or perplexity) and the mean normalised accuracy; a second table gives the normalised accuracy
  per task; then the head that scored each task of each row and the tasks' sizes.
- ``normalized_accuracy.png``: grouped bars, one group per task plus the mean, one bar per row but the experts'
  (always 100): the test split (the first split scored). matplotlib (the ``bench`` extra) is imported only here;
  without it the plot is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import EvalResults

PLOT = "normalized_accuracy.png"

#: what each head source means, for the report
HEAD_NAMES = {
    "folder": "the folder's own head (heads/<task>.safetensors)",
    "classifier": "the expert's *ForSequenceClassification head",
    "label_words": "label-word likelihood (no head)",
    "probe": "a linear probe fitted on the expert's features",
}


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _score(results: EvalResults, task: str, value: float | None) -> str:
    metric = next((t["metric"] for t in results.tasks if t["name"] == task), "accuracy")
    return _num(value, 2) if metric == "perplexity" else _pct(value)


def _label(kind: str, info: dict[str, Any]) -> str:
    if kind == "experts":
        return "experts (upper reference)"
    method = info.get("variant") or info.get("method")
    return f"{kind} ({method})" if method and kind != "base" else kind


def markdown_table(results: EvalResults, split: str = "test") -> str:
    """Scores (%) per task, the mean score and the mean normalised accuracy of every row on ``split``."""
    tasks = results.task_names
    head = ["model", "kind", *tasks, "mean", "norm. mean"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in results.rows:
        cells = [r.name, _label(r.kind, r.info), *(_score(results, t, r.scores.get(split, {}).get(t)) for t in tasks),
                 _pct(r.mean(split)), _num(r.mean_normalized(split))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def normalized_table(results: EvalResults, split: str = "test") -> str:
    """Normalised accuracy (100 = the task's expert) per task and its mean, every row on ``split``."""
    tasks = results.task_names
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for r in results.rows:
        norm = r.normalized.get(split, {})
        lines.append("| " + " | ".join([r.name, *(_num(norm.get(t)) for t in tasks),
                                        _num(r.mean_normalized(split))]) + " |")
    return "\n".join(lines)


def heads_table(results: EvalResults) -> str:
    """Which head scored each task of each row."""
    tasks = results.task_names
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in results.rows:
        lines.append("| " + " | ".join([r.name, *(r.heads.get(t, "–") for t in tasks)]) + " |")
    return "\n".join(lines)


def markdown_report(results: EvalResults) -> str:
    """``results.md``: setup, the tables per split, the heads, the tasks and the timings."""
    out = [f"# neuromerge evaluate{f' {results.source}' if results.source else ''}", "",
           f"Task set: {results.suite}; seed {results.seed}; created {results.created}.", "",
           "Score per task (accuracy in %, or perplexity) of each model on each task's held-out split. `norm. mean` "
           "= mean over the tasks of 100 · score / score of the task's expert (the `experts` row: each task's own "
           "expert on its own task, the upper reference; for perplexity 100 · expert / model). A model is scored "
           "with its folder's head for a task when it has one, else with the expert's head; `base` is the "
           "pre-trained base with the experts' heads; a routed model goes through its own router.", ""]
    for split in results.splits:
        out += [f"## {split} split", "", markdown_table(results, split), "", "Normalised accuracy (% of the expert):",
                "", normalized_table(results, split), ""]
    out += ["## Heads", "", heads_table(results), "",
            *(f"- `{k}`: {v}" for k, v in HEAD_NAMES.items()), "", "## Tasks", "",
            "| task | classes | train / val / test | expert | expert's classifier |", "|---|---:|---|---|---|"]
    for t in results.tasks:
        s = t["sizes"]
        out.append(f"| {t['name']} | {len(t['classes'])} | {s['train']} / {s['val']} / {s['test']} | "
                   f"{t.get('expert') or '–'} | {t.get('expert_classifier') or '–'} |")
    models = [r for r in results.rows if r.path]
    if models:
        out += ["", "## Models", "", *(f"- **{r.name}**: {r.kind}, {r.path}" for r in models)]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in results.timings.items())
    out += ["", "## Timings", "", timings, ""]
    return "\n".join(out)


def plot_normalized(results: EvalResults, path: Path, split: str = "test") -> bool:
    """Grouped bars of the normalised accuracy per task and the mean (every row but the experts'); False (and a
    warning) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'neuromerge[bench]'): the plot is skipped",
                      stacklevel=2)
        return False
    from matplotlib import colormaps

    rows = [r for r in results.rows if r.kind != "experts"]
    groups = [*results.task_names, "mean"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 0.3 * len(rows)), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    cmap = colormaps["tab10"]
    for j, r in enumerate(rows):
        norm = r.normalized.get(split, {})
        vals = [norm.get(t, float("nan")) for t in results.task_names]
        vals.append(r.mean_normalized(split) or float("nan"))
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, vals, width=width, label=r.name, color=cmap(j % 10))
    ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("normalized accuracy (% of expert)")
    ax.set_title(f"normalized {split} accuracy (100 = each task's expert)")
    ax.legend(fontsize=7, ncol=min(4, max(1, len(rows))), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_report(results: EvalResults, out: Path, *, plot: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (``plot``, matplotlib present) the PNG into the existing folder
    ``out``; returns the paths written."""
    paths = [out / "results.json", out / "results.md"]
    if plot and plot_normalized(results, out / PLOT, results.splits[0]):
        paths.append(out / PLOT)
    paths[1].write_text(markdown_report(results), encoding="utf-8")
    paths[0].write_text(json.dumps(strict_json(results.to_dict()), indent=2, default=str) + "\n", encoding="utf-8")
    return paths


def strict_json(obj: Any) -> Any:
    """NaN / inf → None so that ``results.json`` is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


__all__ = ["HEAD_NAMES", "PLOT", "heads_table", "markdown_report", "markdown_table", "normalized_table",
           "plot_normalized", "write_report"]
