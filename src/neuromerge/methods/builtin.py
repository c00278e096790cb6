"""Imports every method module of this package so that each registers itself with ``@method``."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

_INFRASTRUCTURE = {"base", "registry", "builtin", "define"}

for _info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
    if _info.name not in _INFRASTRUCTURE and not _info.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_info.name}")
