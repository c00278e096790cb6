"""Fixtures for the I/O tests: small tensors of mixed dtypes, written with the reference libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def _mixed_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 5, generator=g),
        "layers.0.attn.weight": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "layers.0.attn.bias": torch.randn(6, generator=g).to(torch.float16),
        "layers.0.mlp.weight": torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
        "layers.0.scale": torch.randn((), generator=g),
        "layers.0.empty": torch.zeros(0, 4),
        "buffers.position_ids": torch.arange(9, dtype=torch.int64),
        "buffers.mask": torch.rand(3, 3, generator=g) > 0.5,
    }


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and ranks, including a scalar and an empty tensor."""
    return _mixed_state(0)


@pytest.fixture
def st_folder(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A HF-style folder: ``model.safetensors`` (written by the safetensors library) + ``config.json``."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 5}))
    return folder


@pytest.fixture
def sharded_folder(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The same tensors in two safetensors shards with a transformers-style index."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = list(state)
    parts = [names[:3], names[3:]]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder
