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
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

import torch

from neuromerge.errors import CheckpointError, OutputExistsError, OutputWriteError
from neuromerge.io.output_guard import InputRef, check_output, nearest_existing
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


def write_error(path: Path, err: OSError) -> OutputWriteError:
    """``cannot write PATH: reason`` for an ``OSError`` met while writing ``path`` (``reason`` is the system's, e.g.
    ``No space left on device``; a parent that is a file is said as such)."""
    anchor = nearest_existing(path)
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and not anchor.is_dir() and anchor != Path(path).absolute():
        reason = f"{anchor} is not a folder"
    else:
        reason = err.strerror or str(err) or err.__class__.__name__
    return OutputWriteError(f"cannot write {path}: {reason}", reason)


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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + pos)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise write_error(path, e) from None
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
        except BaseException as e:
            with self._lock:
                slot.ranges.remove((a, b))
            if isinstance(e, OSError):  # ENOSPC, EIO...: one line for the user, not a traceback
                raise write_error(self.out_dir / self.file_names[slot.shard], e) from None
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
        try:
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
        except OSError as e:
            self.abort()
            raise write_error(self.out_dir / (index or self.file_names[0]), e) from None
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


#: ``.{name}.neuromerge-{tmp|old}-{pid}``: the temporary and set-aside folders of :class:`AtomicOutput`
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.neuromerge-(?P<kind>tmp|old)-(?P<pid>\d+)$")
#: the lock file a writer holds (``flock``) inside its temporary folder for its whole life
LOCK_FILE = ".neuromerge.lock"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _take_lock(folder: Path) -> int:
    """Create ``folder/LOCK_FILE`` already locked (``flock``, exclusive) and return its descriptor.

    The file is created under a private name, locked, then renamed into place, so a lock file that another process
    can find is always locked while its writer lives."""
    private = folder / f"{LOCK_FILE}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(private, folder / LOCK_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(lock: Path) -> int | None:
    """A descriptor holding ``lock`` when its owner is gone (the lock was free), else None (held, or unknowable:
    unreadable file, a file system without ``flock``)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StaleCleanup:
    """What :func:`clean_stale_outputs` did: folders removed, outputs restored, and a note per restoration."""

    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _owner_state(lock: Path, pid: int) -> tuple[bool, int | None]:
    """``(alive, fd)`` of the writer owning a folder whose lock file would be ``lock``: with a lock file the lock
    decides (``fd`` then holds it); without one (a writer between ``mkdir`` and its lock, one committing, or an older
    neuromerge) the process id in the folder's name does."""
    if lock.exists():
        fd = _try_lock(lock)
        return fd is None, fd
    return _pid_alive(pid), None


def clean_stale_outputs(parent: Path) -> StaleCleanup:
    """Clean what dead writers left in ``parent`` (a ``kill -9``, a power cut), for every output name there.

    - ``.{name}.neuromerge-tmp-{pid}``: removed when its lock file is free (the writer is gone; the lock is taken
      while removing, so two cleaners never race), or, without a lock file, when process ``pid`` is gone.
    - ``.{name}.neuromerge-old-{pid}`` (the previous output, set aside by a ``--force`` run that died during its
      commit), once its writer is gone: **restored** to ``name`` when ``name`` is missing (never deleted then);
      removed when ``name`` exists and the writer's temporary folder is gone (the swap completed: removing it is
      what the writer was doing); renamed to the visible ``{name}.neuromerge-recovered-{pid}`` when both ``name``
      and the writer's temporary folder exist (the swap did not complete, so ``name`` is someone else's and the old
      folder is the only copy of the previous output).

    Entries whose writer may be alive are left alone; errors on one entry (permissions) skip it.
    """
    done = StaleCleanup()
    parent = Path(parent)
    try:
        entries = sorted((p, m) for p in parent.iterdir() if (m := _TEMP_RE.match(p.name)))
    except OSError:
        return done
    for p, m in entries:  # set-aside outputs first: their writer's tmp folder tells how far the swap went
        if m["kind"] != "old":
            continue
        name, pid = m["name"], int(m["pid"])
        final, tmp = parent / name, parent / _temp_name(name, "tmp", pid)
        locks = [q / LOCK_FILE for q in (tmp, final) if (q / LOCK_FILE).exists()]
        alive, fd = _owner_state(locks[0], pid) if locks else (_pid_alive(pid), None)
        if alive:
            continue
        try:
            if not (final.exists() or final.is_symlink()):
                p.rename(final)
                done.restored.append(final)
                done.notes.append(f"restored {final} from {p.name}, set aside by an interrupted run")
            elif tmp.exists():
                kept = parent / f"{name}.neuromerge-recovered-{pid}"
                p.rename(kept)
                done.restored.append(kept)
                done.notes.append(f"kept the previous {final} of an interrupted run as {kept}")
            else:
                _remove(p)
                if (final / LOCK_FILE).exists():  # the writer died between its last rename and the unlink
                    (final / LOCK_FILE).unlink()
                done.removed.append(p)
        except OSError:
            continue
        finally:
            if fd is not None:
                os.close(fd)
    for p, m in entries:
        if m["kind"] != "tmp" or not p.exists():
            continue
        alive, fd = _owner_state(p / LOCK_FILE, int(m["pid"]))
        if alive:
            continue
        try:
            _remove(p)
            done.removed.append(p)
        finally:
            if fd is not None:
                os.close(fd)
    return done


