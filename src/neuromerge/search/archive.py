"""Evaluated configurations, the non-dominated archive, its hypervolume, and the on-disk evaluation cache.

Objectives: ``f1`` (score) is maximized, ``f2`` (bytes) minimized. ``a`` dominates ``b`` iff
``a.f1 ≥ b.f1 ∧ a.f2 ≤ b.f2`` with at least one strict inequality (Deb et al. 2002, NSGA-II). Configurations with
equal objective vectors do not dominate each other: all of them stay in the archive.

Hypervolume (pymoo's ``HV`` indicator, computed by moocore) of the archive in the minimization form
``(-f1, f2 / storage_ref)`` with reference point ``(-score_ref, 1)``: the area dominated between the front and the
reference, in units of "score × fraction of the reference storage". ``storage_ref`` defaults to
``1.05 · storage(all separate)``, ``score_ref`` to 0, so the hypervolume lies in ``[0, max f1]``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .encoding import Configuration


@dataclass(frozen=True)
class Evaluation:
    """A configuration with its objectives: ``f1`` score (maximize), ``f2`` bytes (minimize)."""

    config: Configuration
    f1: float
    f2: int

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.key, "f1": self.f1, "f2": self.f2}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(Configuration.from_key(d["config"]), float(d["f1"]), int(d["f2"]))


def non_dominated(evaluations: Iterable[Evaluation]) -> list[Evaluation]:
    """The non-dominated subset (duplicates of a configuration counted once), sorted by ``(f2, -f1, key)``.

    Two-objective sweep (Kung et al. 1975) in ``O(n log n)``: in order of increasing ``f2``, a point survives iff
    its ``f1`` is the best of its ``f2`` level and strictly better than every ``f1`` seen at a smaller ``f2``.
    """
    unique = sorted({e.config.key: e for e in evaluations}.values(), key=lambda e: (e.f2, -e.f1, e.config.key))
    keep: list[Evaluation] = []
    best_before = -math.inf  # best f1 among strictly smaller f2
    for _, level in itertools.groupby(unique, key=lambda e: e.f2):
        items = list(level)
        top = items[0].f1  # sorted by -f1 within the level
        if top > best_before:
            keep.extend(e for e in items if e.f1 == top)
        best_before = max(best_before, top)
    return keep


def hypervolume(evaluations: Sequence[Evaluation], storage_ref: float, score_ref: float = 0.0) -> float:
    """Hypervolume of the points ``(-f1, f2 / storage_ref)`` w.r.t. ``(-score_ref, 1)`` (pymoo ``HV``).

    Points that do not strictly improve on the reference in both objectives contribute nothing (dropped).
    """
    from pymoo.indicators.hv import HV

    pts = np.array([[-e.f1, e.f2 / storage_ref] for e in evaluations], dtype=np.float64).reshape(-1, 2)
    ref = np.array([-score_ref, 1.0])
    pts = pts[(pts < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(HV(ref_point=ref)(pts))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so an interruption never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class EvaluationCache:
    """Exact ``f1`` values keyed by canonical configuration, mirrored to a JSON-lines file (one record a line).

    Each record ``{"config": key, "f1": score, "f2": bytes}`` is appended and flushed as soon as it is known, so an
    interrupted search loses nothing it paid for. A torn last line (killed mid-write) is ignored on load.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._values: dict[str, float] = {}
        if path is not None and path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):  # torn last record: cut it so the next append starts a line
                text = text[: text.rfind("\n") + 1]
                path.write_text(text)
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self._values[rec["config"]] = float(rec["f1"])

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> float:
        return self._values[key]

    def put(self, config: Configuration, f1: float, f2: int) -> None:
        if config.key in self._values:
            return
        self._values[config.key] = f1
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"config": config.key, "f1": f1, "f2": f2}, separators=(",", ":")) + "\n")
                fh.flush()
