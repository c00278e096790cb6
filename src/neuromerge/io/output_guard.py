"""Refusals before an output is written: an output that would replace an input, an output that cannot be written.

Every command that writes a folder (``merge`` and its ``--dry-run``, ``route build``, ``search``, ``inspect``,
``bench -o``) and the Python API calls :func:`check_output` with the paths it reads, before reading a tensor:

- an output that *is* an input, or a folder that *contains* one, is refused (:class:`OutputConflictError`):
  ``--force`` would replace it and delete the user's model. Paths are compared after resolving symlinks, and the
  targets of the symlinks inside an input folder count too: a model folder in the Hugging Face cache is a folder
  of links to ``../../blobs/<hash>``, so an output holding those blobs is refused as well;
- an output *inside* an input folder (``base/merged``) loses nothing: a warning only.

:func:`check_writable` refuses, with one line, an output whose nearest existing parent is not a folder or whose
file system has less free space than the output needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from neuromerge.errors import OutputConflictError, OutputWriteError

#: entries of an input folder looked at for symlinks (a model folder has tens; this bounds a mistaken huge folder)
MAX_ENTRIES = 20_000

InputRef = str | os.PathLike[str] | None


def real_path(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, ``~`` expanded, every symlink and ``..`` resolved (also when it does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _locate(ref: str | os.PathLike[str]) -> Path | None:
    """The local path of an input: the path itself, or the cached snapshot of a Hugging Face id; None when absent
    (a missing input is reported by whoever reads it)."""
    text = os.fspath(ref)
    if not text:
        return None
    p = Path(text).expanduser()
    try:
        if p.exists() or p.is_symlink():
            return p
    except OSError:  # not a path at all (a name too long: YAML text given as the config)
        return None
    from neuromerge.io.hub import cached_snapshot, looks_like_hf_id

    if looks_like_hf_id(text):
        try:
            return cached_snapshot(text)
        except Exception:  # an ambiguous cache: whoever opens the model says so
            return None
    return None


def input_locations(path: Path) -> list[Path]:
    """The real paths an input occupies: itself (symlinks resolved) and, for a folder, the targets of the symlinks
    found inside it (the HF cache's blobs), at most :data:`MAX_ENTRIES` entries looked at."""
    found = [real_path(path)]
    if path.is_dir():
        seen = 0
        for root, dirs, files in os.walk(path):  # a symlinked sub-folder is listed, not entered
            for name in (*dirs, *files):
                seen += 1
                if seen > MAX_ENTRIES:
                    return found
                entry = Path(root, name)
                if entry.is_symlink():
                    found.append(real_path(entry))
    return list(dict.fromkeys(found))


def check_output(out: str | os.PathLike[str], inputs: Iterable[InputRef], *, what: str = "output") -> list[str]:
    """Refuse ``out`` when it is, or contains, one of ``inputs`` (paths or HF ids; None and missing ones are
    skipped); return warnings for an output that lies inside an input folder.

    Raises :class:`OutputConflictError` naming the input. Reads no tensor: only paths and folder listings.
    """
    target = real_path(out)
    warnings: list[str] = []
    for ref in inputs:
        if ref is None:
            continue
        p = _locate(ref)
        if p is None:
            continue
        own = real_path(p)
        for loc in input_locations(p):
            if loc != target and target not in loc.parents:
                continue
            via = "" if loc == own else f" ({loc}, which the input links to)"
            verb = "is" if loc == target else "contains"
            raise OutputConflictError(f"{what} {out} {verb} the input {os.fspath(ref)}{via}; "
                                      f"choose another {what} folder")
        if p.is_dir() and own in target.parents:
            warnings.append(f"the {what} {out} lies inside the input folder {os.fspath(ref)}")
    return list(dict.fromkeys(warnings))


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def check_writable(out: str | os.PathLike[str], needed_bytes: int = 0) -> None:
    """Refuse ``out`` when its nearest existing parent is not a folder, or when that file system has less free space
    than ``needed_bytes`` (the planned output size). A file system that reports no size at all (``/proc``) is not
    judged here: creating the folder fails with the system's reason.

    Raises :class:`OutputWriteError` (``cannot write OUT: reason``).
    """
    anchor = nearest_existing(out)
    if not anchor.is_dir() and anchor != Path(os.path.abspath(os.path.expanduser(os.fspath(out)))):
        reason = f"{anchor} is not a folder"
        raise OutputWriteError(f"cannot write {out}: {reason}", reason)
    if needed_bytes <= 0:
        return
    try:
        usage = shutil.disk_usage(anchor if anchor.is_dir() else anchor.parent)
    except OSError:
        return
    if usage.total and needed_bytes > usage.free:
        reason = (f"not enough free space ({_human(needed_bytes)} needed, {_human(usage.free)} free on the file "
                  f"system of {anchor})")
        raise OutputWriteError(f"cannot write {out}: {reason}", reason)


__all__ = ["check_output", "check_writable", "input_locations", "nearest_existing", "real_path"]
