"""Lazy, read-only access to one model's weights: headers at open, tensor bytes only when asked for.

Accepted inputs (:func:`open_checkpoint`):

* a HF folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (the index is checked:
  every shard exists and holds the tensors the ``weight_map`` gives it);
* a bare ``.safetensors`` file (no config);
* a folder with ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``, or a bare ``.bin``/``.pt`` file,
  loaded only with ``torch.load(weights_only=True, mmap=True)`` — pickled code is never executed. Names,
  shapes and dtypes of a ``.bin`` shard need loading that shard (memory-mapped; the last loaded shard is
  cached);
* a HF id ``org/name`` that is not a local path, resolved from the local HF cache (:mod:`neuromerge.io.hub`).

Refused with a :class:`~neuromerge.errors.CheckpointError`: GGUF files, quantized checkpoints
(``quantization_config``, quantization tensor names such as ``.qweight``/``.absmax``, FP8 tensors, integer
``.weight`` tensors), truncated or corrupt safetensors files, pickles that need code execution, folders
without weights.

Safetensors data is read with ``os.preadv`` into a fresh ``bytearray`` (no mmap, no ``safe_open``), so memory
use is bounded by what is requested and row ranges of row-major tensors cost only their own bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from neuromerge.errors import CheckpointError, CompatibilityError
from neuromerge.io.hub import looks_like_hf_id, resolve_hf_id
from neuromerge.io.safetensors_format import (
    FP8_DTYPES,
    GGUF_MAGIC,
    Header,
    gguf_error,
    quantized_error,
    read_header,
)

#: recognised weight files of a model folder, in order of preference (as transformers)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: tensor-name endings that only quantized checkpoints use (GPTQ/AWQ, bitsandbytes, compressed-tensors, FP8)
QUANT_SUFFIXES = (
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".SCB",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".weight_format",
    ".weight_scale_inv",
    ".weight_packed",
    ".weight_zero_point",
)
_BIN_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives; ``offset``: absolute byte offset of its data (``-1`` for ``.bin`` files)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int
    nbytes: int


class _Source(Protocol):
    files: list[Path]

    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def info(self, name: str) -> TensorInfo | None: ...
    def read(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor: ...
    def header_bytes(self, file: Path) -> bytes: ...
    def close(self) -> None: ...


def _row_span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """(byte offset relative to the tensor, byte length, result shape) of rows ``a..b-1`` of dim 0."""
    if rows is None:
        return 0, info.nbytes, info.shape
    a, b = rows
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
    return a * row_bytes, (b - a) * row_bytes, (b - a, *info.shape[1:])


class _SafetensorsSource:
    """One or more safetensors files read with ``os.preadv``; file descriptors opened on first read."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None) -> None:
        self.files = files
        self.headers: dict[Path, Header] = {f: read_header(f) for f in files}
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            for e in self.headers[f].entries.values():
                if weight_map is not None and weight_map.get(e.name) != f.name:
                    continue
                self._infos[e.name] = TensorInfo(e.name, e.shape, e.dtype, f, e.begin, e.end - e.begin)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._infos:
                    raise CheckpointError(
                        f"tensor {name!r} is listed for shard {shard} in {files[0].parent} but that shard "
                        "does not hold it; the index and the shards do not match, re-download the checkpoint"
                    )
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._infos)

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def read(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        start, length, shape = _row_span(info, rows)
        if length == 0:
            return torch.empty(shape, dtype=info.dtype)
        buf = torch.empty(length, dtype=torch.uint8)  # uninitialised: no zero-fill pass before the read
        view, done, fd = memoryview(buf.numpy()), 0, self._fd(info.file)
        while done < length:
            n = os.preadv(fd, [view[done:]], info.offset + start + done)
            if n == 0:
                raise CheckpointError(
                    f"truncated or corrupt safetensors file {info.file}: it ended while reading tensor "
                    f"{info.name!r}; re-download or re-export it"
                )
            done += n
        return buf.view(info.dtype).reshape(shape)

    def header_bytes(self, file: Path) -> bytes:
        return self.headers[file].raw

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _torch_load(file: Path, mmap: bool) -> Any:
    return torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)


