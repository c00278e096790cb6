"""WEMoE routed-model folders: save → load_routed round trips (base referenced, embedded, or given), route info,
refusals and named errors."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import neuromerge
from neuromerge.data_aware.wemoe import WEMoEModel, WEMoEParams, build_wemoe
from neuromerge.errors import CheckpointError, CompatibilityError
from neuromerge.routing.wemoe import load_wemoe, save_wemoe

from .test_runtime import ids_batch, tiny_bert, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

StateDict = dict[str, torch.Tensor]


def _family(model: nn.Module, n: int = 3) -> tuple[Callable[[StateDict], nn.Module], StateDict, list[StateDict]]:
    """``(make_module, base state, expert states)``: experts are the base with every float tensor perturbed."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for t in range(n):
        g = torch.Generator().manual_seed(100 + t)
        experts.append({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                        for k, v in base.items()})

    def make(state: StateDict) -> nn.Module:
        import copy

        m = copy.deepcopy(model)
        m.load_state_dict(state)
        return m.eval()

    return make, base, experts


def _wemoe(model: nn.Module, params: WEMoEParams, seed: int = 0) -> WEMoEModel:
    """A WEMoE model whose routers give sample-dependent weights (last router layer scaled up)."""
    make, base, experts = _family(model)
    wm = build_wemoe(make, base, experts, params, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for r in wm.routers.values():
            if r.depth:
                r.layers[-1].weight.mul_(60)
            else:
                r.weight.copy_(torch.tensor([0.5, -0.2, 0.9]))
    return wm


def _inputs() -> dict[str, torch.Tensor]:
    ids = ids_batch(4, 7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _assert_same(a: WEMoEModel, b: WEMoEModel) -> None:
    inputs = _inputs()
    got, want = _out(b, inputs), _out(a, inputs)
    assert not torch.equal(want, _out(a, {**inputs, "input_ids": inputs["input_ids"].flip(0)}))  # inputs matter
    assert torch.equal(got, want)
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [-0.3, 1.2, 0.4]])
    with a.forced(gates), b.forced(gates):
        assert torch.equal(_out(b, inputs), _out(a, inputs))


@pytest.fixture
def bert_case(tmp_path: Path) -> tuple[Path, WEMoEModel]:
    base_dir = tmp_path / "bert"
    tiny_bert().save_pretrained(base_dir)
    import transformers as tf

    base = tf.BertModel.from_pretrained(base_dir).eval()
    return base_dir, _wemoe(base, WEMoEParams(router_hidden_layers=2))


def test_round_trip_with_referenced_base_stores_only_changed_tensors(tmp_path: Path,
                                                                     bert_case: tuple[Path, WEMoEModel]) -> None:
    base_dir, wm = bert_case
    folder = save_wemoe(wm, tmp_path / "routed", base_ref=str(base_dir), tasks=["a", "b", "c"], extra={"k": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "router.safetensors", "wemoe.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "neuromerge-routed" and manifest["version"] == 1 and manifest["method"] == "wemoe"
    assert manifest["tasks"] == ["a", "b", "c"] and manifest["extra"] == {"k": 1}
    spec = manifest["wemoe"]
    assert [g["name"] for g in spec["groups"]] == ["encoder.layer.0", "encoder.layer.1"]
    # the routed MLP linears keep the base weights: only the Task-Arithmetic-merged tensors are stored
    mlp = {f"{lin}.{p}" for g in wm.groups for lin in g.linears for p in ("weight", "bias")}
    floats = {n for n, t in wm.backbone.state_dict().items() if t.is_floating_point()}
    assert set(spec["backbone_tensors"]) == floats - mlp and "encoder.layer.0.attention.output.dense.weight" in floats
    loaded = neuromerge.load_routed(folder)
    assert isinstance(loaded, WEMoEModel) and not loaded.training
    assert loaded.gate == wm.gate and loaded.experts == 3 and loaded.groups == wm.groups
    _assert_same(wm, loaded)


def test_round_trip_embedded_llama_softmax_and_given_module(tmp_path: Path) -> None:
    wm = _wemoe(tiny_llama(), WEMoEParams(router_hidden_layers=1, gate="softmax"), seed=2)
    folder = save_wemoe(wm, tmp_path / "llama", embed_base=True)
    assert (folder / "base" / "config.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tasks"] == ["task0", "task1", "task2"] and manifest["wemoe"]["backbone_tensors"] == []
    assert len(manifest["wemoe"]["groups"][0]["linears"]) == 3  # gate / up / down projections
    loaded = neuromerge.load_routed(folder)
    assert isinstance(loaded, WEMoEModel) and loaded.gate == "softmax"
    _assert_same(wm, loaded)
    # depth-0 routers, no base at all: the whole backbone is stored and a same-architecture module receives it
    wm0 = _wemoe(tiny_bert(), WEMoEParams(router_hidden_layers=0), seed=3)
    bare = save_wemoe(wm0, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="module="):
        load_wemoe(bare)
    _assert_same(wm0, neuromerge.load_routed(bare, module=tiny_bert(seed=9)))


def test_route_info_json_and_text(tmp_path: Path, bert_case: tuple[Path, WEMoEModel]) -> None:
    from typer.testing import CliRunner

    from neuromerge.cli import app

    base_dir, wm = bert_case
    folder = save_wemoe(wm, tmp_path / "routed", base_ref=str(base_dir), tasks=["a", "b", "c"])
    runner = CliRunner()
    res = runner.invoke(app, ["route", "info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["method"] == "wemoe" and doc["tasks"] == ["a", "b", "c"]
    assert [e["modules"] for e in doc["experts"]] == [4, 4, 4]  # 2 MLPs × (intermediate, output)
    assert doc["policy"]["routed_mlps"] == 2 and doc["policy"]["gate"] == "linear"
    assert doc["router"]["config"]["depth"] == 2 and doc["base"]["ref"] == str(base_dir)
    assert set(doc["storage_bytes"]) == {"backbone", "task_vectors", "routers"}
    res = runner.invoke(app, ["route", "info", str(folder)])
    assert res.exit_code == 0 and "method: wemoe" in res.output and "experts (3)" in res.output


def test_refusals_and_named_errors(tmp_path: Path, bert_case: tuple[Path, WEMoEModel]) -> None:
    base_dir, wm = bert_case
    folder = save_wemoe(wm, tmp_path / "routed", base_ref=str(base_dir))
    with pytest.raises(Exception, match="exists"):
        save_wemoe(wm, folder, base_ref=str(base_dir))
    save_wemoe(wm, folder, base_ref=str(base_dir), force=True)
    small = tmp_path / "small"  # the header hash covers tensor names, shapes and dtypes (not values)
    tiny_bert(intermediate=48).save_pretrained(small)
    with pytest.raises(CompatibilityError, match="header hash"):
        neuromerge.load_routed(folder, base=small)
    with pytest.raises(CompatibilityError, match=r"intermediate\.dense\.weight has shape"):
        load_wemoe(folder, base=small, check_hash=False)
    with pytest.raises(CompatibilityError, match="does not fit"):
        save_wemoe(wm, tmp_path / "bad", base_ref=str(small))
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for name in ("wemoe.safetensors", "router.safetensors"):
        broken = tmp_path / f"no-{name}"
        shutil.copytree(folder, broken)
        (broken / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            neuromerge.load_routed(broken)
    bad = tmp_path / "bad-router"
    shutil.copytree(folder, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["router"]["config"]["depth"] = 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="router"):
        neuromerge.load_routed(bad)
