"""``neuromerge export-experts``: the text suite's quick experts (two tasks, a tmp cache) as HF folders / PEFT adapters
that load, equal the cached experts, and feed ``neuromerge merge`` and ``route build`` as written."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from neuromerge.cli import app

TASKS = ["sentiment", "subjectivity"]  # in a whole test run, test_text_quick.py reuses these full-mode experts
runner = CliRunner()


@pytest.fixture(scope="module")
def cache(text_bench_cache) -> Path:
    """The quick text bench's cache: the full-mode experts of a whole test run are shared with it."""
    return text_bench_cache


@pytest.fixture(scope="module")
def env(cache):
    old = os.environ.get("NEUROMERGE_CACHE")
    os.environ["NEUROMERGE_CACHE"] = str(cache)
    yield {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if old is None:
        os.environ.pop("NEUROMERGE_CACHE", None)
    else:
        os.environ["NEUROMERGE_CACHE"] = old


@functools.cache
def _cached(mode: str, tasks: tuple[str, ...]):
    """The bench's own experts for ``tasks`` (the same cache entries the export read)."""
    from neuromerge.bench.protocol import prepare_suite, train_experts

    prep = prepare_suite("text", list(tasks), quick=True, mode=mode)
    train_experts(prep, 0)
    assert all(info["cached"] for info in prep.expert_info.values())
    return prep


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("export") / "full"
    proc = subprocess.run([sys.executable, "-m", "neuromerge.cli", "export-experts", "text", "-o", str(out),
                           "--quick", "--tasks", ",".join([*TASKS, "language_id"]), "--threads", "1",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, env):
    from neuromerge.bench.export import export_experts

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export") / "lora"
    res = export_experts(out, "text", mode="lora", quick=True, tasks=TASKS[:1])
    return out, res


def test_layout_and_manifest(full_export):
    out, proc = full_export
    assert "neuromerge merge" in proc.stdout
    for rel in ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "tasks.yaml", "merge.yaml",
                "export.json", *(f"experts/{t}/model.safetensors" for t in TASKS),
                *(f"heads/{t}.safetensors" for t in TASKS), *(f"data/{t}.jsonl" for t in [*TASKS, "language_id"])):
        assert (out / rel).is_file(), rel
    assert not (out / "route.yaml").exists()  # route build needs LoRA adapters
    assert not (out / "experts" / "language_id").exists()  # out of domain: data only
    info = json.loads((out / "export.json").read_text())
    assert info["mode"] == "full" and info["quick"] is True
    assert [t["name"] for t in info["tasks"]] == [*TASKS, "language_id"]
    assert not [p for p in out.parent.iterdir() if "neuromerge-tmp" in p.name]


def test_base_and_full_experts_load_and_equal_the_cache(full_export):
    from transformers import AutoModel

    out, _ = full_export
    prep = _cached("full", tuple(TASKS))
    base = AutoModel.from_pretrained(out / "base").state_dict()
    for k, v in prep.base.items():
        assert torch.equal(base[k], v), k
    for t in TASKS:
        sd = AutoModel.from_pretrained(out / "experts" / t).state_dict()
        expert = prep.experts[t]
        for k, v in expert.backbone.items():
            assert torch.equal(sd[k], v), (t, k)
        assert torch.equal(sd["pooler.dense.weight"], base["pooler.dense.weight"])  # unused, the base's
        head = load_file(out / "heads" / f"{t}.safetensors")
        assert torch.equal(head["weight"], expert.head["weight"]) and torch.equal(head["bias"], expert.head["bias"])


def test_task_file_parses_with_the_heads_classes(full_export):
    from neuromerge.bench.suite import Budget
    from neuromerge.bench.taskfile import load_task_file, read_entries

    out, _ = full_export
    entries = {e.name: e for e in read_entries(out / "tasks.yaml")}
    assert set(entries) == {*TASKS, "language_id"} and entries["language_id"].in_domain is False
    prep = _cached("full", tuple(TASKS))
    tasks = {t.name: t for t in load_task_file(out / "tasks.yaml", "text", Budget())}
    for t in prep.chosen:
        assert tasks[t.name].classes == t.classes
        n = len(t.train) + len(t.val) + len(t.test)
        assert len(tasks[t.name].train) + len(tasks[t.name].val) + len(tasks[t.name].test) == n


def test_merge_runs_on_the_exported_folders(full_export, tmp_path):
    from transformers import AutoModel

    out, _ = full_export
    cfg = yaml.safe_load((out / "merge.yaml").read_text())
    assert cfg["merge_method"] == "ties" and len(cfg["models"]) == len(TASKS)
    res = runner.invoke(app, ["merge", str(out / "merge.yaml"), "-o", str(tmp_path / "merged"), "--threads", "1",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    AutoModel.from_pretrained(tmp_path / "merged")


def test_lora_experts_are_peft_adapters_equal_to_the_cache(lora_export, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from neuromerge.bench.routed_methods import validate_route_build

    out, res = lora_export
    assert res.mode == "lora" and res.experts == TASKS[:1]
    prep = _cached("lora", tuple(TASKS[:1]))
    t = TASKS[0]
    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(out / "base"), out / "experts" / t)
    sd = merged.merge_and_unload().state_dict()
    for k, v in prep.experts[t].backbone.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6)
    route = yaml.safe_load((out / "route.yaml").read_text())
    assert list(route["experts"]) == TASKS[:1]
    cfg, _ = validate_route_build(route, source=out / "route.yaml")  # every path, the task file, the adapters
    assert Path(cfg.base) == out / "base"
    ok = runner.invoke(app, ["merge", str(out / "merge.yaml"), "-o", str(tmp_path / "m"), "--no-progress"])
    assert ok.exit_code == 0, ok.output


def test_refusals(full_export, cache):
    out, _ = full_export
    for args, message in (
        (["export-experts", "text", "-o", str(out), "--quick", "--tasks", "sentiment"], "exists; pass --force"),
        (["export-experts", "vision", "-o", str(out.parent / "v")], "supports the suite(s) text"),
        (["export-experts", "text", "-o", str(out.parent / "m"), "--mode", "nope"], "--mode must be one of"),
        (["export-experts", "text", "-o", str(cache), "--force"], "is the input"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
