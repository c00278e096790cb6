"""Reading the user's text files (YAML configs, task files, JSONL / CSV data) with one-line errors.

Every text input is UTF-8. :func:`read_text` decodes a file strictly; bytes that are not UTF-8 give one line that
names the file, the byte offset, line and column of the first bad byte (``config.yaml is not UTF-8 text: byte 0xe9
at offset 41 (line 3, column 9); save it as UTF-8``) instead of a ``UnicodeDecodeError`` traceback or a silent
decoding in the locale's encoding. :func:`load_yaml` adds a one-line error for malformed YAML (the parser's
problem and its line / column). A leading byte-order mark is dropped.

Layer 0: the library, the routing CLI and the bench use it; it imports nothing of neuromerge but the errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neuromerge.errors import ConfigError, NeuromergeError

_BOM = "\ufeff"


def utf8_error(path: str | os.PathLike[str], data: bytes, err: UnicodeDecodeError, what: str = "") -> str:
    """The one-line message for ``err`` raised while decoding ``data`` (the whole content of ``path``):
    ``"{what} {path} is not UTF-8 text: byte 0x.. at offset N (line L, column C); save it as UTF-8"``."""
    start = err.start
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1  # in bytes, 1-based
    name = f"{what} {path}" if what else str(path)
    return (f"{name} is not UTF-8 text: byte 0x{data[start]:02x} at offset {start} (line {line}, column {column}); "
            "save it as UTF-8")


def decode_utf8(data: bytes, path: str | os.PathLike[str], what: str = "",
                error: type[NeuromergeError] = ConfigError) -> str:
    """``data`` (the content of ``path``) decoded as UTF-8, a leading byte-order mark dropped; ``error`` with
    :func:`utf8_error`'s message when it is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(utf8_error(path, data, err, what)) from None
    return text.removeprefix(_BOM)


def existing_file(path: str | os.PathLike[str], what: str, error: type[NeuromergeError] = ConfigError, *,
                  missing: str = "does not exist") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is a file; else ``error``: ``"{what} {path} is a folder, expected
    a YAML file"`` for a folder, ``"{what} {path} {missing}"`` for nothing there (the config loaders' one rule)."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a folder, expected a YAML file")
    if not p.is_file():
        raise error(f"{what} {p} {missing}")
    return p


def read_text(path: str | os.PathLike[str], what: str = "", error: type[NeuromergeError] = ConfigError) -> str:
    """The UTF-8 text of the file ``path`` (see :func:`decode_utf8`); ``error`` (one line naming ``what`` and the
    path) when it cannot be read or is not UTF-8. A missing file is the caller's to report first, with its own
    wording; here it is ``"{what} {path} cannot be read (…)"`` like any other unreadable file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        name = f"{what} {p}" if what else str(p)
        raise error(f"{name} cannot be read ({err.strerror or err})") from None
    return decode_utf8(data, p, what, error)


def yaml_problem(err: Exception) -> str:
    """A one-line description of a PyYAML error: its problem and where (``"mapping values are not allowed here
    (line 3, column 8)"``); line and column are 1-based."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    text = str(problem) if problem else (str(err).splitlines()[0] if str(err) else type(err).__name__)
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(text.split())


def load_yaml(path: str | os.PathLike[str], what: str = "", error: type[NeuromergeError] = ConfigError) -> Any:
    """The parsed YAML document of ``path`` (None for an empty file); ``error`` on a file that cannot be read, is
    not UTF-8 (:func:`read_text`) or is not valid YAML (``"{what} {path} is not valid YAML: {problem} (line L,
    column C)"``)."""
    import yaml

    text = read_text(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        name = f"{what} {path}" if what else str(path)
        raise error(f"{name} is not valid YAML: {yaml_problem(err)}") from None


__all__ = ["decode_utf8", "load_yaml", "read_text", "utf8_error", "yaml_problem"]
