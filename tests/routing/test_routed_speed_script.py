"""benchmarks/routed_speed.py --quick runs and prints a well-formed JSON document (timing targets are not checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "routed_speed.py"
MODELS = ("routed_embeddings", "routed_final", "merged", "ensemble")


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_run_prints_complete_json(tmp_path: Path) -> None:
    out_file = tmp_path / "routed.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out_file)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert json.loads(out_file.read_text()) == doc
    for key in ("setup", "threads", "latency", "routing_active_experts", "tensor_bytes", "memory", "targets"):
        assert key in doc, key
    t = doc["setup"]["experts"]
    assert doc["quick"] is True and doc["setup"]["routed_layers"] == 6 * doc["setup"]["layers"]
    assert doc["sanity_forced_mean_vs_merged_max_abs_diff"] < 1e-3  # equal gates 1/T = the merged model

    assert set(doc["latency"]) == {"1", "32"}
    for batch, runs in doc["latency"].items():
        assert set(runs) == set(MODELS)
        for run in runs.values():
            assert all(_positive(run[k]) for k in ("median_ms", "min_ms", "max_ms", "throughput_per_s", "n"))
            assert math.isclose(run["throughput_per_s"], int(batch) / run["median_ms"] * 1e3, rel_tol=1e-3)
        assert all(1 <= n <= t for n in doc["routing_active_experts"][batch].values())

    sizes = doc["tensor_bytes"]
    assert all(_positive(sizes[k]) for k in ("base", "merged", "ensemble", "expert_factors", "router"))
    assert sizes["ensemble"] == t * sizes["base"] and sizes["merged"] == sizes["base"]
    routed = sizes["routed"]
    assert routed["base_tensors"] == sizes["base"] and routed["lora_A_B"] == sizes["expert_factors"]
    assert routed["dense_delta"] == 0 and routed["router"] == sizes["router"]

    for kind in ("base", "routed", "ensemble"):
        mem = doc["memory"][kind]
        assert all(_positive(mem[k]) for k in ("baseline_rss_mb", "rss_after_build_mb", "rss_after_forward_mb",
                                               "peak_rss_mb", "tensor_bytes"))
        assert math.isfinite(mem["model_rss_mb"])

    targets = doc["targets"]
    for b in ("1", "32"):
        assert f"latency_b{b}_routed_embeddings/merged" in targets
        assert f"throughput_b{b}_routed_embeddings/ensemble" in targets
    for key in ("routed_tensor_bytes", "routed_no_dense_delta"):
        assert isinstance(targets[key]["met"], bool)
    for target in targets.values():  # values are present and finite; whether a timing target is met is not tested
        assert isinstance(target["met"], bool)
        assert all(math.isfinite(v) for k, v in target.items() if k != "met")
