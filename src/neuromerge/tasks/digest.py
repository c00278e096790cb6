"""Content digests of a user's model inputs: what a resumable pipeline (a MERGE search, its workers, ``route build
merge`` from a finished search) compares to refuse inputs that changed since it started.

For every input of a :class:`~.hf.UserModelConfig` — the base folder, the task file, the data file of each named
task and each expert (adapter folder, checkpoint folder or file) — :func:`user_model_digest` lists its files
(sorted relative names; a folder's files recursively, skipping hidden names and ``*.md``) with their size and a
SHA-256 of their *content*:

- files up to :data:`WHOLE_BYTES` (64 MiB) are hashed whole (configs, tokenizers, task data, LoRA adapters, small
  checkpoints);
- larger files (full checkpoints' shards) are hashed over their size and :data:`SAMPLES` blocks of
  :data:`BLOCK_BYTES` (1 MiB) evenly spaced from the first byte to the last — a safetensors file's first block holds
  its header (names, dtypes, shapes, offsets) and the others sample the weights, so a re-trained or re-saved
  checkpoint is caught without reading gigabytes. A change confined to bytes between the samples is not (the
  documented limit of the sampled hash).

Modification times are not used: a copy of the same files (on a worker machine, after ``cp -r``) has the same
digest. The digest holds no absolute path either (roles and relative names), so workers on other machines with the
same files agree; the paths themselves are compared through the saved config.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: files up to this size are hashed whole
WHOLE_BYTES = 64 * 2**20
#: larger files: this many evenly spaced blocks (first and last included) of BLOCK_BYTES
SAMPLES = 16
BLOCK_BYTES = 2**20


def file_digest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file (whole, or sampled above :data:`WHOLE_BYTES`; module
    docstring)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= WHOLE_BYTES:
            for chunk in iter(lambda: f.read(4 * BLOCK_BYTES), b""):
                h.update(chunk)
            return {"size": size, "sha256": h.hexdigest()}
        h.update(f"sampled:{size}:{SAMPLES}:{BLOCK_BYTES}".encode())
        last = size - BLOCK_BYTES
        for i in range(SAMPLES):
            f.seek(last * i // (SAMPLES - 1))
            h.update(f.read(BLOCK_BYTES))
    return {"size": size, "sha256": h.hexdigest(), "sampled": True}


def _files(root: Path) -> Iterable[tuple[str, Path]]:
    """``(relative name, path)`` of the files a loader may read under ``root`` (hidden names and ``*.md`` skipped),
    sorted; ``root`` itself when it is a file."""
    if root.is_file():
        yield root.name, root
        return
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith(".md"):
                continue
            full = Path(dirpath) / name
            found.append((full.relative_to(root).as_posix(), full))
    yield from sorted(found)


def path_digest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{relative name: file_digest}`` of a file or of every file under a folder (module docstring)."""
    return {name: file_digest(p) for name, p in _files(Path(path))}


def user_model_digest(base: str | os.PathLike[str], tasks: str | os.PathLike[str], experts: Mapping[str, str],
                      names: Sequence[str] | None = None) -> dict[str, Any]:
    """The digest of a user's model inputs (absolute paths, as validated): ``{"base", "tasks", "data": {task: …},
    "experts": {task: …}}``, each a :func:`path_digest`. ``names``: the tasks whose data files count (default: the
    experts')."""
    from .taskfile import data_file, user_entries

    names = list(experts) if names is None else list(names)
    entries = user_entries(tasks, names)
    return {"base": path_digest(base), "tasks": path_digest(tasks),
            "data": {e.name: path_digest(data_file(tasks, e)) for e in entries},
            "experts": {name: path_digest(experts[name]) for name in names}}


def digest_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The inputs whose digest differs (``base``, ``tasks``, ``data.<task>``, ``experts.<task>``), in order."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if key in ("data", "experts") and isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{k}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out


__all__ = ["BLOCK_BYTES", "SAMPLES", "WHOLE_BYTES", "digest_changes", "file_digest", "path_digest",
           "user_model_digest"]
