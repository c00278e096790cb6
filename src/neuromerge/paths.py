"""Paths written in a config file: one rule for every config (merge, search, route build, task file).

A relative path resolves against the folder of the config file that names it. For configs written before that
rule, a relative path that does not exist there but does from the working directory is still taken from there.
A path found nowhere is returned relative to the config's folder (absolute), so the error names where it was
looked for (:func:`looked_for`). Configs given as Python mappings (no file) resolve against the working directory.

Layer 0: imports nothing of neuromerge.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir(source: str | os.PathLike[str] | None) -> Path | None:
    """The absolute folder of a config file (None for a config without a file)."""
    return None if source is None else Path(os.path.abspath(Path(source).expanduser().parent))


def resolve_path(raw: str | os.PathLike[str], base_dir: Path | None) -> tuple[Path, bool]:
    """``(absolute path, exists)`` of ``raw`` from a config in ``base_dir`` (module docstring: the config's folder
    first, then the working directory; an absolute path as written)."""
    p = Path(raw).expanduser()
    if p.is_absolute():
        return Path(os.path.abspath(p)), p.exists()
    if base_dir is not None:
        here = base_dir / p
        if here.exists() or not p.exists():
            return Path(os.path.abspath(here)), here.exists()
    return Path(os.path.abspath(p)), p.exists()


def resolve_str(raw: str, base_dir: Path | None) -> str:
    """``raw`` joined to ``base_dir`` when it is relative and exists there, else ``raw`` unchanged (found from the
    working directory, a hub id such as ``org/name``, or missing: reported by the caller)."""
    p = Path(raw).expanduser()
    if base_dir is None or p.is_absolute() or not (base_dir / p).exists():
        return raw
    return str(base_dir / p)


def looked_for(raw: str | os.PathLike[str], base_dir: Path | None) -> str:
    """Where a missing relative path was looked for, as ``" (looked for A and B)"`` (empty for an absolute one)."""
    if Path(raw).expanduser().is_absolute():
        return ""
    places = ([str(base_dir / raw)] if base_dir is not None else []) + [str(Path.cwd() / raw)]
    return f" (looked for {' and '.join(dict.fromkeys(places))})"
