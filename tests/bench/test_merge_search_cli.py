"""``neuromerge search`` → ``neuromerge route build merge`` → ``neuromerge.load_routed`` on the text suite (quick
budget, two tasks, a tiny search budget), through the CLI; the experts come from the session cache the quick bench
test fills (trained here when run alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TASKS = ["sentiment", "subjectivity"]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuromerge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=1800, check=False)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, text_bench_cache):
    root = tmp_path_factory.mktemp("search")
    env = {**os.environ, "NEUROMERGE_CACHE": str(text_bench_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cfg = root / "search.yaml"
    cfg.write_text(yaml.safe_dump({"suite": "text", "quick": True, "tasks": TASKS, "population": 4,
                                   "val_limit": 40, "n_trees": 10}))
    out = root / "out"
    proc = _cli(["search", str(cfg), "-o", str(out), "--budget", "8", "--seeds", "1", "--no-progress"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, cfg, out, env, proc


def test_search_writes_front_plots_and_report(search_run):
    _, _, out, _, proc = search_run
    for name in ("pareto.json", "pareto.png", "hypervolume.png", "report.json", "archive.json", "representative.md"):
        assert (out / name).stat().st_size > 0, name
    pareto = json.loads((out / "pareto.json").read_text())
    front = pareto["front"]
    assert front and pareto["tasks"] == TASKS
    assert set(pareto["reference_points"]) == {"static task_arithmetic", "all separate"}
    for a in front:  # non-dominated
        assert not any(b["score"] >= a["score"] and b["bytes"] <= a["bytes"] and b != a and
                       (b["score"] > a["score"] or b["bytes"] < a["bytes"]) for b in front)
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"] >= 4 and report["settings"]["budget"] == 8
    assert "static task_arithmetic" in proc.stdout and "high accuracy" in proc.stdout


def test_search_refuses_existing_folder_and_resumes_identically(search_run):
    _, cfg, out, env, _ = search_run
    again = _cli(["search", str(cfg), "-o", str(out), "--budget", "8", "--seeds", "1", "--no-progress"], env)
    assert again.returncode == 2 and "--resume" in again.stderr
    before = json.loads((out / "archive.json").read_text())
    resumed = _cli(["search", str(cfg), "-o", str(out), "--budget", "8", "--seeds", "1", "--resume",
                    "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "archive.json").read_text()) == before
    bad = _cli(["search", str(cfg), "-o", str(out), "--budget", "2", "--no-progress"], env)
    assert bad.returncode == 2 and "budget" in bad.stderr


def test_route_build_merge_point_and_load_routed(search_run):
    root, _, out, env, _ = search_run
    pareto = json.loads((out / "pareto.json").read_text())
    smallest = min(e["bytes"] for e in pareto["front"])
    rcfg = root / "route.yaml"
    rcfg.write_text(yaml.safe_dump({"search": str(out), "storage_mb": smallest / 1e6 + 1e-6, "router_epochs": 3,
                                    "router_examples": 64, "router_val_examples": 32}))
    routed = root / "routed"
    proc = _cli(["route", "build", "merge", "--config", str(rcfg), "-o", str(routed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _cli(["route", "info", str(routed), "--json"], env)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["method"] == "merge" and summary["tasks"] == TASKS
    manifest = json.loads((routed / "manifest.json").read_text())
    assert manifest["extra"]["point"]["bytes"] == smallest
    assert manifest["library"]["storage_bytes"] == (routed / "library.safetensors").stat().st_size

    import neuromerge
    from neuromerge.routing.recombination import ChainRoutedModel

    model = neuromerge.load_routed(routed)
    assert isinstance(model, ChainRoutedModel)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 6659, 1010, 2025, 2204, 102]])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert hidden.shape[:2] == ids.shape and torch.isfinite(hidden).all()
        assert model.last_tasks is not None and set(model.last_tasks.tolist()) <= {0, 1}
        for t in range(2):  # forcing a task runs exactly that task's chain
            with model.force(torch.tensor([t, t])):
                forced = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            plain = torch.func.functional_call(model.backbone, model.library.chain(t),
                                               kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            torch.testing.assert_close(forced, plain.last_hidden_state)

    scored = _cli(["bench", "text", "--quick", "--tasks", ",".join(TASKS), "--model", str(routed), "-o",
                   str(root / "bench-routed"), "--no-progress", "--threads", "1"], env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((root / "bench-routed" / "results.json").read_text())["rows"]}
    row = rows["model: routed"]
    assert set(row["test"]) == set(TASKS) and all(0 < v <= 1 for v in row["test"].values())

    missing = _cli(["route", "build", "merge", "--config", str(rcfg), "-o", str(routed)], env)
    assert missing.returncode == 2 and "exists" in missing.stderr
    rcfg.write_text(yaml.safe_dump({"search": str(out), "storage_mb": smallest / 1e6 / 2}))
    small = _cli(["route", "build", "merge", "--config", str(rcfg), "-o", str(root / "r2")], env)
    assert small.returncode == 2 and "no Pareto point fits" in small.stderr
    assert not Path(root / "r2").exists()
