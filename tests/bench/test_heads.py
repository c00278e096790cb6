"""Frozen heads (issue #18 §6): heads fit on θ0 and fixed while the experts train — the default of the text and
vision suites; the previous protocol (heads trained from zero) stays selectable and is a different cache key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from neuromerge.bench import suites, text, vision, vision_data
from neuromerge.bench.suites import BenchError, with_heads
from neuromerge.tasks.contract import Budget

TEXT_BUDGET = Budget(quick=True, train_steps=3, batch_size=8, eval_examples=24, probe_steps=30,
                     extra={"seq_len": 16, "train_examples": 48, "val_examples": 12})
VISION_BUDGET = Budget(quick=True, train_steps=3, batch_size=16, eval_examples=40, probe_steps=20,
                       extra={"bn_reestimate": True, "bn_batches": 1, "bn_batch_size": 32, "train_examples": 96,
                              "probe_examples": 96})


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROMERGE_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_defaults_are_frozen_and_trained_is_the_old_config():
    assert text.TextTrainConfig().heads == "frozen" and vision.TrainConfig().heads == "frozen"
    old = text.TextTrainConfig(head_init="zero", freeze_head=False)
    assert text.TextTrainConfig().with_heads("trained") == old
    assert vision.TrainConfig().with_heads("trained").freeze_head is False
    assert suites.HEADS[0] == "frozen"


def test_heads_are_part_of_the_cache_key():
    frozen, trained = text.TextSuite(), with_heads(text.TextSuite(), "trained")
    assert frozen.fingerprint() != trained.fingerprint()
    v_frozen, v_trained = vision.VisionSuite(), with_heads(vision.VisionSuite(), "trained")
    assert v_frozen.fingerprint() != v_trained.fingerprint()
    assert with_heads(vision.VisionSuite(), "frozen").fingerprint() == v_frozen.fingerprint()


def test_bad_heads_are_one_clear_error():
    with pytest.raises(BenchError, match="--heads must be one of frozen, trained"):
        with_heads(text.TextSuite(), "fixed")
    from neuromerge.bench.llm import LLMSuite

    with pytest.raises(BenchError, match="no task heads"):
        with_heads(LLMSuite(), "frozen")


@pytest.mark.parametrize("heads", ["frozen", "trained"])
def test_text_expert_head_is_the_base_probe_bitwise_when_frozen(heads):
    suite = with_heads(text.TextSuite(), heads)
    task = next(t for t in suite.tasks(TEXT_BUDGET) if t.name == "subjectivity")
    base = suite.backbone_state()
    expert = suite.train_expert(task, TEXT_BUDGET, "full", seed=0)
    probe = suite.fit_probe(base, task, TEXT_BUDGET, 0)  # the "pretrained + heads" row's head
    assert _changed(base, expert.backbone)  # the backbone did train
    assert expert.meta["heads"] == heads
    if heads == "frozen":
        assert all(torch.equal(expert.head[k], probe[k]) for k in ("weight", "bias"))
    else:
        assert not torch.equal(expert.head["weight"], probe["weight"])
        assert expert.head["weight"].abs().sum() > 0  # trained from zero


@pytest.mark.parametrize("heads", ["frozen", "trained"])
def test_vision_expert_head_is_the_base_probe_bitwise_when_frozen(heads):
    suite = with_heads(vision.VisionSuite(), heads)
    task = vision_data.image_task("digits", sizes=(96, 40, 40))
    base = suite.backbone_state()
    expert = suite.train_expert(task, VISION_BUDGET, "full", seed=0)
    probe = suite.fit_probe(base, task, VISION_BUDGET, 0)
    weights = [k for k in base if not vision._is_bn_buffer(k)]
    assert any(not torch.equal(base[k], expert.backbone[k]) for k in weights)
    assert expert.meta["heads"] == heads
    if heads == "frozen":
        assert all(torch.equal(expert.head[k], probe[k]) for k in ("weight", "bias"))
    else:
        assert not torch.equal(expert.head["weight"], probe["weight"])


def test_frozen_vision_lora_expert_keeps_the_probe_head():
    suite = vision.VisionSuite()
    task = vision_data.image_task("digits", sizes=(96, 40, 40))
    budget = dataclasses.replace(VISION_BUDGET, train_steps=2)
    expert = suite.train_expert(task, budget, "lora", seed=1)
    probe = suite.fit_probe(suite.backbone_state(), task, budget, 1)
    assert all(torch.equal(expert.head[k], probe[k]) for k in ("weight", "bias"))


def test_cli_refuses_an_unknown_head_protocol(tmp_path):
    env = {**os.environ, "NEUROMERGE_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "neuromerge.cli", "bench", "text", "--quick", "--heads", "fixed",
                           "-o", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--heads must be one of frozen, trained" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_applies_the_head_protocol(monkeypatch):
    """``neuromerge.bench.run(..., heads=...)`` configures the suite before the protocol sees it."""
    import neuromerge.bench as bench
    from neuromerge.bench import protocol

    seen = []
    monkeypatch.setattr(protocol, "run_suite", lambda suite, *a, **k: seen.append(suite) or "ran")
    assert bench.run("text", heads="trained") == "ran"
    assert isinstance(seen[0], text.TextSuite) and seen[0].config.heads == "trained"
    assert bench.run(vision.VisionSuite(), heads="trained") == "ran" and seen[1].config.heads == "trained"
    assert bench.run("text") == "ran" and seen[2] == "text"  # no heads given: the suite's default (frozen)
    with pytest.raises(BenchError, match="no task heads"):
        bench.run("llm", heads="frozen")
