"""docs/engine.md's table of the fused kernels (bitwise or to rounding) stays complete and true to its tests: every
kernel ``_fused.c`` exports has a row saying one or the other, and every test a row cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Fused kernels: bitwise or to rounding"


def _rows() -> list[list[str]]:
    text = (ROOT / "docs" / "engine.md").read_text()
    assert SECTION in text
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| `nm_")]


def test_every_kernel_has_a_row() -> None:
    source = (ROOT / "src" / "neuromerge" / "kernels" / "_fused.c").read_text()
    exported = set(re.findall(r"^(?:NM_CLONES )?int64_t (nm_\w+)\(", source, re.M)) - {"nm_abi"}
    assert {"nm_linear", "nm_ties", "nm_neuro_rows", "nm_abs_hist"} <= exported
    rows = _rows()
    listed = {name for row in rows for name in re.findall(r"`(nm_\w+)`", row[0])}
    assert listed == exported
    for row in rows:
        assert len(row) == 4, row
        assert row[2].startswith(("**bitwise**", "**to rounding**")), row


def test_every_cited_test_exists() -> None:
    tests = (ROOT / "tests" / "engine" / "test_native_kernels.py").read_text()
    defined = set(re.findall(r"^def (test_\w+)\(", tests, re.M))
    cited = {name for row in _rows() for name in re.findall(r"`(test_\w+)`", row[3])}
    assert cited and cited <= defined, cited - defined
