"""Writing the merged model: planned sharded safetensors, an atomic output folder, and the base model's files.

:class:`ShardedWriter` knows every output tensor (name, shape, dtype) before the first byte is written, so it
lays out the shards up front, writes each header, preallocates each file, and then accepts tensors — or row
chunks of them — from any number of threads in any order, writing each with ``os.pwrite`` at its planned
offset.

Shard naming and the index follow transformers (``model.safetensors``, or ``model-00001-of-0000N.safetensors``
+ ``model.safetensors.index.json`` with ``{"metadata": {"total_size": ...}, "weight_map": {...}}``); the shard
size limit counts tensor bytes, as transformers' ``max_shard_size`` does. Within a shard, tensors are laid out
by decreasing item size (stable), as the reference safetensors writer does, so that every tensor is aligned.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

import torch

from neuromerge.errors import CheckpointError, OutputExistsError
from neuromerge.io.safetensors_format import build_header, dtype_to_str, itemsize, tensor_nbytes

if TYPE_CHECKING:
    from neuromerge.io.checkpoint import Checkpoint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: files copied from the base model's folder next to the merged weights
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor announced before writing."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Slot:
    """A planned tensor's place: shard, absolute offset, and the row ranges written so far."""

    planned: PlannedTensor
    shard: int
    offset: int
    nbytes: int
    row_bytes: int
    done: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split ``tensors`` in the given order: a new shard starts when the next tensor would push the current
    one past ``max_shard_bytes``; a tensor larger than the limit gets a shard of its own. Always at least one
    shard.
    """
    shards: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    size = 0
    for t in tensors:
        n = tensor_nbytes(t.shape, t.dtype)
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
        if n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current or not shards:
        shards.append(current)
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedWriter:
    """Planned, thread-safe safetensors output (see the module docstring).

    Every name given is written as is: tied weights are written once per name they are given under. ``write``
    checks dtype and shape and refuses overlapping row ranges; ``close`` checks that every tensor is complete.
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: Sequence[PlannedTensor],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
    ) -> None:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} is planned twice")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        meta = {**(metadata or {}), "format": "pt"}
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards = plan_shards(tensors, max_shard_bytes)
        self.file_names = _shard_names(len(shards))
        self.bytes_written = 0
        self.total_size = sum(tensor_nbytes(t.shape, t.dtype) for t in tensors)
        self._order = names
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            for i, shard in enumerate(shards):
                self._fds.append(self._create_shard(i, shard, meta))
        except BaseException:
            self.abort()
            raise

    def _create_shard(self, index: int, shard: list[PlannedTensor], meta: dict[str, str]) -> int:
        laid = sorted(shard, key=lambda t: -itemsize(t.dtype))
        entries, pos = [], 0
        for t in laid:
            dtype_to_str(t.dtype)  # refuses dtypes safetensors cannot store
            n = tensor_nbytes(t.shape, t.dtype)
            entries.append((t.name, t.dtype, t.shape, pos, pos + n))
            pos += n
        header = build_header(entries, meta)
        for (name, _, _, begin, end), t in zip(entries, laid, strict=True):
            rows = t.shape[0] if t.shape else 1
            row_bytes = (end - begin) // rows if rows else 0
            self._slots[name] = _Slot(t, index, len(header) + begin, end - begin, row_bytes)
        path = self.out_dir / self.file_names[index]
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + pos)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Write ``tensor`` (all of it, or rows ``a..b-1`` of dim 0 when ``rows=(a, b)``); thread-safe.

        ``tensor`` must have the planned dtype (no conversion here) and shape ``(b - a, *shape[1:])``.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} was not planned for this output")
        shape = slot.planned.shape
        if rows is None:
            a, b, expected = 0, (shape[0] if shape else 1), shape
        else:
            a, b = rows
            if not shape or not 0 <= a <= b <= shape[0]:
                raise ValueError(f"rows {rows} out of range for tensor {name!r} of shape {shape}")
            expected = (b - a, *shape[1:])
        if tensor.dtype != slot.planned.dtype or tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype}{tuple(tensor.shape)}, "
                f"planned {slot.planned.dtype}{tuple(expected)}"
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer is closed")
            if a < b and any(a < hi and lo < b for lo, hi in slot.ranges):
                raise ValueError(f"rows {a}..{b - 1} of tensor {name!r} overlap rows already written")
            slot.ranges.append((a, b))
            fd = self._fds[slot.shard]
        n = (b - a) * slot.row_bytes
        try:
            if n:
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                _pwrite_all(fd, memoryview(data), slot.offset + a * slot.row_bytes)
        except BaseException:
            with self._lock:
                slot.ranges.remove((a, b))
            raise
        with self._lock:
            slot.done += n
            self.bytes_written += n

    def missing(self) -> list[str]:
        """Names of planned tensors not fully written yet, in planned order."""
        with self._lock:
            return [n for n in self._order if self._slots[n].done != self._slots[n].nbytes]

    def close(self, *, durable: bool = False) -> dict:
        """Check completeness, write the index when sharded, fsync when ``durable``, close the files.

        Returns ``{"files": [shard names], "index": name or None, "total_size": tensor bytes, "bytes_written":
        n}``. Raises ``RuntimeError`` naming incomplete tensors (the files are closed, the output is
        unusable).
        """
        missing = self.missing()
        if missing:
            self.abort()
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RuntimeError(f"{len(missing)} tensor(s) not fully written: {', '.join(missing[:5])}{more}")
        index = None
        if len(self.file_names) > 1:
            index = INDEX_FILE
            weight_map = {n: self.file_names[s.shard] for n, s in sorted(self._slots.items())}
            doc = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / index).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if durable:
            for fd in self._fds:
                os.fsync(fd)
            if index:
                fsync_path(self.out_dir / index)
            fsync_path(self.out_dir)
        self.abort()
        return {
            "files": list(self.file_names),
            "index": index,
            "total_size": self.total_size,
            "bytes_written": self.bytes_written,
        }

    def abort(self) -> None:
        """Close the files without any check (what is on disk stays as is)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _temp_name(name: str, kind: str, pid: int) -> str:
    return f".{name}.neuromerge-{kind}-{pid}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class AtomicOutput:
    """The output folder appears complete or not at all.

    Work happens in ``.{name}.neuromerge-tmp-{pid}`` next to ``out``; on success it is renamed to ``out`` (an
    existing ``out``, allowed by ``force``, is first renamed aside to ``.{name}.neuromerge-old-{pid}`` and
    removed after the swap); on any exception, ``KeyboardInterrupt`` and ``SystemExit`` included, the
    temporary folder is removed and the exception propagates. ``durable`` fsyncs every file and the folders
    before the rename.
    """

    def __init__(self, out: Path, *, force: bool = False, durable: bool = False) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.durable = durable
        if self.out.exists() and not force:
            raise OutputExistsError(f"output folder {self.out} exists; pass --force to replace it")
        self.tmp = self.out.parent / _temp_name(self.out.name, "tmp", os.getpid())

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is not None:
            _remove(self.tmp)
            return False
        try:
            self._commit()
        except BaseException:
            _remove(self.tmp)
            raise
        return False

    def _commit(self) -> None:
        if self.durable:
            for p in sorted(self.tmp.rglob("*"), reverse=True):
                fsync_path(p)
            fsync_path(self.tmp)
        old = None
        if self.out.exists() or self.out.is_symlink():
            if not self.force:
                raise OutputExistsError(f"output folder {self.out} appeared while merging; pass --force to replace it")
            old = self.out.parent / _temp_name(self.out.name, "old", os.getpid())
            _remove(old)
            self.out.rename(old)
        self.tmp.rename(self.out)
        if self.durable:
            fsync_path(self.out.parent)
        if old is not None:
            _remove(old)


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_signal_cleanup() -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` so that :class:`AtomicOutput` removes its temporary folder.

    Must be called from the main thread (Python's rule for signal handlers).
    """
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _raise_system_exit)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(parent: Path, name: str) -> list[Path]:
    """Remove the temporary / set-aside folders of output ``name`` in ``parent`` left by dead processes."""
    removed = []
    prefixes = tuple(f".{name}.neuromerge-{kind}-" for kind in ("tmp", "old"))
    if not Path(parent).is_dir():
        return removed
    for p in sorted(Path(parent).iterdir()):
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        pid = p.name[len(prefix) :] if prefix else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(p)
            removed.append(p)
    return removed


