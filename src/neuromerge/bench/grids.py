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
neuromerging      density ∈ {0.1, 0.2} × lambda2 ∈ {1, 1.5, 2, 3}     lambda2 ∈ {1.0, 1.5, 2.0}
tsv               lam ∈ {0.5, 0.7, 1.0, 1.3}                          lam ∈ {0.5, 1.0, 1.5}
model_stock       (no parameter)                                      (no parameter)
slerp             t ∈ {0.3, 0.5, 0.7} (two experts only)              t ∈ {0.3, 0.5, 0.7}
================  ==================================================  =========================

The first text-suite run chose TIES λ = 1.5 and NeuroMerging λ2 = 2.0, the largest values of the grids of then:
both grids were widened by one point so that the chosen values are not at an edge.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
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
    "neuromerging": product(density=[0.1, 0.2], lambda2=[1.0, 1.5, 2.0, 3.0]),
    "tsv": product(lam=[0.5, 0.7, 1.0, 1.3]),
    "model_stock": [{}],
    "slerp": product(t=[0.3, 0.5, 0.7]),
}

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
