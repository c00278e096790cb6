"""Sharded writer, atomic output folder and base-file copying."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from neuromerge.errors import OutputExistsError
from neuromerge.io import (
    AtomicOutput,
    PlannedTensor,
    ShardedWriter,
    clean_stale_outputs,
    copy_model_files,
    install_signal_cleanup,
    open_checkpoint,
)
from neuromerge.io.writer import plan_shards


def _plan(state: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in state.items()]


def _write_all(out: Path, state: dict[str, torch.Tensor], **kw: object) -> dict:
    writer = ShardedWriter(out, _plan(state), **kw)
    for name, t in state.items():
        writer.write(name, t)
    return writer.close()


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def test_single_shard_loads_with_safetensors(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    result = _write_all(tmp_path, state, metadata={"merged_by": "neuromerge"})
    assert result["files"] == ["model.safetensors"] and result["index"] is None
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert result["total_size"] == result["bytes_written"] == size
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"merged_by": "neuromerge", "format": "pt"}
    start, header = _header(tmp_path / "model.safetensors")
    assert start % 8 == 0
    for name, spec in header.items():
        if name != "__metadata__":
            assert (start + spec["data_offsets"][0]) % state[name].element_size() == 0, name


def test_plan_shards_respects_limit() -> None:
    sizes = [40, 40, 30, 200, 10, 10, 90, 0]
    tensors = [PlannedTensor(f"t{i}", (s,), torch.uint8) for i, s in enumerate(sizes)]
    shards = plan_shards(tensors, 100)
    assert [t.name for s in shards for t in s] == [t.name for t in tensors]  # order kept
    assert [[t.shape[0] for t in s] for s in shards] == [[40, 40], [30], [200], [10, 10], [90, 0]]
    assert plan_shards([], 100) == [[]]


def test_sharded_output_and_index(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    result = _write_all(tmp_path, state, max_shard_bytes=150)
    n = len(result["files"])
    assert n > 2
    assert result["files"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert index["weight_map"].keys() == state.keys()
    for shard in result["files"]:
        data = load_file(str(tmp_path / shard))
        assert sum(t.numel() * t.element_size() for t in data.values()) <= 150 or len(data) == 1
        for name, t in data.items():
            assert index["weight_map"][name] == shard
            assert torch.equal(t, state[name])
    with open_checkpoint(tmp_path) as ckpt:
        for name, t in state.items():
            assert torch.equal(ckpt.read(name), t)


def test_loadable_by_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in model.state_dict().items()}
    config.save_pretrained(tmp_path)
    result = _write_all(tmp_path, state, max_shard_bytes=20_000)
    assert len(result["files"]) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name


def test_concurrent_row_chunks_match_sequential(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    _write_all(tmp_path / "seq", state, max_shard_bytes=200)
    writer = ShardedWriter(tmp_path / "par", _plan(state), max_shard_bytes=200)
    jobs = []
    for name, t in state.items():
        if t.dim() == 0:
            jobs.append((name, t, None))
            continue
        bounds = sorted({0, t.shape[0], *range(0, t.shape[0], 2)})
        jobs += [(name, t[a:b].clone(), (a, b)) for a, b in itertools.pairwise(bounds)]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: writer.write(*job), jobs))
    result = writer.close()
    assert result["bytes_written"] == result["total_size"]
    for f in sorted((tmp_path / "seq").iterdir()):
        assert (tmp_path / "par" / f.name).read_bytes() == f.read_bytes(), f.name


def test_write_checks(tmp_path: Path) -> None:
    writer = ShardedWriter(
        tmp_path, [PlannedTensor("w", (4, 2), torch.bfloat16), PlannedTensor("b", (2,), torch.float32)]
    )
    w = torch.ones(4, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not planned"):
        writer.write("x", w)
    with pytest.raises(ValueError, match=r"planned torch\.bfloat16"):
        writer.write("w", w.float())
    with pytest.raises(ValueError, match=r"planned torch.bfloat16\(2, 2\)"):
        writer.write("w", w, rows=(1, 3))
    with pytest.raises(ValueError, match="out of range"):
        writer.write("w", w[:2], rows=(3, 5))
    writer.write("w", w[:2], rows=(1, 3))
    with pytest.raises(ValueError, match="overlap"):
        writer.write("w", w[:2], rows=(2, 4))
    writer.write("w", w[:1], rows=(0, 1))
    with pytest.raises(RuntimeError, match=r"2 tensor\(s\) not fully written: w, b"):
        writer.close()


def test_duplicate_plan_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="planned twice"):
        ShardedWriter(tmp_path, [PlannedTensor("a", (1,), torch.float32)] * 2)


def test_durable_close(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    writer = ShardedWriter(tmp_path, _plan(state), max_shard_bytes=100)
    for name, t in state.items():
        writer.write(name, t)
    result = writer.close(durable=True)
    assert result["index"] == "model.safetensors.index.json"
    assert open_checkpoint(tmp_path).read("embed.weight").equal(state["embed.weight"])


# ---------------------------------------------------------------------------------------------- atomic output


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_atomic_output_cleans_up_on_error(tmp_path: Path, exc: type[BaseException]) -> None:
    out = tmp_path / "merged"
    with pytest.raises(exc), AtomicOutput(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".merged.neuromerge-tmp-{os.getpid()}"
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise exc()
    assert _leftovers(tmp_path) == []


def test_atomic_output_success_and_force(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with AtomicOutput(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert _leftovers(tmp_path) == ["merged"] and (out / "a.txt").read_text() == "first"
    with pytest.raises(OutputExistsError, match=r"merged exists; pass --force"):
        AtomicOutput(out)
    with pytest.raises(ValueError), AtomicOutput(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
        raise ValueError
    assert (out / "a.txt").read_text() == "first"  # a failed forced run keeps the old output
    with AtomicOutput(out, force=True, durable=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("second")
    assert _leftovers(tmp_path) == ["merged"]
    assert _leftovers(out) == ["sub"] and (out / "sub" / "b.txt").read_text() == "second"


def test_signal_cleanup(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        install_signal_cleanup()
        with pytest.raises(SystemExit) as info, AtomicOutput(tmp_path / "merged") as tmp:
            (tmp / "x").write_text("partial")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass
        assert info.value.code == 128 + signal.SIGTERM
        assert _leftovers(tmp_path) == []
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGHUP, previous[1])


def test_clean_stale_outputs_without_lock_files(tmp_path: Path) -> None:
    """Folders without a lock file (an older neuromerge, or a writer killed before locking) are judged by the process
    id in their name: a dead writer's temporary folders go, whatever the output name; its set-aside output comes
    back when the output is missing; a live writer's folder stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".merged.neuromerge-tmp-{dead_pid}", tmp_path / f".other.neuromerge-tmp-{dead_pid}"]
    old = tmp_path / f".merged.neuromerge-old-{dead_pid}"
    alive = tmp_path / f".merged.neuromerge-tmp-{os.getpid()}"
    for p in [*stale, old, alive]:
        p.mkdir()
    (old / "model.safetensors").write_text("previous")
    done = clean_stale_outputs(tmp_path)
    assert done.removed == sorted(stale)
    assert done.restored == [tmp_path / "merged"]
    assert _leftovers(tmp_path) == sorted([alive.name, "merged"])
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "previous"


# ---------------------------------------------------------------------------------------------- model files


def test_copy_model_files(tmp_path: Path, st_folder: Path) -> None:
    (st_folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32", "vocab_size": 5}))
    (st_folder / "tokenizer.json").write_text("{}")
    (st_folder / "generation_config.json").write_text('{"max_length": 7}')
    (st_folder / "README.md").write_text("not copied")
    out = tmp_path / "out"
    out.mkdir()
    warnings = copy_model_files(open_checkpoint(st_folder), out, config_overrides={"torch_dtype": "bfloat16"})
    assert warnings == []
    assert _leftovers(out) == ["config.json", "generation_config.json", "tokenizer.json"]
    text = (out / "config.json").read_text()
    assert json.loads(text) == {"model_type": "toy", "torch_dtype": "bfloat16", "vocab_size": 5}
    assert text.startswith('{\n  "model_type"')  # indent 2


def test_copy_model_files_warns(tmp_path: Path, st_folder: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (st_folder / "config.json").unlink()
    warnings = copy_model_files(st_folder, out)
    assert len(warnings) == 2
    assert "no config.json" in warnings[0] and "no tokenizer files" in warnings[1]
    assert copy_model_files(st_folder / "model.safetensors", out)[0].startswith("the base model")
