"""Hyper-parameter grids of the static merge methods, searched on the validation splits.

Every grid is a list of parameter dicts (the method's defaults fill the rest). The normal grids follow the
search spaces of the papers, trimmed so that ``make demo`` fits its time budget; the ``quick`` grids have at
most :data:`QUICK_MAX_POINTS` points and vary only the method's *scale* parameter, so that a quick run costs one
merge per method. A method that is not in the table runs once with its defaults.

**Scale parameters.** For the methods of :data:`SCALE_PARAMS` the merged model is affine in one parameter ``s``
(``λ`` of Task Arithmetic, TIES, DARE, ..., ``λ2`` of NeuroMerging with ``λ1 = 0``):
``θ(s) = θ0 + s·(θ(1) − θ0)``. The protocol then merges once per combination of the *other* parameters (at
``s = 1``) and derives the other points by this identity, which the tests check for every listed method.

Grids (normal / quick):

================  ==================================================  =========================
method            normal grid                                         quick grid
================  ==================================================  =========================
linear            (no parameter)                                      (no parameter)
task_arithmetic   lam ∈ {0.2, 0.3, 0.4, 0.5, 0.7, 1.0}                lam ∈ {0.3, 0.5, 1.0}
ties              density ∈ {0.1, 0.2} × lam ∈ {0.7, 1.0, 1.5, 2.0}   lam ∈ {0.7, 1.0, 1.5}
dare_ties         density ∈ {0.3, 0.5} × lam ∈ {0.7, 1.0, 1.5}        lam ∈ {0.7, 1.0, 1.5}
dare_linear       density ∈ {0.3, 0.5} × lam ∈ {0.3, 0.5, 0.7}        lam ∈ {0.3, 0.5, 1.0}
breadcrumbs       density ∈ {0.15, 0.3} × lam ∈ {0.3, 0.5, 0.7}       lam ∈ {0.3, 0.5, 1.0}
breadcrumbs_ties  density ∈ {0.15, 0.3} × lam ∈ {0.7, 1.0, 1.5}       lam ∈ {0.7, 1.0, 1.5}
consensus         tall_lambda ∈ {0.4, 0.6} × lam ∈ {0.3, 0.5, 0.7}    lam ∈ {0.3, 0.5, 1.0}
pcb               density ∈ {0.1, 0.2} × lam ∈ {0.5, 1.0, 1.5}        lam ∈ {0.5, 1.0, 1.5}
neuromerging      density ∈ {0.1, 0.2} × lambda2 ∈ {1, 1.5, 2, 3, auto}  lambda2 ∈ {1.0, 1.5, 2.0}
tsv               lam ∈ {0.5, 0.7, 1.0, 1.3}                          lam ∈ {0.5, 1.0, 1.5}
model_stock       (no parameter)                                      (no parameter)
slerp             t ∈ {0.3, 0.5, 0.7} (two experts only)              t ∈ {0.3, 0.5, 0.7}
================  ==================================================  =========================

The first text-suite run chose TIES λ = 1.5 and NeuroMerging λ2 = 2.0, the largest values of the grids of then:
both grids were widened by one point so that the chosen values are not at an edge. NeuroMerging's normal grid also
holds ``lambda2 = 'auto'`` (``1/(1−σ)``, the paper's value without validation: merged as given, not derived).

**Paper defaults** (:data:`PAPER_DEFAULTS`): one point per static method with parameters, the value its paper or
official code uses *without* validation data, each with its source. The bench scores it as a separate row
``"<method> (paper default)"`` beside the validation-tuned row (nothing is tuned: its validation score is not
computed).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Point = dict[str, Any]

QUICK_MAX_POINTS = 3

#: method -> the parameter the merged model is affine in (θ(s) = θ0 + s·(θ(1) − θ0)), given the other parameters
SCALE_PARAMS: dict[str, str] = {
    "task_arithmetic": "lam", "ties": "lam", "dare_ties": "lam", "dare_linear": "lam", "breadcrumbs": "lam",
    "breadcrumbs_ties": "lam", "consensus": "lam", "pcb": "lam", "tsv": "lam", "neuromerging": "lambda2",
}


def product(**axes: Sequence[Any]) -> list[Point]:
    """Cartesian product of parameter axes, last axis fastest: ``product(a=[1, 2], b=[3])``."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(axes[n] for n in names))]


