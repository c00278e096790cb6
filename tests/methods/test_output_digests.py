"""Every static method's merged output is bitwise what it was when the digests were recorded
(``scripts/method_output_digests.py``: a seeded pool, several parameter settings per method, float32 and bfloat16,
native kernels on and off). The digests were recorded from commit 367af0d, before the function-style definitions,
the variants table and the kernel dispatch module; a change of a merge's output must re-record them on purpose.

Digests depend on the CPU's vector width and the torch version (reductions, BLAS): on another machine the
comparison is not meaningful and the test says so (skip with the recorded and the local environment)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).with_name("method_output_digests.txt")


def _script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("method_output_digests", ROOT / "scripts/method_output_digests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_method_output_is_bitwise_unchanged() -> None:
    script = _script()
    recorded = RECORDED.read_text().splitlines()
    if recorded[0] != script.environment():
        pytest.skip(f"digests recorded with {recorded[0]!r}, this machine is {script.environment()!r}")
    now = script.collect()
    assert script.compare(recorded, now) == []


def test_every_static_method_is_covered() -> None:
    script = _script()
    keys = {line.split(":")[0] for line in RECORDED.read_text().splitlines() if not line.startswith("#")}
    assert set(script.static_methods()) <= keys, "a new method: re-record the digests (the script's --write)"
    assert set(script.SETTINGS) <= set(script.static_methods())
