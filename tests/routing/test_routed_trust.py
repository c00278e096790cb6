"""Routed builds a user can trust and inspect (#17 item 8): the router's validation accuracy per task against
chance (printed, in the manifest, in ``route info``; a warning near chance), the inputs the build read (split rows
of the data files: router-train, validation and test disjoint), each task's head saved and restored by
``load_routed``, ``--threads`` and the ``route_build`` Python API."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from neuromerge.cli import app
from neuromerge.routing.build_config import split_sha256
from neuromerge.routing.router_fit import NEAR_CHANCE_MARGIN, near_chance, pooled_validation, router_validation
from neuromerge.tasks.hf import open_user_model, validate_user_model
from neuromerge.tasks.splits import make_splits

from .test_recombination import bert_family, routed_bert  # noqa: F401  (fixtures)
from .test_routed_methods import ROUTER_FAST, hf_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _write_cfg(tmp_path: Path, cfg: dict[str, Any], name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _uninformative(tmp_path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Both tasks read one file whose texts differ only in whitespace: every input has the same tokens, so the
    same router features — no router can tell the tasks apart."""
    rows = [{"text": "w1" + " " * (k + 1) + "w2", "label": k % 2} for k in range(30)]
    (tmp_path / "same.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "same.yaml").write_text("tasks:\n  - {name: t0, file: same.jsonl}\n  - {name: t1, file: same.jsonl}\n")
    return {**cfg, "tasks": str(tmp_path / "same.yaml")}


# ------------------------------------------------------------------------------------------------ the rule
def test_router_validation_and_the_chance_rule() -> None:
    target = torch.tensor([0] * 10 + [1] * 10 + [2] * 20)
    pred = torch.tensor([0] * 9 + [1] + [1] * 3 + [0] * 7 + [2] * 20)
    rv = router_validation(pred, target, ["a", "b", "c"], [50, 50, 100])
    assert rv["a"] == {"accuracy": pytest.approx(0.9), "n": 10, "chance": pytest.approx(1 / 3), "train_n": 50}
    assert rv["b"]["accuracy"] == pytest.approx(0.3) and rv["c"]["accuracy"] == 1.0
    pooled = pooled_validation(rv)
    assert pooled == {"accuracy": pytest.approx(32 / 40), "n": 40, "chance": pytest.approx(0.5)}  # majority share
    lines = near_chance(rv)
    assert len(lines) == 1 and "'b'" in lines[0] and "30.0%" in lines[0] and "33.3%" in lines[0]
    # within the margin of chance warns; one margin above does not
    at = {"x": {"accuracy": 0.5 + NEAR_CHANCE_MARGIN - 1e-9, "n": 10, "chance": 0.5},
          "y": {"accuracy": 0.5 + NEAR_CHANCE_MARGIN + 1e-9, "n": 10, "chance": 0.5}}
    assert [line.split("'")[1] for line in near_chance(at)] == ["x"]
    # a constant router: one task perfect, the others at 0, the pooled accuracy at the majority share
    const = router_validation(torch.zeros(30, dtype=torch.long), torch.tensor([0] * 20 + [1] * 10), ["p", "q"])
    msgs = near_chance(const)
    assert len(msgs) == 2 and "'q'" in msgs[0] and "over all tasks" in msgs[1] and "66.7%" in msgs[1]
    assert near_chance({"only": {"accuracy": 1.0, "n": 5, "chance": 1.0}}) == []  # one task: nothing to route
    assert near_chance(None) == []


def test_splits_record_the_data_file_rows() -> None:
    texts = ["a", "b", " a ", "c", "", "d", "e", "b", "f", "g", "h", "i", "j", "k", "l", "m"]
    labels = [0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1]  # "b" appears with two labels: dropped
    task = make_splits("t", texts, labels, ["x", "y"], seed=3, sizes=None)
    rows = [r for s in (task.train, task.val, task.test) for r in s.rows]
    assert len(rows) == len(set(rows)) == 12  # disjoint; "", both "b" and the repeated "a" are not examples
    assert 2 not in rows and 4 not in rows and 1 not in rows and 7 not in rows
    for split in (task.train, task.val, task.test):
        assert [texts[r].strip() for r in split.rows] == split.inputs
        assert split.labels.tolist() == [labels[r] for r in split.rows]


# ------------------------------------------------------------------------------------------------ end to end
def test_route_build_prints_validation_records_inputs_and_heads(tmp_path: Path) -> None:
    cfg, _ = hf_fixture(tmp_path)
    cfg["params"] = {**cfg["params"], "router_examples": 10, "router_val_examples": 4}
    path = _write_cfg(tmp_path, cfg)
    out = tmp_path / "routed"
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["route", "build", "min_merging", "--config", str(path), "-o", str(out),
                                       "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "router validation:" in res.output
    assert "  t0: " in res.output and "(chance 50.0%)" in res.output and "validation inputs" in res.output
    assert "warning:" not in res.output  # the tasks' words differ: the router tells them apart

    manifest = json.loads((out / "manifest.json").read_text())
    rv = manifest["router_validation"]
    assert list(rv) == ["t0", "t1"]
    for v in rv.values():  # 30 rows per task: 18 / 6 / 6; the router reads the first 10 train and 4 val inputs
        assert v["n"] == 4 and v["chance"] == 0.5 and v["train_n"] == 10 and v["accuracy"] >= 0.75
    meta = manifest["extra"]["meta"]
    chosen = meta["feature_source"]
    assert pooled_validation(rv)["accuracy"] == pytest.approx(meta["router_val_acc"][chosen])

    # inputs: the rows of each split in its data file; router-train, validation and test rows disjoint
    ucfg, _ = validate_user_model({k: v for k, v in cfg.items() if k != "params"})
    ts = open_user_model(ucfg)
    for t, task in zip(["t0", "t1"], ts.tasks, strict=True):
        rec = manifest["inputs"][t]
        assert rec["seed"] == 0 and rec["file"] == str(tmp_path / f"{t}.jsonl") and rec["fingerprint"]
        assert [rec[s]["n"] for s in ("train", "val", "test")] == [18, 6, 6]
        # the probes read the whole train split, the layer importance the whole val split; nothing reads test
        assert rec["train"]["used"] == 18 and rec["val"]["used"] == 6 and rec["test"]["used"] == 0
        assert rec["train"]["router"] == 10 and rec["val"]["router"] == 4 and rec["test"]["router"] == 0
        router_train = rec["train"]["rows"][:rec["train"]["router"]]
        val = rec["val"]["rows"][:rec["val"]["router"]]
        test = rec["test"]["rows"]
        assert not set(router_train) & set(val) and not (set(router_train) | set(val)) & set(test)
        texts = _jsonl_texts(Path(rec["file"]))
        for s in ("train", "val", "test"):
            assert [texts[r] for r in rec[s]["rows"]] == getattr(task, s).inputs
            assert rec[s]["sha256"] == split_sha256(getattr(task, s))

    # heads: the experts' probe heads, saved and restored
    assert manifest["heads"] == {"t0": "heads/t0.safetensors", "t1": "heads/t1.safetensors"}
    from neuromerge.routing import load_routed

    model = load_routed(out)
    assert set(model.heads) == {"t0", "t1"}
    for e in ts.experts:
        assert set(model.heads[e.task]) == {"weight", "bias"}
        torch.testing.assert_close(model.heads[e.task]["weight"], e.head["weight"])
        torch.testing.assert_close(model.heads[e.task]["bias"], e.head["bias"])
        assert model.heads[e.task]["weight"].shape == (2, 32)

    info = CliRunner().invoke(app, ["route", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    s = json.loads(info.output)
    assert s["router_validation"] == rv and s["router_pooled"]["chance"] == 0.5 and s["heads"] == ["t0", "t1"]
    assert s["inputs"]["t0"]["train"] == {"n": 18, "used": 18, "router": 10}
    text = CliRunner().invoke(app, ["route", "info", str(out)])
    assert "router validation:" in text.output and "inputs t0: read train 18/18 (router 10)" in text.output


def test_a_router_that_cannot_tell_the_tasks_apart_warns(tmp_path: Path) -> None:
    cfg, _ = hf_fixture(tmp_path)
    cfg = _uninformative(tmp_path, {**cfg, "params": {**ROUTER_FAST, "feature_source": "embeddings"}})
    out = tmp_path / "twin"
    res = CliRunner().invoke(app, ["route", "build", "twin", "--config", str(_write_cfg(tmp_path, cfg)), "-o",
                                   str(out)])
    assert res.exit_code == 0, res.output
    rv = json.loads((out / "manifest.json").read_text())["router_validation"]
    assert sorted(v["accuracy"] for v in rv.values()) == [0.0, 1.0]  # one expert takes every input
    assert "warning: router accuracy on task" in res.output and "near or below chance" in res.output
    assert "over all tasks is 50.0%" in res.output
    info = CliRunner().invoke(app, ["route", "info", str(out)])
    assert "warning: router accuracy over all tasks" in info.output

    # the Python API: the same build, the warning as a RouterNearChanceWarning; threads restored
    import neuromerge
    from neuromerge.routing.api import RouterNearChanceWarning

    threads = torch.get_num_threads()
    with pytest.warns(RouterNearChanceWarning, match="near or below chance"):
        path = neuromerge.route_build("twin", cfg, tmp_path / "api", threads=1)
    assert path == tmp_path / "api" and torch.get_num_threads() == threads
    assert json.loads((path / "manifest.json").read_text())["router_validation"] == rv
    loaded = neuromerge.load_routed(path)
    assert set(loaded.heads) == {"t0", "t1"}
    with pytest.raises(neuromerge.errors.NeuromergeError, match="exists"):
        neuromerge.route_build("twin", cfg, tmp_path / "api")
    with pytest.raises(neuromerge.errors.NeuromergeError, match="differs"):
        neuromerge.route_build("emr", {**cfg, "method": "twin"}, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_wemoe_folder_records_heads_and_its_test_split_reads(tmp_path: Path) -> None:
    import neuromerge

    cfg, _ = hf_fixture(tmp_path, ("query", "value", "intermediate.dense"))
    path = _write_cfg(tmp_path, {**cfg, "params": {"steps": 2, "batch_size": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", neuromerge.routing.api.RouterNearChanceWarning)
        out = neuromerge.route_build("wemoe", path, tmp_path / "wemoe", threads=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["router_validation"] is None  # per-MLP routers: not task classifiers
    assert manifest["inputs"]["t0"]["test"]["used"] == 6  # WEMoE adapts on the unlabelled test inputs
    model = neuromerge.load_routed(out)
    assert set(model.heads) == {"t0", "t1"} and model.heads["t0"]["bias"].shape == (2,)
    info = CliRunner().invoke(app, ["route", "info", str(out)])
    assert "not task classifiers" in info.output and "test 6/6" in info.output


def test_merge_folder_heads_round_trip(routed_bert, tmp_path: Path) -> None:  # noqa: F811
    from neuromerge.routing import load_routed
    from neuromerge.routing.recombination import ChainRoutedModel, save_chain_routed

    base, lib = routed_bert
    g = torch.Generator().manual_seed(0)
    heads = {t: {"weight": torch.randn(3, 32, generator=g), "bias": torch.randn(3, generator=g)} for t in lib.tasks}
    heads[lib.tasks[-1]] = None  # a task scored without a head (label words): no file
    folder = save_chain_routed(ChainRoutedModel(base, lib, feature_module="embeddings"), tmp_path / "m",
                               embed_base=True, heads=heads)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["heads"]) == set(lib.tasks[:-1]) and manifest["router_validation"] is None
    loaded = load_routed(folder)
    assert set(loaded.heads) == set(lib.tasks[:-1])
    for t in lib.tasks[:-1]:
        assert torch.equal(loaded.heads[t]["weight"], heads[t]["weight"])
    (folder / manifest["heads"][lib.tasks[0]]).unlink()
    from neuromerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        load_routed(folder)


def test_search_takes_threads(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["search", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "s"),
                                       "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 2 and "No such option" not in res.output and "error:" in res.output
