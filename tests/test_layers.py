"""The layer rule of DESIGN.md, read from the source: every ``import`` of every module under ``src/neuromerge``
(absolute and relative, at module level and inside functions) is parsed with :mod:`ast`.

- Only ``cli.py`` (dispatch) and ``bench/**`` (the harness) import ``neuromerge.bench``.
- Layers 0–1 (``tensors``, ``kernels``, ``errors``, ``numeric``, ``textfile``, ``paths``; ``engine``, ``methods``,
  ``io``, ``config``, ``functional``, ``task_vector``) import nothing of layers 2–5.
- Layer 2 (``tasks``) imports nothing of layers 3–5 (``routing``, ``search``, ``data_aware``, ``inspection``).
- No module but ``cli.py`` imports ``neuromerge.cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "neuromerge"

#: top-level part of ``neuromerge`` → layer
LAYERS: dict[str, int] = {
    "tensors": 0, "kernels": 0, "errors": 0, "numeric": 0, "textfile": 0, "paths": 0,
    "engine": 1, "methods": 1, "io": 1, "config": 1, "functional": 1, "task_vector": 1,
    "catalog": 1,  # the methods' descriptions; upper-layer models are named by "module:attr" strings
    "tasks": 2,
    "routing": 3, "search": 3, "data_aware": 3, "inspection": 3, "evaluation": 3,
    "bench": 4,
    "cli": 5, "mergekit_cli": 5,  # mergekit-yaml's command line on the engine
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (``from . import x`` counts as ``pkg.x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if node.module is None or node.level:  # `from . import bench` / `from .. import tasks`
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m == "neuromerge" or m.startswith("neuromerge.")]


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_part_has_a_layer() -> None:
    parts = {_part(_module_name(p)) for p in _sources()} - {None}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_the_parser_sees_relative_and_function_local_imports(tmp_path: Path) -> None:
    tree = SRC / "routing" / "build_config.py"
    got = {m for _, m in _imports(tree)}
    assert "neuromerge.tasks.hf" in got and "neuromerge.data_aware.wemoe" in got  # module level / in a function


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_layer_rule(path: Path) -> None:
    me = _module_name(path)
    mine = _part(me)
    if mine is None:  # neuromerge/__init__.py: lazy entry points into every layer
        return
    problems = []
    for line, mod in _imports(path):
        other = _part(mod)
        if other is None or other not in LAYERS or other == mine:
            continue
        if other == "bench" and mine not in ("bench", "cli"):
            problems.append(f"line {line}: imports {mod} (only cli.py and bench/ may import the bench)")
        elif other == "cli":
            problems.append(f"line {line}: imports {mod} (nothing imports the command line)")
        elif LAYERS[other] > LAYERS[mine] and mine != "cli":
            problems.append(f"line {line}: layer {LAYERS[mine]} ({mine}) imports layer {LAYERS[other]} ({mod})")
    assert not problems, f"{path.relative_to(SRC)}:\n" + "\n".join(problems)
