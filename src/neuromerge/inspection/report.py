"""The plain-data result of ``neuromerge inspect`` (dataclasses that round-trip through ``inspect.json``).

Every ratio is computed from the float64 sums of :mod:`.stats` over the coordinates of a group (a tensor, a
block, a component or the whole model):

* ``update_norm[t] = ‖τ_t‖``, ``relative_update[t] = ‖τ_t‖/‖θ0‖``;
* ``cosine[i][j] = ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖)`` (clipped to [−1, 1]; None where a norm is 0),
  ``mean_cosine`` its mean over the pairs i < j;
* ``sign_conflict_rate = conflicts / numel``, ``overlap_rate = overlap / numel``,
  ``conflict_share_of_overlap = conflicts / overlap``; ``kept_density[t] = kept[t] / numel``; ``coverage[n]`` the
  number of coordinates kept by exactly ``n`` experts;
* ``sign_agreement = 1 − conflicts / E[conflicts]`` with ``E[conflicts] = Σ_{n>=2} coverage[n]·(1 − 2^{1−n})``, the
  conflicts expected if the kept signs were independent fair coins: 1 = the experts never disagree, 0 = they
  disagree as often as unrelated updates do, < 0 = more often (None without coordinates kept twice);
* ``parallel_share[t] = Σ‖τ∥,t‖² / Σ‖τ_t‖²`` over the group's neuronal tensors (None without neuronal energy),
  ``parallel_share_trimmed`` the same on the trimmed task vectors; ``orthogonal_share = 1 − parallel_share``;
* ``neuron_histogram[t]``: counts of neurons per parallel-share bin (blocks and the whole model only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .stats import BINS, Sums, total

REPORT_VERSION = 1


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _cosine(dot: float, sq_i: float, sq_j: float, same: bool) -> float | None:
    """``dot / √(sq_i·sq_j)`` clipped to [−1, 1] (float64 rounding may step past ±1); 1 on the diagonal; None
    when a norm is 0."""
    if sq_i <= 0 or sq_j <= 0:
        return None
    return 1.0 if same else max(-1.0, min(1.0, dot / math.sqrt(sq_i * sq_j)))


def chance_conflicts(coverage: Iterable[int]) -> float:
    """``Σ_{n>=2} coverage[n]·(1 − 2^{1−n})``: expected conflicts if every kept sign were a fair coin."""
    return sum(c * (1.0 - 2.0 ** (1 - n)) for n, c in enumerate(coverage) if n >= 2)


def _agreement(s: Sums) -> float | None:
    chance = chance_conflicts(int(c) for c in s.coverage)
    return 1.0 - s.conflicts / chance if chance > 0 else None


@dataclass
class GroupStats:
    """Task-vector statistics of one group of coordinates (see the module docstring)."""

    name: str
    kind: str  # model | block | component | tensor
    numel: int
    tensors: int
    update_norm: list[float]
    relative_update: list[float | None]
    cosine: list[list[float | None]]
    mean_cosine: float | None
    sign_conflict_rate: float | None
    overlap_rate: float | None
    conflict_share_of_overlap: float | None
    sign_agreement: float | None
    coverage: list[int]
    kept_density: list[float | None]
    neurons: int
    parallel_share: list[float | None]
    parallel_share_trimmed: list[float | None]
    neuron_histogram: list[list[int]] | None = None
    block: str | None = None
    component: str | None = None

    @property
    def orthogonal_share(self) -> list[float | None]:
        return [None if p is None else 1.0 - p for p in self.parallel_share]

    @classmethod
    def from_sums(cls, name: str, kind: str, s: Sums, *, histogram: bool, block: str | None = None,
                  component: str | None = None) -> GroupStats:
        t = s.gram.shape[0]
        diag = [float(s.gram[i, i]) for i in range(t)]
        cosine = [[_cosine(float(s.gram[i, j]), diag[i], diag[j], i == j) for j in range(t)] for i in range(t)]
        pairs = [cosine[i][j] for i in range(t) for j in range(i + 1, t) if cosine[i][j] is not None]
        return cls(
            name=name, kind=kind, numel=int(s.numel), tensors=int(s.tensors),
            update_norm=[math.sqrt(d) for d in diag],
            relative_update=[_ratio(math.sqrt(d), math.sqrt(s.base_sq)) for d in diag],
            cosine=cosine, mean_cosine=sum(pairs) / len(pairs) if pairs else None,
            sign_conflict_rate=_ratio(s.conflicts, s.numel), overlap_rate=_ratio(s.overlap, s.numel),
            conflict_share_of_overlap=_ratio(s.conflicts, s.overlap),
            sign_agreement=_agreement(s), coverage=[int(c) for c in s.coverage],
            kept_density=[_ratio(float(k), s.numel) for k in s.kept],
            neurons=int(s.neurons),
            parallel_share=[_ratio(float(p), float(e)) for p, e in zip(s.parallel, s.energy, strict=True)],
            parallel_share_trimmed=[_ratio(float(p), float(e))
                                    for p, e in zip(s.parallel_trimmed, s.energy_trimmed, strict=True)],
            neuron_histogram=[[int(c) for c in row] for row in s.histogram] if histogram else None,
            block=block, component=component,
        )


@dataclass
class Suggestion:
    """A suggested merge method, the rule of :mod:`.summary` that chose it and the reason in words."""

    method: str
    rule: str
    reason: str


@dataclass
class Summary:
    """The text summary's content: the most conflicting blocks, the most orthogonal experts, a suggestion."""

    most_conflicting_blocks: list[dict[str, Any]]
    most_orthogonal_experts: list[dict[str, Any]]
    suggestion: Suggestion
    text: str = ""


