"""The user cache: ``$NEUROMERGE_CACHE`` or ``$XDG_CACHE_HOME/neuromerge`` (default ``~/.cache/neuromerge``).

Entries are folders named by a hash of everything that determines them, written to a temporary sibling and
renamed into place, with a ``meta.json`` holding the format version and a SHA-256 of every file. An entry whose
files do not match (corrupt, truncated, written by another format version) is detected, reported and rebuilt,
never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1


def cache_root() -> Path:
    env = os.environ.get("NEUROMERGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "neuromerge"


def key_of(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _valid(entry: Path) -> bool:
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != CACHE_FORMAT:
        return False
    files = meta.get("files", {})
    try:
        return all(_sha256(entry / name) == digest for name, digest in files.items())
    except OSError:
        return False


def cached(kind: str, key: dict[str, Any], build: Callable[[Path], dict[str, Any]], *, rebuild: bool = False
           ) -> Path:
    """Return the folder of cache entry ``kind/hash(key)``, building it with ``build(tmp_folder)`` when absent,
    invalid or ``rebuild`` is set. ``build`` writes its files into the folder and returns extra metadata."""
    entry = cache_root() / kind / key_of(key)
    if entry.exists() and not rebuild:
        if _valid(entry):
            return entry
        warnings.warn(f"cache entry {entry} is corrupt or from another version; rebuilding it", stacklevel=2)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        extra = build(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": CACHE_FORMAT, "key": key, "files": files, **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "meta.json").read_text())
