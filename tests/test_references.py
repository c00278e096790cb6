"""The method specification the code cites lives in the repository (``docs/methods/spec.md``), and every citation of
it names a section (and item) that exists there; nothing cites the old out-of-repository spec file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "methods" / "spec.md"
OLD_NAME = "METHODS" + ".md"  # split so that this file does not cite it
#: where citations may appear: the package, the docs, the examples and the helper scripts
SCANNED = ["src", "docs", "examples", "benchmarks", "scripts", "README.md"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".c"}

CITATION = re.compile(r"spec\.md §(\d+)(?:\.(\d+))?")
ANCHOR = re.compile(r"spec\.md#(s\d+)")


def _files() -> list[Path]:
    out = []
    for entry in SCANNED:
        path = ROOT / entry
        out.extend([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES))
    return out


def _sections() -> dict[int, set[int]]:
    """Section number → the numbers of its numbered items (``1. **Trim [code]**: …``)."""
    sections: dict[int, set[int]] = {}
    current = None
    for line in SPEC.read_text().splitlines():
        if m := re.match(r"## (\d+)\. ", line):
            current = int(m.group(1))
            sections[current] = set()
        elif current is not None and (m := re.match(r"(\d+)\. \*\*", line)):
            sections[current].add(int(m.group(1)))
    return sections


def test_spec_has_its_sections_and_anchors() -> None:
    sections = _sections()
    assert sorted(sections) == [1, 2, 3, 4]
    assert sections[1] == set(range(1, 9)) and sections[2] == set(range(1, 7)) and sections[3] == set(range(1, 6))
    text = SPEC.read_text()
    assert all(f'<a id="s{n}"></a>' in text for n in sections)


def test_nothing_cites_the_out_of_repository_spec() -> None:
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _files()
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OLD_NAME in line]
    assert not offenders, offenders


def test_every_citation_resolves() -> None:
    sections = _sections()
    seen, bad = 0, []
    for path in _files():
        text = path.read_text(errors="replace")
        for m in CITATION.finditer(text):
            seen += 1
            section, item = int(m.group(1)), m.group(2)
            if section not in sections or (item is not None and int(item) not in sections[section]):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
        for m in ANCHOR.finditer(text):
            seen += 1
            if f'<a id="{m.group(1)}"></a>' not in SPEC.read_text():
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, bad
    assert seen >= 30  # the scan found the citations (the src/ docstrings alone hold 34)
