"""Every public function of ``neuromerge.tensors`` is named in a test of this folder: adding an untested primitive
fails here. A function counts when a ``tests/tensors/test_*.py`` file imports it from its module (``from
neuromerge.tensors.<module> import name``; ruff refuses an unused import) or calls it as ``<module>.name``."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import neuromerge.tensors as package

HERE = Path(__file__).resolve().parent


def public_functions() -> dict[str, list[str]]:
    """Module name → the public functions it defines (not the ones it imports)."""
    out = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        out[info.name] = sorted(name for name, obj in inspect.getmembers(module, inspect.isfunction)
                                if not name.startswith("_") and obj.__module__ == module.__name__)
    return out


def named_in_tests() -> set[tuple[str, str]]:
    """``(module, function)`` pairs the test files import or reach as ``module.function``."""
    seen = set()
    for path in sorted(HERE.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package.__name__}."):
                seen.update((node.module.rsplit(".", 1)[1], alias.name) for alias in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                seen.add((node.value.id, node.attr))
    return seen


def test_every_public_function_of_tensors_is_named_in_a_test() -> None:
    functions = public_functions()
    assert {"consensus", "lowrank", "neurons", "quant", "rng", "selection", "sparsify"} <= set(functions)
    assert sum(len(v) for v in functions.values()) >= 40  # the scan saw the modules' functions
    seen = named_in_tests()
    missing = [f"{module}.{name}" for module, names in functions.items() for name in names
               if (module, name) not in seen]
    assert not missing, f"public functions of neuromerge.tensors without a test in tests/tensors/: {missing}"
