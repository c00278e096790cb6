"""End to end: ``neuromerge bench text --quick`` through the CLI, from an empty cache (the one slow test).

``--threads 1``: on a machine shared with other jobs a 2-thread pool makes this run 2–3× slower."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from neuromerge.bench.text import LORA_TARGETS, TextSuite
from neuromerge.tasks.contract import Budget

METHODS = ["task_arithmetic", "ties"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, text_bench_cache):
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    env = {**os.environ, "NEUROMERGE_CACHE": str(text_bench_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "neuromerge.cli", "bench", "text", "--quick", "--methods",
                           ",".join(METHODS), "-o", str(out), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_report_files_and_rows(quick_run):
    out, proc = quick_run
    for name in ("results.json", "results.md", "normalized_accuracy.png", "in_vs_out_of_domain.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "normalized_accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["pretrained + heads", "individual experts", *METHODS]
    assert "| task_arithmetic |" in proc.stdout and "| ties |" in proc.stdout  # the table is printed
    md = (out / "results.md").read_text()
    assert "| pretrained + heads |" in md and "transductive" in md


def test_scores_and_normalized_accuracy(quick_run):
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    tasks = {t["name"]: t for t in res["tasks"]}
    in_domain = [n for n, t in tasks.items() if t["in_domain"]]
    assert in_domain == ["sentiment", "subjectivity", "bbc_topic", "debate_party", "chatter_topic"]
    assert [n for n, t in tasks.items() if not t["in_domain"]] == ["language_id"]
    experts = {r["name"]: r for r in res["rows"]}["individual experts"]["test"]
    for name in in_domain:
        chance = 1 / len(tasks[name]["classes"])
        assert experts[name] > chance + 0.1, (name, experts[name])
    for row in res["rows"]:
        assert row["transductive"] is False
        for name in in_domain:
            acc = row["test"][name]
            assert 0 <= acc <= 1
            assert row["normalized"][name] == pytest.approx(100 * acc / experts[name])
        assert row["mean_normalized"] == pytest.approx(sum(row["normalized"].values()) / len(in_domain))
        if row["kind"] == "method":
            assert row["params"] and row["val_mean"] is not None and 0 <= row["ood"]["language_id"] <= 1
    assert set(res["timings"]) >= {"training", "merging", "evaluation", "total"}


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI run above (module docstring)
    yield
    torch.set_num_threads(n)


def test_lora_expert_is_merged_into_the_targeted_weights(one_thread):
    """A LoRA expert (tiny budget) comes back as a plain backbone: only the LoRA-targeted weights moved."""
    suite = TextSuite()
    budget = Budget(quick=True, train_steps=6, batch_size=8, eval_examples=30, probe_steps=30,
                    extra={"seq_len": 16, "train_examples": 48, "val_examples": 12})
    task = next(t for t in suite.tasks(budget) if t.name == "chatter_topic")
    expert = suite.train_expert(task, budget, "lora", seed=0)
    base = suite.backbone_state()
    assert set(expert.backbone) == set(base)
    moved = {k for k in base if not torch.equal(base[k], expert.backbone[k])}
    targeted = {k for k in base if re.search(rf"\.({'|'.join(LORA_TARGETS)})\.weight$", k)}
    assert moved and moved <= targeted
    assert expert.test_score > 1 / task.num_classes