class AtomicOutput:
    """The output folder appears complete or not at all; nothing an input needs is ever replaced.

    Work happens in ``.{name}.neuromerge-tmp-{pid}`` next to ``out``, which holds a lock file (``flock``) for the
    writer's whole life; on success it is renamed to ``out`` (an existing ``out``, allowed by ``force``, is first
    renamed aside to ``.{name}.neuromerge-old-{pid}`` and removed after the swap; a failed swap puts it back); on any
    exception, ``KeyboardInterrupt`` and ``SystemExit`` included, the temporary folder is removed and the exception
    propagates. ``durable`` fsyncs every file and the folders before the rename.

    On creation, ``out`` is checked against ``inputs`` (:func:`~neuromerge.io.output_guard.check_output`:
    :class:`~neuromerge.errors.OutputConflictError` when it is or contains one; ``warnings`` lists an output inside
    an input folder), and what dead writers left in the parent folder is cleaned (:func:`clean_stale_outputs`;
    ``notes`` says what was restored). An ``OSError`` while creating, writing (the files in the temporary folder, or a
    disk-full error without a file name) or committing becomes :class:`~neuromerge.errors.OutputWriteError`
    ``cannot write OUT: reason``.
    """

    def __init__(self, out: Path, *, force: bool = False, durable: bool = False,
                 inputs: Iterable[InputRef] = ()) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.durable = durable
        self.warnings = check_output(out, inputs)
        self.notes = clean_stale_outputs(self.out.parent).notes if self.out.parent.is_dir() else []
        if self.out.exists() and not force:
            raise OutputExistsError(f"output folder {self.out} exists; pass --force to replace it")
        self.tmp = self.out.parent / _temp_name(self.out.name, "tmp", os.getpid())
        self._lock_fd: int | None = None

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _remove(self.tmp)
            self.tmp.mkdir()
            self._lock_fd = _take_lock(self.tmp)
        except OSError as e:
            self._discard()
            raise self._error(e) from None
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OutputWriteError) or (isinstance(exc, OSError) and self._is_write_error(exc)):
                raise self._error(exc) from None
            return False
        try:
            self._commit()
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise self._error(e) from None
            raise
        return False

    def _error(self, err: OSError | OutputWriteError) -> OutputWriteError:
        """``cannot write OUT: reason``, naming the final folder rather than the temporary one."""
        reason = err.reason if isinstance(err, OutputWriteError) else write_error(self.out, err).reason
        return OutputWriteError(f"cannot write {self.out}: {reason}", reason)

    def _is_write_error(self, err: OSError) -> bool:
        """An ``OSError`` of the output: about a path in the temporary folder or the output, or a full / read-only
        file system (``os.write`` names no file)."""
        for name in (err.filename, err.filename2):
            if name is not None:
                p = Path(os.fsdecode(name)).absolute()
                if p == self.tmp or self.tmp in p.parents or p == self.out or self.out in p.parents:
                    return True
        return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

    def _discard(self) -> None:
        _remove(self.tmp)
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

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
        try:
            self.tmp.rename(self.out)
        except BaseException:
            if old is not None:
                old.rename(self.out)  # the previous output stays where it was
            raise
        with contextlib.suppress(FileNotFoundError):  # the lock (still held) leaves the output folder
            (self.out / LOCK_FILE).unlink()
        if self.durable:
            fsync_path(self.out)
            fsync_path(self.out.parent)
        if old is not None:
            _remove(old)
        self._unlock()


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


def copy_model_files(src: Checkpoint | Path, out_dir: Path, *, config_overrides: dict | None = None,
                     tokenizer: bool = True) -> list[str]:
    """Copy ``config.json`` (with ``config_overrides`` applied to its top-level keys, written with indent 2),
    ``generation_config.json`` and the tokenizer / processor files from the base model's folder to
    ``out_dir`` (the tokenizer files only with ``tokenizer``: mergekit's ``--no-copy-tokenizer`` leaves them out).

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
    for name in (*CONFIG_FILES[1:], *(TOKENIZER_FILES if tokenizer else ())):
        if (base / name).is_file():
            shutil.copyfile(base / name, out_dir / name)  # follows HF-cache symlinks: copies the content
            copied.append(name)
    if tokenizer and not set(copied) & set(TOKENIZER_FILES):
        warnings.append(f"no tokenizer files in {base}; the output has no tokenizer")
    return warnings
