"""Figures of a search: the Pareto front with reference points, and the hypervolume per generation.

matplotlib's Agg canvas (no pyplot, no global state), as in :mod:`neuromerge.inspection.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .archive import Evaluation
from .nsga import GenerationRecord

DPI = 110
UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("B", 1))


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, title, grid and legend, then the PNG (no timestamp metadata: the file is reproducible)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_front(archive: Sequence[Evaluation], path: str | Path, *,
               marks: Mapping[str, tuple[float, int]] | None = None, title: str = "Pareto front") -> Path:
    """Archive as a step line + points (storage vs score), plus labelled reference points.

    ``marks`` maps a label to ``(f1, f2 bytes)``, e.g. static merges and the all-separate / all-merged extremes.
    Storage is shown in the largest binary unit (B, KiB, MiB, GiB) below the largest value plotted.
    """
    path = Path(path)
    marks = dict(marks or {})
    top = max([e.f2 for e in archive] + [f2 for _, f2 in marks.values()] + [1])
    unit, scale = next((u, v) for u, v in UNITS if top >= v)
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    pts = sorted((e.f2 / scale, e.f1) for e in archive)
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.step(xs, ys, where="post", color="tab:blue", alpha=0.5)
        ax.scatter(xs, ys, color="tab:blue", zorder=3, label=f"archive ({len(pts)})")
    markers = "s^vD<>ph*"
    for i, (label, (f1, f2)) in enumerate(marks.items()):
        ax.scatter([f2 / scale], [f1], marker=markers[i % len(markers)], color=f"C{1 + i % 9}", s=60, zorder=4,
                   label=label)
    return _finish(fig, ax, f"storage ({unit})", "score (f1)", title, path)


def plot_hypervolume(history: Mapping[int, Sequence[GenerationRecord]] | Sequence[GenerationRecord],
                     path: str | Path, *, title: str = "Hypervolume per generation") -> Path:
    """Hypervolume against exact evaluations used, one line per seed (``{seed: history}`` or one history)."""
    path = Path(path)
    runs = history if isinstance(history, Mapping) else {0: history}
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for seed, recs in runs.items():
        ax.plot([r.n_evaluated for r in recs], [r.hypervolume for r in recs], marker=".", label=f"seed {seed}")
    return _finish(fig, ax, "exact evaluations", "hypervolume", title, path)