def copy_model_files(src: Checkpoint | Path, out_dir: Path, *, config_overrides: dict | None = None) -> list[str]:
    """Copy ``config.json`` (with ``config_overrides`` applied to its top-level keys, written with indent 2),
    ``generation_config.json`` and the tokenizer / processor files from the base model's folder to
    ``out_dir``.

    Returns warnings (missing config, missing tokenizer); nothing missing is an error.
    """
    base = Path(src if isinstance(src, Path) else src.path)
    out_dir = Path(out_dir)
    if not base.is_dir():
        return [f"the base model {base} is a bare weights file; the output has no config.json and no tokenizer"]
    warnings = []
    config = base / "config.json"
    if config.is_file():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot parse {config} ({e.__class__.__name__}); fix or re-download it") from None
        doc.update(config_overrides or {})
        (out_dir / "config.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        warnings.append(f"no config.json in {base}; the output cannot be loaded with from_pretrained")
    copied = []
    for name in (*CONFIG_FILES[1:], *TOKENIZER_FILES):
        if (base / name).is_file():
            shutil.copyfile(base / name, out_dir / name)  # follows HF-cache symlinks: copies the content
            copied.append(name)
    if not set(copied) & set(TOKENIZER_FILES):
        warnings.append(f"no tokenizer files in {base}; the output has no tokenizer")
    return warnings