def load_bin_weights_only(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(file, weights_only=True, mmap=True)`` with one-line errors; non-tensor entries are
    dropped.

    Files in the legacy (pre-zip) format cannot be memory-mapped and are loaded without ``mmap`` (still
    ``weights_only``).
    """
    with open(file, "rb") as fh:
        if fh.read(4) == GGUF_MAGIC:
            raise gguf_error(file)
    try:
        try:
            obj = _torch_load(file, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = _torch_load(file, mmap=False)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file} needs code execution to load (it pickles objects other than tensors) and neuromerge "
            "refuses to run pickled code; convert it to safetensors with a script you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"cannot read {file} ({first}); re-download or re-export it") from None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{file} holds no state dict of tensors; save `model.state_dict()` as safetensors")
    return tensors


class _BinSource:
    """PyTorch pickles loaded weights-only and memory-mapped; the most recently loaded shard is cached."""

    def __init__(
        self,
        files: list[Path],
        weight_map: dict[str, str] | None,
        on_load: Callable[[dict[str, torch.dtype]], None],
    ) -> None:
        self.files = files
        self._on_load = on_load
        self._lock = threading.Lock()
        self._cached: tuple[Path, dict[str, torch.Tensor]] | None = None
        if weight_map is None:
            self._where = dict.fromkeys(self._load(files[0]), files[0])
        else:
            by_name = {f.name: f for f in files}
            order = {f: i for i, f in enumerate(files)}
            pairs = sorted(weight_map.items(), key=lambda kv: order[by_name[kv[1]]])
            self._where = {name: by_name[shard] for name, shard in pairs}

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._cached is not None and self._cached[0] == file:
                return self._cached[1]
            tensors = load_bin_weights_only(file)
            self._on_load({k: v.dtype for k, v in tensors.items()})
            self._cached = (file, tensors)
            return tensors

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _tensor(self, name: str) -> torch.Tensor:
        file = self._where[name]
        tensors = self._load(file)
        if name not in tensors:
            raise CheckpointError(
                f"tensor {name!r} is listed for {file.name} in the index but that shard does not hold it; "
                "re-download the checkpoint"
            )
        return tensors[name]

    def info(self, name: str) -> TensorInfo | None:
        if name not in self._where:
            return None
        t = self._tensor(name)
        return TensorInfo(name, tuple(t.shape), t.dtype, self._where[name], -1, t.numel() * t.element_size())

    def read(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        t = self._tensor(info.name)
        if rows is not None:
            t = t[rows[0] : rows[1]]
        return t.clone(memory_format=torch.contiguous_format)

    def header_bytes(self, file: Path) -> bytes:
        return b""

    def close(self) -> None:
        with self._lock:
            self._cached = None


class Checkpoint:
    """One model, opened lazily: the headers are read at open, tensor data only by :meth:`read`.

    ``path`` is the folder or file the weights come from (the resolved snapshot folder for a HF id, whose text
    is kept in ``source``); ``files`` the weight files in order; ``config`` the parsed ``config.json`` of a
    folder. ``bytes_read`` counts the tensor bytes returned by :meth:`read` (thread-safe).
    """

    def __init__(self, path: Path, source: str, config: dict | None, backend: _Source, kind: str) -> None:
        self.path = path
        self.source = source
        self.config = config
        self.kind = kind
        self.files = list(backend.files)
        self.bytes_read = 0
        self._backend = backend
        self._count_lock = threading.Lock()
        self._sizes = [f.stat().st_size for f in self.files]
        weakref.finalize(self, backend.close)  # file descriptors are closed even without close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.kind}, {len(self.files)} file(s))"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        """Tensor names in file order: shard order, then data order within a shard."""
        return self._backend.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._backend.has(name)

    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype and location of ``name``; :class:`CompatibilityError` if absent."""
        found = self._backend.info(name)
        if found is None:
            raise CompatibilityError(
                f"tensor {name!r} missing in {self.path}; all models of a pool need the base model's tensors"
            )
        return found

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor in its stored dtype, in fresh memory; ``rows=(a, b)`` reads only rows ``a..b-1`` of dim
        0.
        """
        info = self.info(name)
        if rows is not None:
            a, b = rows
            if not info.shape or not 0 <= a <= b <= info.shape[0]:
                raise ValueError(f"rows {rows} out of range for tensor {name!r} of shape {info.shape}")
        out = self._backend.read(info, rows)
        with self._count_lock:
            self.bytes_read += out.numel() * out.element_size()
        return out

    def header_hash(self) -> str:
        """SHA-256 over, per file in order, its name, its size and its raw header bytes (``.bin``: name and
        size).
        """
        h = hashlib.sha256()
        for f, size in zip(self.files, self._sizes, strict=True):
            h.update(f"{f.name}\0{size}\0".encode())
            h.update(self._backend.header_bytes(f))
            h.update(b"\0")
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        """Sum of the weight files' sizes."""
        return sum(self._sizes)

    def close(self) -> None:
        """Close file descriptors and drop the cached ``.bin`` shard (reading again reopens them)."""
        self._backend.close()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {what} {path} ({e.__class__.__name__}); fix or re-download it") from None


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files (sorted by name, all present) and the ``weight_map`` of a sharded checkpoint's index."""
    doc = _read_json(index, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"index {index} has no valid weight_map; re-download the checkpoint")
    shards = [index.parent / s for s in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"shard {shard.name} listed in {index} is missing; re-download the checkpoint")
    return shards, weight_map


def check_not_quantized(path: Path, config: dict | None, dtypes: Mapping[str, torch.dtype | None]) -> None:
    """Refuse quantized checkpoints: ``quantization_config`` in the config, quantization tensor names, FP8
    tensors or integer ``.weight`` tensors (packed quantized weights). A ``None`` dtype (not known yet) checks
    the name only.
    """
    quant = (config or {}).get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else "unknown method"
        raise quantized_error(path, f"{method}, from quantization_config in config.json")
    for name, dtype in dtypes.items():
        if name.endswith(QUANT_SUFFIXES) or ".quant_state" in name:
            raise quantized_error(path, f"tensor {name!r}")
        if dtype is None:
            continue
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        if dtype in FP8_DTYPES or (integer and name.endswith(".weight")):
            raise quantized_error(path, f"{dtype} tensor {name!r}")


def _locate(path: Path) -> tuple[str, Path]:
    """(``"safetensors"|"safetensors-index"|"bin"|"bin-index"``, weights file) for a folder or a file."""
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return _locate(path / name)
        if any(path.glob("*.gguf")):
            raise gguf_error(next(iter(sorted(path.glob("*.gguf")))))
        others = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))[:3])
        hint = f" (found {others}: pass that file's path to use it)" if others else ""
        raise CheckpointError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}{hint}")
    name = path.name
    with open(path, "rb") as fh:
        if path.suffix == ".gguf" or fh.read(4) == GGUF_MAGIC:
            raise gguf_error(path)
    if name.endswith(".safetensors.index.json"):
        return "safetensors-index", path
    if name.endswith(".bin.index.json"):
        return "bin-index", path
    if path.suffix == ".safetensors":
        return "safetensors", path
    if path.suffix in _BIN_SUFFIXES:
        return "bin", path
    raise CheckpointError(f"{path} is not a weights file: expected a .safetensors or .bin file, or a model folder")


