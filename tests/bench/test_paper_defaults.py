"""Rows at the papers' defaults without validation (issue #18 §5): the table, its documentation, the rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from neuromerge.bench import grids, protocol
from neuromerge.functional import merge_state_dicts
from neuromerge.methods import get
from tests.bench.test_protocol import ToySuite

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bench.md"
#: the values the issue and METHODS.md name; the table must hold exactly these
EXPECTED = {
    "task_arithmetic": {"lam": 0.3},
    "ties": {"density": 0.2, "lam": 1.0},
    "dare_ties": {"density": 0.5, "lam": 1.0},
    "dare_linear": {"density": 0.5, "lam": 0.3},
    "breadcrumbs": {"density": 0.15, "gamma": 0.01, "lam": 0.3},
    "breadcrumbs_ties": {"density": 0.15, "gamma": 0.01, "lam": 1.0},
    "consensus": {"tall_lambda": 0.6, "k": 2, "lam": 0.3},
    "pcb": {"density": 0.1, "lam": 1.0},
    "tsv": {"lam": 1.0},
    "neuromerging": {"density": 0.2, "lambda1": 0.0, "lambda2": "auto"},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_table_holds_exactly_the_documented_values():
    assert {m: e.params for m, e in grids.PAPER_DEFAULTS.items()} == EXPECTED
    for method, entry in grids.PAPER_DEFAULTS.items():
        assert get(method).name == method  # canonical registry names
        assert len(entry.source) > 20, method
        assert grids.paper_default(method) == EXPECTED[method]
        assert grids.paper_default(method) is not entry.params  # a copy: callers cannot change the table
    assert grids.paper_default("linear") is None and grids.paper_default("model_stock") is None


def test_every_static_method_with_tuned_parameters_has_a_default():
    """The methods whose grid varies a parameter are exactly the ones with a paper-default row (SLERP's t: no
    paper default, it merges two models only)."""
    tuned = {m for m, g in grids.GRIDS.items() if any(p for p in g)} - {"slerp"}
    assert tuned == set(grids.PAPER_DEFAULTS)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_defaults_are_accepted_and_merge(method):
    """Each default point is a valid parameter set of its method (unknown names would raise) and merges."""
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(8, 6, generator=g), "layer.bias": torch.randn(8, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    merged = merge_state_dicts(method, base, experts, parameters=grids.paper_default(method), seed=0)
    assert set(merged) == set(base)
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_docs_table_matches_the_code():
    """docs/bench.md's table of paper defaults gives the same values as the code."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("### Paper defaults", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.M))
    assert set(rows) == set(grids.PAPER_DEFAULTS)
    for method, params in grids.PAPER_DEFAULTS.items():
        documented = dict(kv.strip().split("=") for kv in rows[method].split(","))
        assert documented == {k: str(v) for k, v in params.params.items()}, method


def test_auto_is_in_the_neuromerging_grid_and_merged_as_given():
    points = grids.grid_for("neuromerging")
    autos = [i for i, p in enumerate(points) if p.get("lambda2") == "auto"]
    assert autos, points
    groups = grids.scale_groups("neuromerging", points)
    given = {i for _, members in groups for i, s in members if s is None}
    assert given == set(autos)  # 'auto' is merged as it stands, never derived from λ2 = 1
    for _, members in groups:
        for i, s in members:
            assert s is None or s == points[i]["lambda2"]


def test_paper_default_rows_beside_the_tuned_rows(cache_dir):
    suite = ToySuite()
    res = protocol.run_suite(suite, ["linear", "task_arithmetic", "ties"], quick=True, paper_defaults=True,
                             progress=False)
    names = [r.name for r in res.rows]
    assert names == ["pretrained + heads", "individual experts", "linear", "task_arithmetic",
                     "task_arithmetic (paper default)", "ties", "ties (paper default)"]
    prep = protocol.prepare_suite(suite, quick=True)
    protocol.train_experts(prep, 0)
    for method in ("task_arithmetic", "ties"):
        row = res.row(f"{method} (paper default)")
        assert row.method == method and row.params == EXPECTED[method]
        assert row.grid == [] and row.val_mean is None  # nothing was tuned
        assert "paper_default" in row.info
        # independent recomputation: merge at the documented values, score with the experts' heads
        merged = merge_state_dicts(method, prep.base, [prep.experts[t.name].backbone for t in prep.in_domain],
                                   parameters=EXPECTED[method], exclude=suite.merge_exclude(), seed=0)
        for t in prep.in_domain:
            assert row.test[t.name] == suite.evaluate(merged, prep.experts[t.name].head, t, "test", prep.budget)


def test_paper_default_rows_are_off_in_quick_by_default_and_on_in_the_normal_budget(cache_dir):
    quick = protocol.run_suite(ToySuite(), ["ties"], quick=True, progress=False)
    assert [r.name for r in quick.rows][2:] == ["ties"]
    normal = protocol.run_suite(ToySuite(), ["ties", "linear"], quick=False, progress=False)
    assert [r.name for r in normal.rows][2:] == ["ties", "ties (paper default)", "linear"]
    off = protocol.run_suite(ToySuite(), ["ties"], quick=False, paper_defaults=False, progress=False)
    assert [r.name for r in off.rows][2:] == ["ties"]
