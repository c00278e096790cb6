"""``slices`` against independent references: a slice that covers every layer is the whole-model merge, the global
trim's population is each slice (checked against the in-memory API on the slice's own tensors), gradients run over a
slice's own layers (direct float64 formula), the CLI's ``--dry-run`` shows the slice plan. mergekit equality is in
tests/peers/test_mergekit_slices.py; the refusals in docs/engine.md's table (tests/engine/test_refusal_table.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.functional import merge_state_dicts


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _run(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    return neuromerge.merge(copy.deepcopy(cfg), out, threads=2, progress=False).report


def _slice(models: list[Path], a: int, b: int, **extra: Any) -> dict[str, Any]:
    return {"sources": [{"model": str(m), "layer_range": [a, b]} for m in models], **extra}


def test_one_slice_over_every_layer_is_the_whole_model_merge(make_family, tmp_path: Path) -> None:
    """TIES with its default global trim: one slice of all layers of the base and two experts writes the same
    bytes as the ``models`` form (same tensors, same population, same thresholds)."""
    base, experts = make_family("llama", n_experts=2)
    common = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.3}}
    _run({**common, "models": [{"model": str(e)} for e in experts]}, tmp_path / "models")
    report = _run({**common, "slices": [_slice([base, *experts], 0, 2)]}, tmp_path / "slices")
    whole, sliced = _load(tmp_path / "models"), _load(tmp_path / "slices")
    assert sorted(whole) == sorted(sliced)
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name
    assert len(report["global_statistics"]) == 1


def test_global_trim_population_is_each_slice(make_family, tmp_path: Path) -> None:
    """Two slices of the same pool (layer 0, then layer 1): each slice's global top-k runs over its own tensors,
    the embeddings joining the first slice and the final norm / head the last. Reference: the in-memory API on
    exactly those tensors."""
    base, experts = make_family("llama", n_experts=2)
    pool = [base, *experts]
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.25},
           "slices": [_slice(pool, 0, 1), _slice(pool, 1, 2)]}
    report = _run(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    sds = [_load(p) for p in pool]
    first = [n for n in sds[0] if "layers.0." in n or "embed_tokens" in n]
    last = [n for n in sds[0] if "layers.1." in n or n in ("model.norm.weight", "lm_head.weight")]
    assert sorted(first + last) == sorted(out)
    for names in (first, last):
        ref = merge_state_dicts("ties", {n: sds[0][n] for n in names}, [{n: sd[n] for n in names} for sd in sds[1:]],
                                parameters={"density": 0.25})
        for n in names:
            torch.testing.assert_close(out[n], ref[n], rtol=0, atol=0)
    # the population differs from the whole model's: one trim over both slices would give other bytes
    whole = merge_state_dicts("ties", sds[0], sds[1:], parameters={"density": 0.25})
    assert any(not torch.equal(whole[n], out[n]) for n in out)
    stats = report["global_statistics"]
    assert len(stats) == 2 and all(s is not None for s in stats)


def test_gradient_runs_over_the_slice_layers(make_family, tmp_path: Path) -> None:
    """linear, weight gradient [1, 3] per slice: a 2-layer slice gives its layers w = 1 then 3 (t = 0, 1), whatever
    its place in the output; θ = (w θ_A + θ_B) / (w + 1), computed here in float64."""
    _, (a, b) = make_family("llama", n_experts=2)
    grad = {"weight": [1.0, 3.0]}
    cfg = {"merge_method": "linear", "dtype": "float32", "slices": [
        _slice([a, b], 0, 1),  # one layer: t = 1 → the source with the gradient has w = 3
        {"sources": [{"model": str(a), "layer_range": [0, 2], "parameters": grad},
                     {"model": str(b), "layer_range": [0, 2]}]},
    ]}
    cfg["slices"][0]["sources"][0]["parameters"] = grad
    _run(cfg, tmp_path / "out")
    out, sa, sb = _load(tmp_path / "out"), _load(a), _load(b)
    name = "model.layers.{}.mlp.down_proj.weight"
    for out_layer, src_layer, w in ((0, 0, 3.0), (1, 0, 1.0), (2, 1, 3.0)):
        ref = (w * sa[name.format(src_layer)].double() + sb[name.format(src_layer)].double()) / (w + 1)
        torch.testing.assert_close(out[name.format(out_layer)].double(), ref, rtol=1e-6, atol=1e-7)
    # embeddings and final tensors: t = 0, first and last slice
    emb = (sa["model.embed_tokens.weight"].double() + sb["model.embed_tokens.weight"].double()) / 2
    torch.testing.assert_close(out["model.embed_tokens.weight"].double(), emb, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_dry_run_shows_the_slice_plan_and_writes_nothing(make_family, tmp_path: Path) -> None:
    _, (a, b) = make_family("llama", n_experts=2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"merge_method": "passthrough", "slices": [
        _slice([a], 0, 2), {**_slice([b], 1, 2), "residual_weight": 0.5}]}))
    result = CliRunner().invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"layers 0..1 <- {a} [0, 2) (with the embeddings)" in result.output
    assert f"layers 2..2 <- {b} [1, 2) (with the final norm / head)" in result.output
    assert "`residual_weight` of a slice is ignored" in result.output
    assert not (tmp_path / "out").exists()


def test_post_tensors_follow_mergekit_when_the_last_slice_has_more_sources(make_family, tmp_path: Path) -> None:
    """mergekit merges the final tensors from the last slice's sources cut to as many as the first slice has
    (here: the first source only, so the final norm is that model's own)."""
    _, (a, b) = make_family("llama", n_experts=2)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "slices": [_slice([b], 0, 1), _slice([a, b], 1, 2)]}
    _run(cfg, tmp_path / "out")
    out, sa, sb = _load(tmp_path / "out"), _load(a), _load(b)
    assert torch.equal(out["model.norm.weight"], sa["model.norm.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])
    mean = (sa["model.layers.1.mlp.up_proj.weight"] + sb["model.layers.1.mlp.up_proj.weight"]) / 2
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], mean)


def test_slice_paths_resolve_against_the_config_folder(make_family, tmp_path: Path, monkeypatch) -> None:
    """Source and slice ``base_model`` paths written relative to the config file, run from another folder."""
    import yaml

    base, (a,) = make_family("llama", n_experts=1, root=tmp_path / "models")
    cfg = tmp_path / "models" / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "expert0", "layer_range": [0, 2]}], "base_model": "expert0"},
        {"sources": [{"model": "base", "layer_range": [1, 2]}]}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    neuromerge.merge(cfg, tmp_path / "out", threads=1, progress=False)
    out, src = _load(tmp_path / "out"), _load(base)
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], _load(a)["model.layers.0.mlp.up_proj.weight"])