@dataclass
class MergeabilityRow:
    """Accuracy lost when only ``component`` is merged (see :mod:`.mergeability`): per task and the mean."""

    component: str
    tensors: int
    parameters: int
    loss: dict[str, float]
    mean_loss: float


@dataclass
class Mergeability:
    """Per-component mergeability on a bench suite's validation splits."""

    suite: str
    quick: bool
    mode: str
    seed: int
    operator: str
    reference: dict[str, float]
    rows: list[MergeabilityRow]
    available: bool = True
    note: str = ""


@dataclass
class InspectReport:
    """Everything ``neuromerge inspect`` computes; ``to_json`` / ``from_dict`` round-trip it exactly."""

    base_model: str
    experts: list[str]
    labels: list[str]
    density: float
    thresholds: list[float | None]  # None: nothing kept (an infinite threshold)
    model: GroupStats
    blocks: list[GroupStats]
    components: list[GroupStats]
    tensors: list[GroupStats]
    summary: Summary
    mergeability: Mergeability | None = None
    figures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    version: int = REPORT_VERSION

    def block(self, name: str) -> GroupStats:
        return next(b for b in self.blocks if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectReport:
        groups = {k: [GroupStats(**g) for g in data[k]] for k in ("blocks", "components", "tensors")}
        summary = dict(data["summary"])
        summary["suggestion"] = Suggestion(**summary["suggestion"])
        merge = data.get("mergeability")
        if merge is not None:
            merge = Mergeability(**{**merge, "rows": [MergeabilityRow(**r) for r in merge["rows"]]})
        return cls(**{**data, **groups, "model": GroupStats(**data["model"]), "summary": Summary(**summary),
                      "mergeability": merge})

    @classmethod
    def load(cls, path: str | Path) -> InspectReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def grouped(items: Iterable[tuple[str, Sums]], experts: int, order: Callable[[str], Any]) -> list[tuple[str, Sums]]:
    """Sums of ``items`` per key, keys sorted by ``order`` (each key's items added in their given order)."""
    groups: dict[str, list[Sums]] = {}
    for key, s in items:
        groups.setdefault(key, []).append(s)
    return [(k, total(groups[k], experts)) for k in sorted(groups, key=order)]


__all__ = [
    "BINS",
    "GroupStats",
    "InspectReport",
    "Mergeability",
    "MergeabilityRow",
    "Suggestion",
    "Summary",
    "chance_conflicts",
    "grouped",
]
