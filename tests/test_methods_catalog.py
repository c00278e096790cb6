"""``neuromerge methods``: every method (static, data-aware, routed, MERGE) with its command, parameters and source."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from neuromerge import catalog
from neuromerge.cli import app
from neuromerge.methods import available
from neuromerge.routing.cli import BUILDER_MODULES

runner = CliRunner()


@pytest.fixture(scope="module")
def listing() -> dict[str, dict]:
    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len({r["name"] for r in rows}) == len(rows)
    return {r["name"]: r for r in rows}


def _check(row: dict, kind: str) -> None:
    assert row["kind"] == kind
    assert row["command"] and row["summary"] and row["source"], row["name"]
    assert row["parameters"], f"{row['name']} shows no parameter"
    for section in row["sections"]:
        for p in section["parameters"]:
            assert set(p) >= {"name", "default", "constraints", "description"}


def test_every_static_method_is_listed_with_merge(listing):
    static = [n for n, cls in available().items() if not getattr(cls, "data_aware", False)]
    assert len(static) >= 13
    for name in static:
        row = listing[name]
        _check(row, "static")
        assert row["command"] == "merge"
        assert {"models", "chunkable", "aliases"} <= set(row)  # the shape `neuromerge methods --json` always had


@pytest.mark.parametrize("name", ["fisher", "regmean", "adamerging", "adamerging++"])
def test_data_aware_methods(listing, name):
    row = listing[name]
    _check(row, "data-aware")
    assert row["command"] == "merge (with data:)"
    assert any("bench" in c for c in row["also"])


@pytest.mark.parametrize("name", sorted(BUILDER_MODULES))
def test_every_routed_builder_is_listed(listing, name):
    row = listing[name]
    _check(row, "search" if name == "merge" else "routed")
    assert f"route build {name}" in row["command"]


def test_merge_lists_the_search_and_the_route_build(listing):
    row = listing["merge"]
    assert row["command"].startswith("search")
    sections = {s["name"]: {p["name"] for p in s["parameters"]} for s in row["sections"]}
    assert {"budget", "population", "ops", "coefficients"} <= sections["search config"]
    assert {"search", "point", "storage_mb", "router_epochs"} <= sections["route build merge"]
    assert "2602.06552" in row["source"]


def test_routed_params_come_from_their_models(listing):
    mm = {p["name"]: p for p in listing["min_merging"]["parameters"]}
    assert mm["neuron_keep"]["default"] == 0.9 and mm["neuron_keep"]["constraints"] == ">=0 <=1"
    assert mm["top_k"]["default"] == 2
    assert {p["name"] for p in listing["twin"]["parameters"]} >= {"lam", "rank_fraction"}
    assert {p["name"] for p in listing["emr"]["parameters"]} >= {"reduction", "oracle"}
    assert listing["wemoe"]["kind"] == "routed" and "fisher" not in listing["wemoe"]["command"]
    config = {s["name"]: s for s in listing["min_merging"]["sections"]}["route build config"]["parameters"]
    base = {p["name"]: p for p in config}["base"]
    assert base["required"] is True and "params" not in {p["name"] for p in config}
    assert "min_merging:no_hierarchy" in listing["min_merging"]["variants"]


def test_table_lists_every_method_with_its_command():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line and not line.startswith("`")}
    for e in catalog.entries():
        assert e.name in lines and e.kind in lines[e.name] and e.command in lines[e.name]


def test_min_merging_details_show_its_parameters():
    res = runner.invoke(app, ["methods", "min_merging"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "route build min_merging" in out and "2510.17890" in out
    for name in ("neuron_keep", "top_k", "enhancement", "hierarchy", "router_epochs", "experts"):
        assert f"  {name} " in out
    assert runner.invoke(app, ["methods", "MIN-Merging"]).stdout == out  # aliases, any case


def test_static_details_keep_their_shape():
    res = runner.invoke(app, ["methods", "ties"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].startswith("ties: ") and "parameters:" in lines
    assert any(line.startswith("  density") and "default 0.2" in line for line in lines)


def test_unknown_method_is_one_line_listing_the_real_ones():
    res = runner.invoke(app, ["methods", "nosuch"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'nosuch'")
    for name in ("ties", "fisher", "min_merging", "twin", "emr", "wemoe", "merge"):
        assert name in lines[0]


def test_catalog_does_not_import_the_bench():
    code = ("import sys, neuromerge.catalog as c; c.entries(); "
            "print(any(m == 'neuromerge.bench' or m.startswith('neuromerge.bench.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_lazy_reference_resolves():
    for e in catalog.entries():
        for s in e.sections:
            assert s.resolve().model_fields, (e.name, s.name)
        if e.variants:
            assert catalog.variants_of(e) or e.name == "twin"
