"""PNG figures of an :class:`~.report.InspectReport` (matplotlib's Agg canvas; no pyplot, no global state).

One file per figure, written into the output folder:

* ``cosine_heatmap.png`` — pairwise cosine similarity of the task vectors, whole model;
* ``cosine_per_block.png`` — the same per block, one line per expert pair;
* ``sign_conflict_per_block.png`` — share of coordinates whose trimmed signs conflict, per block;
* ``parallel_share_per_block.png`` — share of update energy parallel to the pre-trained neurons, block × expert;
* ``parallel_share_histogram.png`` — its distribution over neurons (whole model), one line per expert;
* ``update_norm_per_block.png`` — ``‖τ_t‖`` per block, one line per expert;
* ``mergeability.png`` — accuracy lost when only one component is merged (with ``--suite``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .report import GroupStats, InspectReport, Mergeability
from .stats import BINS

DPI = 110


def _nan(x: float | None, scale: float = 1.0) -> float:
    return math.nan if x is None else x * scale


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _block_axis(ax: Any, blocks: Sequence[GroupStats]) -> list[int]:
    xs = list(range(len(blocks)))
    ax.set_xticks(xs, [b.name for b in blocks], rotation=60, ha="right", fontsize=8)
    ax.grid(alpha=0.3)
    return xs


def _width(blocks: Sequence[Any]) -> float:
    return max(7.0, 0.32 * len(blocks) + 2.5)


def cosine_heatmap(report: InspectReport, path: Path) -> Path:
    t = len(report.labels)
    fig = _figure(max(4.0, 0.7 * t + 2.5), max(3.5, 0.6 * t + 2.0))
    ax = fig.add_subplot()
    values = [[_nan(c) for c in row] for row in report.model.cosine]
    im = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(t), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(t), report.labels)
    for i in range(t):
        for j in range(t):
            if not math.isnan(values[i][j]):
                ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(values[i][j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("task-vector cosine similarity (whole model)")
    return _save(fig, path)


def cosine_per_block(report: InspectReport, path: Path) -> Path:
    fig = _figure(_width(report.blocks), 4.0)
    ax = fig.add_subplot()
    xs = _block_axis(ax, report.blocks)
    t = len(report.labels)
    for i in range(t):
        for j in range(i + 1, t):
            ax.plot(xs, [_nan(b.cosine[i][j]) for b in report.blocks], marker="o", ms=3,
                    label=f"{report.labels[i]} · {report.labels[j]}")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_ylabel("cosine of task vectors")
    ax.set_title("task-vector cosine similarity per block")
    if t * (t - 1) // 2 <= 15:
        ax.legend(fontsize=7, ncols=2)
    return _save(fig, path)


def sign_conflicts(report: InspectReport, path: Path) -> Path:
    fig = _figure(_width(report.blocks), 4.0)
    ax = fig.add_subplot()
    xs = _block_axis(ax, report.blocks)
    ax.bar(xs, [_nan(b.sign_conflict_rate, 100) for b in report.blocks], color="tab:red", alpha=0.8,
           label="conflicting coordinates (% of all)")
    ax.plot(xs, [_nan(b.conflict_share_of_overlap, 100) for b in report.blocks], color="black", marker="o", ms=3,
            label="conflicting (% of those kept by 2+ experts)")
    ax.set_ylabel("%")
    ax.set_title(f"trimmed-sign conflicts per block (density {report.density:g})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def parallel_share(report: InspectReport, path: Path) -> Path:
    blocks = [b for b in report.blocks if any(p is not None for p in b.parallel_share)]
    fig = _figure(_width(blocks), max(3.0, 0.4 * len(report.labels) + 2.2))
    ax = fig.add_subplot()
    values = [[_nan(b.parallel_share[t], 100) for b in blocks] for t in range(len(report.labels))]
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    _block_axis(ax, blocks)
    ax.grid(False)
    ax.set_yticks(range(len(report.labels)), report.labels)
    if len(blocks) * len(report.labels) <= 120:
        for t, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, t, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="parallel share of ‖τ‖² (%)")
    ax.set_title("update energy parallel to the pre-trained neurons (%; the rest is orthogonal)", fontsize=10)
    return _save(fig, path)


def parallel_histogram(report: InspectReport, path: Path) -> Path:
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    edges = [i / BINS for i in range(BINS + 1)]
    for t, counts in enumerate(report.model.neuron_histogram or []):
        n = sum(counts)
        if n:
            ax.stairs([100 * c / n for c in counts], edges, label=report.labels[t], lw=1.5)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("per-neuron parallel share ‖τ∥‖² / ‖τ‖²")
    ax.set_ylabel("% of neurons")
    ax.set_title("distribution of the parallel share over neurons (whole model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def update_norms(report: InspectReport, path: Path) -> Path:
    fig = _figure(_width(report.blocks), 4.0)
    ax = fig.add_subplot()
    xs = _block_axis(ax, report.blocks)
    for t, label in enumerate(report.labels):
        ax.plot(xs, [b.update_norm[t] for b in report.blocks], marker="o", ms=3, label=label)
    ax.set_ylabel("‖τ‖ (L2 norm of the update)")
    ax.set_title("where each expert changed the model: update norm per block")
    ax.legend(fontsize=8)
    return _save(fig, path)


def mergeability(merge: Mergeability, path: Path) -> Path:
    rows = merge.rows
    fig = _figure(_width(rows), 4.2)
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    losses = [100 * r.mean_loss for r in rows]
    colors = {"attention": "tab:orange", "mlp": "tab:blue"}
    kinds = [r.component.rpartition("/")[2] if "/" in r.component else "whole block" for r in rows]
    ax.bar(xs, losses, color=[colors.get(k, "tab:gray") for k in kinds])
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors.get(k, "tab:gray"), label=k) for k in dict.fromkeys(kinds)], fontsize=8)
    ax.set_xticks(xs, [r.component for r in rows], rotation=60, ha="right", fontsize=8)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylabel("mean validation accuracy lost (points)")
    ax.set_title(f"mergeability on suite {merge.suite!r}: accuracy lost when only that component is merged\n"
                 f"({merge.operator}; every other tensor is the task's own expert)", fontsize=10)
    return _save(fig, path)


FIGURES: dict[str, Callable[[InspectReport, Path], Path]] = {
    "cosine_heatmap": cosine_heatmap,
    "cosine_per_block": cosine_per_block,
    "sign_conflict_per_block": sign_conflicts,
    "parallel_share_per_block": parallel_share,
    "parallel_share_histogram": parallel_histogram,
    "update_norm_per_block": update_norms,
}


def write_figures(report: InspectReport, out: Path) -> dict[str, str]:
    """Write every figure that applies into ``out``; returns name → file name (relative to ``out``)."""
    written: dict[str, str] = {}
    for name, draw in FIGURES.items():
        if name == "cosine_per_block" and len(report.labels) < 2:
            continue
        if name.startswith("parallel") and all(p is None for p in report.model.parallel_share):
            continue
        written[name] = draw(report, out / f"{name}.png").name
    if report.mergeability is not None and report.mergeability.rows:
        written["mergeability"] = mergeability(report.mergeability, out / "mergeability.png").name
    return written


__all__ = ["FIGURES", "write_figures"]