GRIDS: dict[str, list[Point]] = {
    "linear": [{}],
    "task_arithmetic": product(lam=[0.2, 0.3, 0.4, 0.5, 0.7, 1.0]),
    "ties": product(density=[0.1, 0.2], lam=[0.7, 1.0, 1.5, 2.0]),
    "dare_ties": product(density=[0.3, 0.5], lam=[0.7, 1.0, 1.5]),
    "dare_linear": product(density=[0.3, 0.5], lam=[0.3, 0.5, 0.7]),
    "breadcrumbs": product(density=[0.15, 0.3], lam=[0.3, 0.5, 0.7]),
    "breadcrumbs_ties": product(density=[0.15, 0.3], lam=[0.7, 1.0, 1.5]),
    "consensus": product(tall_lambda=[0.4, 0.6], lam=[0.3, 0.5, 0.7]),
    "pcb": product(density=[0.1, 0.2], lam=[0.5, 1.0, 1.5]),
    "neuromerging": product(density=[0.1, 0.2], lambda2=[1.0, 1.5, 2.0, 3.0, "auto"]),
    "tsv": product(lam=[0.5, 0.7, 1.0, 1.3]),
    "model_stock": [{}],
    "slerp": product(t=[0.3, 0.5, 0.7]),
}

#: the methods a bench runs when ``--methods`` is not given: the baselines and headline methods of the papers, each
#: with a validation grid. The mergekit-parity methods (nuslerp, della, sce, karcher, …) run when named.
DEFAULT_METHODS: tuple[str, ...] = tuple(GRIDS)

QUICK_GRIDS: dict[str, list[Point]] = {
    "linear": [{}],
    "task_arithmetic": product(lam=[0.3, 0.5, 1.0]),
    "ties": product(lam=[0.7, 1.0, 1.5]),
    "dare_ties": product(lam=[0.7, 1.0, 1.5]),
    "dare_linear": product(lam=[0.3, 0.5, 1.0]),
    "breadcrumbs": product(lam=[0.3, 0.5, 1.0]),
    "breadcrumbs_ties": product(lam=[0.7, 1.0, 1.5]),
    "consensus": product(lam=[0.3, 0.5, 1.0]),
    "pcb": product(lam=[0.5, 1.0, 1.5]),
    "neuromerging": product(lambda2=[1.0, 1.5, 2.0]),
    "tsv": product(lam=[0.5, 1.0, 1.5]),
    "model_stock": [{}],
    "slerp": product(t=[0.3, 0.5, 0.7]),
}


@dataclass(frozen=True)
class PaperDefault:
    """A method's parameters without validation data (``params``, complete for the method's tuned parameters) and
    where they come from (``source``)."""

    params: Point
    source: str


