"""Numeric guards (issue #16): non-finite parameters are refused, fused kernels never turn NaN/Inf into finite
values, output-dtype overflow is an error (or clamped and counted), and 0-d tensors are merged like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.engine.run import prepare
from neuromerge.methods import available

runner = CliRunner()

STATIC_METHODS = sorted(n for n, cls in available().items() if not getattr(cls, "data_aware", False))


# ------------------------------------------------------------------------------------------- 0-d tensors (item 4)
def _clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A CLIP-shaped state dict (tiny): the 0-d ``logit_scale`` next to text / vision tower tensors."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02 + (0.1 * seed if seed else 0.0)

    return {
        "logit_scale": torch.tensor(2.6592 + 0.125 * seed),
        "text_model.embeddings.token_embedding.weight": r(50, 16),
        "text_model.embeddings.position_embedding.weight": r(8, 16),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        "text_model.encoder.layers.0.self_attn.q_proj.bias": r(16),
        "text_model.final_layer_norm.weight": r(16),
        "vision_model.embeddings.class_embedding": r(16),
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        "vision_model.encoder.layers.0.layer_norm1.weight": r(16),
        "visual_projection.weight": r(8, 16),
        "text_projection.weight": r(8, 16),
    }


@pytest.fixture
def clip_family(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and two experts saved as HF folders with ``model_type: clip``."""
    folders = []
    for i, name in enumerate(["base", "e0", "e1"]):
        d = tmp_path / "clip" / name
        d.mkdir(parents=True)
        save_file(_clip_state_dict(i), d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
        folders.append(d)
    return folders[0], folders[1:]


def _config(method: str, base: Path, experts: list[Path], **extra: object) -> dict[str, object]:
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts], **extra}


def _read(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_zero_dim_tensor_merges_with_every_static_method(clip_family, tmp_path: Path, method: str) -> None:
    """CLIP's ``logit_scale`` (shape ``[]``) is a point tensor: planned, dry-run, merged and written as ``[]``."""
    base, experts = clip_family
    cfg = _config(method, base, experts)
    plan = prepare(cfg)
    try:
        tp = next(t for t in plan.tensors if t.name == "logit_scale")
        assert tp.shape == () and tp.action == "merge" and tp.chunks == [(0, 1)]
        assert plan.peak_memory_estimate(2) > 0
    finally:
        plan.pool.close()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(cfg))
    res = runner.invoke(app, ["merge", str(cfg_path), "-o", str(tmp_path / "dry"), "--dry-run", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    neuromerge.merge(cfg, out, progress=False)
    merged = _read(out, "logit_scale")
    assert merged.shape == () and merged.dtype == torch.float32
    assert torch.isfinite(merged)
    b, e0, e1 = 2.6592, 2.6592 + 0.125, 2.6592 + 0.25
    expected = {"linear": (e0 + e1) / 2, "task_arithmetic": b + 0.3 * ((e0 - b) + (e1 - b))}
    if method in expected:
        assert float(merged) == pytest.approx(expected[method], abs=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_zero_dim_tensor_torch_and_fused_paths(clip_family, tmp_path: Path, monkeypatch, native: bool) -> None:
    """The 0-d tensor through the fused kernel and through the torch path, merged (TIES without trim) and copied
    (excluded), in float16 and bfloat16."""
    from neuromerge import kernels

    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    base, experts = clip_family
    b, e0, e1 = 2.6592, 2.6592 + 0.125, 2.6592 + 0.25
    cfg = _config("ties", base, experts, parameters={"density": 1.0}, dtype="float16")
    neuromerge.merge(cfg, tmp_path / "m", progress=False)
    merged = _read(tmp_path / "m", "logit_scale")
    assert merged.shape == () and merged.dtype == torch.float16
    assert float(merged) == pytest.approx(b + ((e0 - b) + (e1 - b)) / 2, abs=2e-3)
    cfg = _config("ties", base, experts, exclude=["logit_scale"], dtype="bfloat16")
    neuromerge.merge(cfg, tmp_path / "c", progress=False)
    copied = _read(tmp_path / "c", "logit_scale")
    assert copied.shape == () and copied.dtype == torch.bfloat16
    assert float(copied) == float(torch.tensor(b).to(torch.bfloat16))