def open_checkpoint(path: str | os.PathLike[str], *, allow_download: bool = False) -> Checkpoint:
    """Open a model folder, a weights file or a cached HF id ``org/name`` (see the module docstring).

    Only headers (and for ``.bin`` the pickled state dict, memory-mapped) are read; every refusal is a
    :class:`CheckpointError` with a one-line message.
    """
    text = os.fspath(path)
    p = Path(text).expanduser()
    if not p.exists():
        if not looks_like_hf_id(text):
            raise CheckpointError(
                f"{p} does not exist; expected a model folder, a .safetensors/.bin file or a HF id org/name"
            )
        p = resolve_hf_id(text, allow_download=allow_download)
    kind, file = _locate(p)
    config = None
    if p.is_dir() and (p / "config.json").is_file():
        config = _read_json(p / "config.json", "config")
        if not isinstance(config, dict):
            raise CheckpointError(f"config {p / 'config.json'} is not a JSON object; fix or re-download it")
    check_not_quantized(p, config, {})
    files, weight_map = _read_index(file) if kind.endswith("-index") else ([file], None)
    backend: _Source
    if kind.startswith("safetensors"):
        backend = _SafetensorsSource(files, weight_map)
        check_not_quantized(p, config, {i.name: i.dtype for i in map(backend.info, backend.names()) if i})
    else:
        backend = _BinSource(files, weight_map, lambda dtypes: check_not_quantized(p, config, dtypes))
        check_not_quantized(p, config, dict.fromkeys(backend.names()))
    return Checkpoint(p, text, config, backend, "bin" if kind.startswith("bin") else "safetensors")