#: method -> its parameters at the paper's / official code's defaults, used without validation (one row each);
#: keep docs/bench.md's table in step (a test compares them)
PAPER_DEFAULTS: dict[str, PaperDefault] = {
    "task_arithmetic": PaperDefault(
        {"lam": 0.3},
        "docs/methods/spec.md §4 (official-code default); FusionBench task_arithmetic scaling_factor 0.3"),
    "ties": PaperDefault(
        {"density": 0.2, "lam": 1.0},
        "Yadav et al. 2023 (NeurIPS): top-20 % (k = 20), λ = 1 when no validation set is available"),
    "dare_ties": PaperDefault(
        {"density": 0.5, "lam": 1.0}, "Yu et al. 2024 (ICML): drop rate p = 0.5 with 1/(1−p) rescale; then TIES at "
        "its default λ = 1 (mergekit dare_ties: lambda 1.0; FusionBench sparsity_ratio 0.5)"),
    "dare_linear": PaperDefault(
        {"density": 0.5, "lam": 0.3}, "Yu et al. 2024 (ICML): p = 0.5, 1/(1−p) rescale, then Task Arithmetic at its "
        "default λ = 0.3 (FusionBench DareTaskArithmetic: sparsity_ratio 0.5, scaling_factor 0.3)"),
    "breadcrumbs": PaperDefault(
        {"density": 0.15, "gamma": 0.01, "lam": 0.3}, "Davari & Belilovsky 2024 (ECCV), official code "
        "rezazzr/breadcrumbs: keep 15 %, drop the top 1 % outliers; Task Arithmetic's λ = 0.3"),
    "breadcrumbs_ties": PaperDefault(
        {"density": 0.15, "gamma": 0.01, "lam": 1.0}, "Breadcrumbs masks as above, then TIES at its default λ = 1 "
        "(mergekit breadcrumbs_ties: lambda 1.0)"),
    "consensus": PaperDefault(
        {"tall_lambda": 0.6, "k": 2, "lam": 0.3}, "Wang et al. 2024 (ICML), official code nik-dim/tall_masks: k = 2, "
        "λ_tall 0.6 (FusionBench tall_mask_lambda), Task Arithmetic's λ = 0.3"),
    "pcb": PaperDefault(
        {"density": 0.1, "lam": 1.0}, "Du et al. 2024 (NeurIPS), official code duguodong7/pcb-merging: "
        "pcb_ratio r = 0.1; a balanced weighted average at λ = 1"),
    "tsv": PaperDefault({"lam": 1.0}, "Gargiulo et al. 2025 (CVPR): α = 1.0, the paper's setting without "
                        "validation (FusionBench TaskSingularVectorMerging alpha 1)"),
    "neuromerging": PaperDefault(
        {"density": 0.2, "lambda1": 0.0, "lambda2": "auto"}, "Fang et al. 2025 (arXiv 2503.05320): density 0.2, "
        "λ1 = 0 (released scripts), λ2 = 1/(1−σ) without validation (docs/methods/spec.md §1.7)"),
}

#: suffix of the row name of a method at its paper defaults
PAPER_DEFAULT_SUFFIX = " (paper default)"


def paper_default(method: str) -> Point | None:
    """The paper-default parameters of ``method`` (canonical name): a copy, or None for a method without one
    (no parameter, not static, or not in :data:`PAPER_DEFAULTS`)."""
    entry = PAPER_DEFAULTS.get(method)
    return None if entry is None else dict(entry.params)


def grid_for(method: str, quick: bool = False) -> list[Point]:
    """The grid of ``method`` (its canonical registry name): a copy, capped at :data:`QUICK_MAX_POINTS` in
    ``quick`` mode; ``[{}]`` (defaults, one point) for a method missing from the table."""
    table = QUICK_GRIDS if quick else GRIDS
    points = [dict(p) for p in table.get(method, [{}])]
    return points[:QUICK_MAX_POINTS] if quick else points


def scale_groups(method: str, points: Sequence[Point]) -> list[tuple[Point, list[tuple[int, float | None]]]]:
    """Group grid points that differ only in the method's scale parameter: ``[(merge params, [(point index,
    scale or None)])]``. ``None``: the point is merged as given (no scale parameter, or a non-numeric value such
    as ``lambda2='auto'``); otherwise the group is merged once with the scale set to 1 and the point derived."""
    scale = SCALE_PARAMS.get(method)
    groups: dict[str, tuple[Point, list[tuple[int, float | None]]]] = {}
    for i, p in enumerate(points):
        value = p.get(scale) if scale else None
        if scale is None or isinstance(value, bool) or not isinstance(value, int | float):
            groups[f"point-{i}"] = (dict(p), [(i, None)])
            continue
        rest = {k: v for k, v in p.items() if k != scale}
        key = repr(sorted(rest.items()))
        groups.setdefault(key, ({**rest, scale: 1.0}, []))[1].append((i, float(value)))
    return list(groups.values())
