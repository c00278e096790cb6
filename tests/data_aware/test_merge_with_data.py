"""Data-aware merges of a user's own models (issue #17, item 4): ``neuromerge merge CONFIG -o OUT`` with ``data:``
runs Fisher, RegMean and AdaMerging(++) on a Hugging Face base + task file + experts (a PEFT adapter and a full
checkpoint), writes a loadable folder with ``heads/``, ``merge_report.json`` and ``provenance.json``; RegMean equals
the closed form computed here; bad configs are refused before any weight is read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.config import load_config
from neuromerge.errors import ConfigError
from neuromerge.tasks.hf import HFSuite, load_user_model

from ..routing.test_routed_methods import hf_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
runner = CliRunner()

DATA = {"tasks": "tasks.yaml", "train_examples": 12, "val_examples": 6, "probe_steps": 5}
LAYER = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder, a task file with two tasks, expert t0 a LoRA adapter, expert t1 a full checkpoint."""
    tmp = tmp_path_factory.mktemp("user")
    _, merged = hf_fixture(tmp)
    merged[1].save_pretrained(tmp / "full1")
    return tmp


def _config(folder: Path, name: str, method: str, **extra: Any) -> Path:
    cfg = {"merge_method": method, "base_model": "base",
           "models": [{"model": "ad0", "task": "t0"}, {"model": "full1", "task": "t1"}], "data": DATA, **extra}
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _errors(args: list[str], out: Path) -> str:
    """Run the CLI: exit 2, ``error:`` lines only, no traceback, nothing written; the text without the prefix."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not [p for p in out.parent.iterdir() if "neuromerge-tmp" in p.name]
    return "\n".join(line.removeprefix("error: ") for line in lines)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ RegMean
def test_regmean_cli_writes_a_loadable_folder_equal_to_the_closed_form(user: Path) -> None:
    from transformers import BertModel

    cfg = _config(user, "regmean.yaml", "regmean", parameters={"examples": 8, "batch_size": 4, "alpha": 0.9})
    out = user / "out-regmean"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "regmean" in res.output and "peak RSS" in res.output

    # a normal HF folder: loads with from_pretrained, tokenizer and config copied
    model = BertModel.from_pretrained(out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    written = load_file(str(out / "model.safetensors"))

    # the independent reference: the same experts and the same 8 train examples per task, Grams by hooks here
    ts = load_user_model({"base": "base", "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "full1"},
                          **{k: v for k, v in DATA.items() if k != "tasks"}}, source=cfg)
    grams, weights = [], []
    for expert, task in zip(ts.experts, ts.tasks, strict=True):
        module = ts.suite.module(expert.backbone)
        rows: list[torch.Tensor] = []
        batches = ts.suite.batches(task, "train", ts.budget, limit=8, batch_size=4)
        for b in batches:
            captured: list[torch.Tensor] = []
            h = module.get_submodule(LAYER).register_forward_pre_hook(
                lambda _m, args, captured=captured: captured.append(args[0].detach()))
            with torch.no_grad():
                module(**b.inputs)
            h.remove()
            rows.append(captured[0][b.mask.bool()].double())  # real tokens only
        x = torch.cat(rows)
        assert sum(len(b) for b in batches) == 8
        g = x.T @ x / x.shape[0]
        grams.append(0.9 * g + 0.1 * torch.diag(torch.diagonal(g)))
        weights.append(expert.backbone[f"{LAYER}.weight"].double())
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights, strict=True))).T
    torch.testing.assert_close(written[f"{LAYER}.weight"].double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, weights[0], atol=1e-3)  # a real merge, not a copy of one expert
    # other merged tensors are averaged; the pooler (default `exclude`) is the base's
    bias = f"{LAYER}.bias"
    torch.testing.assert_close(written[bias], (ts.experts[0].backbone[bias] + ts.experts[1].backbone[bias]) / 2)
    torch.testing.assert_close(written["pooler.dense.weight"], ts.base["pooler.dense.weight"])
    torch.testing.assert_close(model.state_dict()[f"{LAYER}.weight"], written[f"{LAYER}.weight"])

    # heads: each task's probe head, as the TaskSet fits it
    for expert in ts.experts:
        head = load_file(str(out / "heads" / f"{expert.task}.safetensors"))
        assert head["weight"].shape == (2, 32) and head["bias"].shape == (2,)
        torch.testing.assert_close(head["weight"], expert.head["weight"])

    report = json.loads((out / "merge_report.json").read_text())
    assert report["peak_rss_bytes"] > 0 and report["timings_s"]["total"] > 0
    assert report["method"]["examples"] == {"t0": 8, "t1": 8} and report["method"]["passes"] == 1
    assert report["expert_reads"] == {"t0": 1, "t1": 1}  # one pass: each expert read once
    prov = json.loads((out / "provenance.json").read_text())
    data = prov["data"]
    assert data["split"] == "train" and data["transductive"] is False
    assert data["sha256"] == _sha256(user / "tasks.yaml")
    assert data["tasks"]["t0"]["examples"] == 8 and data["tasks"]["t0"]["sha256"] == _sha256(user / "t0.jsonl")
    assert data["tasks"]["t1"]["split_sizes"]["train"] == 12 and data["tasks"]["t1"]["head"]["split"] == "train"
    kinds = {r.get("task"): r["kind"] for r in prov["inputs"]}
    assert kinds == {None: "full", "t0": "lora", "t1": "full"}
    assert all("sha256" in r or "header_sha256" in r for r in prov["inputs"])


def test_regmean_in_several_passes_equals_one_pass(user: Path) -> None:
    """``gram_mb`` small (80 KiB: a 32 x 32 layer needs 32 KiB): the layers are merged in groups (each expert read once
    per group), same result."""
    from neuromerge.data_aware.regmean import RegMeanParams, regmean_merge_models

    ts = load_user_model({"base": "base", "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "full1"},
                          **{k: v for k, v in DATA.items() if k != "tasks"}}, source=user / "x.yaml")
    states = [e.backbone for e in ts.experts]
    one: dict[str, Any] = {}
    many: dict[str, Any] = {}
    a = regmean_merge_models(ts.suite, ts.base, states, [None, None], ts.tasks, ts.budget,
                             RegMeanParams(examples=8, batch_size=4), info=one)
    b = regmean_merge_models(ts.suite, ts.base, states, [None, None], ts.tasks, ts.budget,
                             RegMeanParams(examples=8, batch_size=4, gram_mb=0.08), info=many)
    assert one["passes"] == 1 and many["passes"] > 1 and many["expert_reads"] == 2 * many["passes"]
    assert one["linear_layers"] == many["linear_layers"] == 13  # 2 layers x 6 linears + the pooler
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ other methods
@pytest.mark.parametrize(("method", "params", "split"), [
    ("fisher", {"examples": 4}, "train"),
    ("adamerging", {"steps": 2, "batch_size": 4}, "test"),
    ("adamerging++", {"steps": 2, "batch_size": 4, "granularity": "task"}, "test"),
])
def test_fisher_and_adamerging_run_end_to_end_from_python(user: Path, method: str, params: dict[str, Any],
                                                          split: str) -> None:
    from transformers import BertModel

    cfg = _config(user, f"{method}.yaml", method, parameters=params)
    out = user / f"out-{method}"
    result = neuromerge.merge(cfg, out)
    BertModel.from_pretrained(out)
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["t0.safetensors", "t1.safetensors"]
    assert result.report["summary"]["method"] == method and result.report["peak_rss_bytes"] > 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["data"]["split"] == split and prov["data"]["transductive"] is (split == "test")
    examples = prov["data"]["tasks"]["t0"]["examples"]
    assert examples == (4 if method == "fisher" else 6)  # AdaMerging: the evaluation subset (val_examples) of test
    if method != "fisher":
        assert result.report["method"]["steps"] == 2 and result.report["method"]["unlabelled"] is True
        assert any("transductive" in w for w in result.report["warnings"])


def test_adamerging_on_the_validation_split_is_not_transductive(user: Path) -> None:
    out = user / "out-ada-val"
    cfg = _config(user, "ada-val.yaml", "adamerging", data_split="val", parameters={"steps": 1})
    result = neuromerge.merge(cfg, out)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["data"]["split"] == "val" and prov["data"]["transductive"] is False
    assert result.report["method"]["split"] == "val"


# ------------------------------------------------------------------------------------------------ refusals
def test_dry_run_checks_without_reading_weights(user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("a model was loaded by --dry-run")

    monkeypatch.setattr(HFSuite, "__init__", forbidden)
    cfg = _config(user, "dry.yaml", "regmean")
    out = user / "dry-out"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "regmean (data-aware)" in res.output and "task t1" in res.output and not out.exists()

    def refused(name: str, **change: Any) -> str:
        raw = yaml.safe_load(cfg.read_text())
        raw.update(change)
        path = user / name
        path.write_text(yaml.safe_dump(raw))
        return _errors(["merge", str(path), "-o", str(out), "--dry-run"], out)

    assert "full1): a data-aware merge needs the model's `task:`" in refused(
        "no-task.yaml", models=[{"model": "ad0", "task": "t0"}, {"model": "full1"}])
    assert "models[1] (task nope)" in refused("unknown-task.yaml", models=[{"model": "ad0", "task": "t0"},
                                                                           {"model": "full1", "task": "nope"}])
    assert "data: task file" in refused("no-file.yaml", data="missing.yaml")
    assert "already the task of models[0]" in refused("dup.yaml", models=[{"model": "ad0", "task": "t0"},
                                                                         {"model": "full1", "task": "t0"}])
    assert "needs task data" in refused("no-data.yaml", data=None)
    assert "static merge and reads no task data" in refused("static.yaml", merge_method="ties")
    assert "route build wemoe" in refused("wemoe.yaml", merge_method="wemoe")
    assert "unknown parameter 'density'" in refused("param.yaml", parameters={"density": 0.5})
    assert "lora is not supported" in refused("lora.yaml", output={"format": "lora", "rank": 2})


def test_without_data_the_refusal_stays_and_the_engine_refuses_data(user: Path) -> None:
    from neuromerge.engine.run import prepare

    with pytest.raises(ConfigError, match=r"needs task data.*data: TASKS.yaml.*neuromerge bench"):
        load_config({"merge_method": "fisher", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(ConfigError, match="data-aware merge"):
        prepare(_config(user, "engine.yaml", "regmean"))


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """README, "Data-aware merges of your own models": examples/data_aware_merge.py's inputs, merged from Python."""
    import importlib.util

    from transformers import AutoModel

    path = Path(__file__).resolve().parents[2] / "examples" / "data_aware_merge.py"
    spec = importlib.util.spec_from_file_location("data_aware_merge", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = example.build(tmp_path / "demo")
    result = neuromerge.merge(config, tmp_path / "demo" / "merged-py")
    assert result.report["method"]["examples"] == {"sentiment": 32, "topic": 32}
    AutoModel.from_pretrained(tmp_path / "demo" / "merged-py")
    assert (tmp_path / "demo" / "merged-py" / "heads" / "topic.safetensors").is_file()


def test_checkpoint_names_map_to_the_backbone_with_or_without_a_prefix() -> None:
    """A base saved from a task model (``bert.`` prefix, a ``classifier``) writes merged values under its own names;
    tensors outside the backbone are not mapped (copied from the base)."""
    from neuromerge.data_aware.merge import _name_map

    keys = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"]
    prefixed = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                "classifier.weight"]
    assert _name_map(prefixed, keys) == {prefixed[0]: keys[0], prefixed[1]: keys[1]}
    assert _name_map(keys, keys) == {k: k for k in keys}
