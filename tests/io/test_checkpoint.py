"""Checkpoint reader: every format gives the reference loaders' tensors, lazily; refusals are clear."""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuromerge.errors import CheckpointError, CompatibilityError
from neuromerge.io import open_checkpoint
from neuromerge.io.hub import looks_like_hf_id


class _Custom:
    """A class that only a full (code-executing) unpickler can rebuild."""


def _assert_same(ckpt, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.names()) == sorted(reference)
    for name, ref in reference.items():
        got = ckpt.read(name)
        assert got.dtype == ref.dtype, name
        assert torch.equal(got, ref), name
        info = ckpt.info(name)
        assert (info.shape, info.dtype, info.nbytes) == (
            tuple(ref.shape),
            ref.dtype,
            ref.numel() * ref.element_size(),
        )


def _data_order(path: Path) -> list[str]:
    """Names by data offset, from an independent reading of the header with struct + json."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))


def test_single_folder_matches_load_file(st_folder: Path) -> None:
    with open_checkpoint(st_folder) as ckpt:
        _assert_same(ckpt, load_file(str(st_folder / "model.safetensors")))
        assert ckpt.config == {"model_type": "toy", "hidden_size": 5}
        assert ckpt.files == [st_folder / "model.safetensors"]
        assert ckpt.names() == _data_order(st_folder / "model.safetensors")
        assert ckpt.total_bytes == (st_folder / "model.safetensors").stat().st_size


def test_sharded_folder_matches_load_file(sharded_folder: Path, state: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(sharded_folder) as ckpt:
        _assert_same(ckpt, state)
        shards = sorted(sharded_folder.glob("model-*.safetensors"))
        assert ckpt.files == shards
        assert ckpt.names() == _data_order(shards[0]) + _data_order(shards[1])
        assert ckpt.info("embed.weight").file == shards[0]


def test_bare_file_has_no_config(st_folder: Path, state: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(st_folder / "model.safetensors") as ckpt:
        assert ckpt.config is None
        _assert_same(ckpt, state)


def test_offsets_point_at_the_data(st_folder: Path, state: dict[str, torch.Tensor]) -> None:
    raw = (st_folder / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(st_folder)
    info = ckpt.info("embed.weight")
    expected = state["embed.weight"].numpy().tobytes()
    assert raw[info.offset : info.offset + info.nbytes] == expected


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_matches_torch_load(tmp_path: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    if sharded:
        names = list(state)
        torch.save({n: state[n] for n in names[:4]}, tmp_path / "pytorch_model-00001-of-00002.bin")
        torch.save({n: state[n] for n in names[4:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
        weight_map = {n: f"pytorch_model-0000{1 + (i >= 4)}-of-00002.bin" for i, n in enumerate(names)}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        reference = {}
        for f in sorted(tmp_path.glob("pytorch_model-*.bin")):
            reference.update(torch.load(f, weights_only=True))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
        reference = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.kind == "bin"
        _assert_same(ckpt, reference)
        assert ckpt.info("embed.weight").offset == -1
        assert torch.equal(ckpt.read("embed.weight", rows=(2, 5)), reference["embed.weight"][2:5])


def test_legacy_bin_format_loads(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(open_checkpoint(tmp_path), state)


def test_read_returns_fresh_memory(st_folder: Path) -> None:
    ckpt = open_checkpoint(st_folder)
    a = ckpt.read("embed.weight")
    a.zero_()
    assert ckpt.read("embed.weight").abs().sum() > 0


@pytest.mark.parametrize("name", ["embed.weight", "layers.0.attn.weight", "layers.0.mlp.weight", "buffers.mask"])
def test_rows_read_only_their_bytes(st_folder: Path, state: dict[str, torch.Tensor], name: str) -> None:
    ckpt = open_checkpoint(st_folder)
    full = state[name]
    row_bytes = full[0].numel() * full.element_size()
    for a, b in [(0, 1), (1, 3), (0, full.shape[0]), (2, 2)]:
        before = ckpt.bytes_read
        got = ckpt.read(name, rows=(a, b))
        assert got.dtype == full.dtype
        assert torch.equal(got, full[a:b])
        assert ckpt.bytes_read - before == (b - a) * row_bytes


def test_rows_out_of_range(st_folder: Path) -> None:
    ckpt = open_checkpoint(st_folder)
    with pytest.raises(ValueError, match="out of range"):
        ckpt.read("embed.weight", rows=(3, 8))
    with pytest.raises(ValueError, match="out of range"):
        ckpt.read("layers.0.scale", rows=(0, 1))


def test_headers_without_data(st_folder: Path, sharded_folder: Path) -> None:
    for folder in (st_folder, sharded_folder):
        ckpt = open_checkpoint(folder)
        for name in ckpt.names():
            ckpt.info(name)
            assert name in ckpt
        assert "nope" not in ckpt
        ckpt.header_hash()
        assert ckpt.bytes_read == 0
        ckpt.read("embed.weight")
        assert ckpt.bytes_read == 7 * 5 * 4


def test_bf16_round_trip_is_bit_exact(tmp_path: Path) -> None:
    bits = torch.arange(-32768, 32768, 97, dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16).reshape(-1, 4)[:, :3].contiguous()
    save_file({"w": t}, str(tmp_path / "x.safetensors"))
    got = open_checkpoint(tmp_path / "x.safetensors").read("w")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), t.view(torch.int16))


def test_missing_tensor_is_compatibility_error(st_folder: Path) -> None:
    with pytest.raises(CompatibilityError, match=r"'nope' missing in .*model"):
        open_checkpoint(st_folder).info("nope")


def test_concurrent_reads(sharded_folder: Path, state: dict[str, torch.Tensor]) -> None:
    ckpt = open_checkpoint(sharded_folder)
    jobs = [(n, None) for n in state] * 5 + [("embed.weight", (a, a + 2)) for a in range(5)] * 5
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: ckpt.read(*job), jobs))
    expected_bytes = 0
    for (name, rows), got in zip(jobs, results, strict=True):
        ref = state[name] if rows is None else state[name][rows[0] : rows[1]]
        assert torch.equal(got, ref)
        expected_bytes += ref.numel() * ref.element_size()
    assert ckpt.bytes_read == expected_bytes


def test_header_hash(tmp_path: Path, st_folder: Path, state: dict[str, torch.Tensor]) -> None:
    h = open_checkpoint(st_folder).header_hash()
    assert h == open_checkpoint(st_folder).header_hash()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((st_folder / "model.safetensors").read_bytes())
    assert open_checkpoint(copy).header_hash() == h
    changed = dict(state, **{"embed.weight": torch.zeros(7, 6)})
    save_file(changed, str(copy / "model.safetensors"))
    assert open_checkpoint(copy).header_hash() != h


# ---------------------------------------------------------------------------------------------- refusals


def test_truncated_file(st_folder: Path) -> None:
    f = st_folder / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 3)
    with pytest.raises(CheckpointError, match=rf"truncated .*expected at least {size} bytes, found {size - 3}"):
        open_checkpoint(st_folder)


def _raw_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "length", "match"),
    [
        (b"{}", 10**12, "header length"),
        (b"{}", 1000, "truncated .*expected at least 1008 bytes, found 42"),
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}', None, "needs 16"),
        (b'{"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}', None, "invalid shape"),
        (b'{"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}', None, "unsupported dtype 'Q9'"),
        (
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
            None,
            "overlap",
        ),
    ],
)
def test_corrupt_header(tmp_path: Path, header: bytes, length: int | None, match: str) -> None:
    f = _raw_file(tmp_path / "bad.safetensors", header, b"\0" * 32, length)
    with pytest.raises(CheckpointError, match=match) as err:
        open_checkpoint(f)
    assert "\n" not in str(err.value)


def test_gguf_refused(tmp_path: Path) -> None:
    fake = b"GGUF\x03\x00\x00\x00" + b"\0" * 64
    (tmp_path / "disguised.safetensors").write_bytes(fake)
    (tmp_path / "gg").mkdir()
    (tmp_path / "gg" / "model-q4.gguf").write_bytes(fake)
    folder_model = tmp_path / "folder"
    folder_model.mkdir()
    (folder_model / "model.safetensors").write_bytes(fake)
    for target in (
        tmp_path / "disguised.safetensors",
        tmp_path / "gg",
        tmp_path / "gg" / "model-q4.gguf",
        folder_model,
    ):
        with pytest.raises(CheckpointError, match=r"GGUF .*gguf_file=") as err:
            open_checkpoint(target)
        assert "\n" not in str(err.value)


def test_quantized_config_refused(st_folder: Path) -> None:
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (st_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quantized \(gptq.*de-quantize first"):
        open_checkpoint(st_folder)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("layers.0.q_proj.qweight", torch.zeros(4, 2, dtype=torch.int32)),
        ("layers.0.q_proj.weight.absmax", torch.zeros(4)),
        ("layers.0.q_proj.weight.quant_state.bitsandbytes__nf4", torch.zeros(4, dtype=torch.uint8)),
        ("layers.0.q_proj.weight", torch.zeros(4, 4, dtype=torch.float8_e4m3fn)),
        ("layers.0.q_proj.weight", torch.zeros(4, 4, dtype=torch.int8)),
    ],
)
def test_quantized_tensors_refused(tmp_path: Path, name: str, tensor: torch.Tensor) -> None:
    save_file({"embed.weight": torch.zeros(2, 2), name: tensor}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"quantized \(.*cannot be merged"):
        open_checkpoint(tmp_path)
    torch.save({"embed.weight": torch.zeros(2, 2), name: tensor}, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match=r"quantized \("):
        open_checkpoint(tmp_path / "w.bin")


def test_integer_buffers_are_not_quantization(tmp_path: Path) -> None:
    save_file({"embeddings.position_ids": torch.arange(4)}, str(tmp_path / "model.safetensors"))
    assert open_checkpoint(tmp_path).names() == ["embeddings.position_ids"]


def test_pickled_code_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "extra": _Custom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"needs code execution .*refuses .*convert it to safetensors") as err:
        open_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere" / "x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors.*found other\.safetensors"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a weights file"):
        open_checkpoint(tmp_path / "notes.txt")


def test_sharded_index_inconsistencies(sharded_folder: Path) -> None:
    index = sharded_folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"'embed\.weight' is listed for shard model-00002"):
        open_checkpoint(sharded_folder)
    doc["weight_map"]["embed.weight"] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"shard model-00003-of-00003\.safetensors listed in .* is missing"):
        open_checkpoint(sharded_folder)


# ---------------------------------------------------------------------------------------------- HF ids


def _fake_cache(root: Path, st_folder: Path, repo: str) -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in st_folder.iterdir():
        (snap / f.name).symlink_to(f)  # the hub cache links snapshot files to blobs
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    return snap


def test_hf_id_from_cache(tmp_path: Path, st_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    snap = _fake_cache(tmp_path / "cache", st_folder, "org/tiny-model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    ckpt = open_checkpoint("org/tiny-model")
    assert ckpt.path == snap
    assert ckpt.source == "org/tiny-model"
    assert ckpt.config == {"model_type": "toy", "hidden_size": 5}
    _assert_same(ckpt, load_file(str(st_folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"org/other .*not .*local HF cache.*--allow-download"):
        open_checkpoint("org/other")


def test_hf_home_fallback(tmp_path: Path, st_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = _fake_cache(tmp_path / "home" / "hub", st_folder, "org/m")
    assert open_checkpoint("org/m").path == snap


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", True),
        ("meta-llama/Llama-3.2-1B", True),
        ("./org/name", False),
        ("a/b/c", False),
        ("/abs/x", False),
        ("../x", False),
        ("name", False),
    ],
)
def test_hf_id_syntax(text: str, expected: bool) -> None:
    assert looks_like_hf_id(text) is expected


def test_int16_and_float64_read(tmp_path: Path) -> None:
    t = {"a": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": torch.tensor([1.5], dtype=torch.float64)}
    save_file(t, str(tmp_path / "model.safetensors"))
    _assert_same(open_checkpoint(tmp_path), t)
