"""The registry of benchmark suites: name -> module (imported lazily) and :class:`~.suite.Suite` class.

Importing this module is cheap: a suite's module (and its model libraries) is imported only by
:func:`get_suite`. A registered suite whose module is not there yet gives a clear one-line error.
"""

from __future__ import annotations

import importlib

from ..errors import TaskError
from .suite import Suite


class BenchError(TaskError):
    """Bad benchmark input: unknown suite / task / method, missing data package... (the library's
    :class:`~neuromerge.errors.TaskError`, raised by the harness)."""


#: suite name -> (module under ``neuromerge.bench``, class name, one-line description)
SUITES: dict[str, tuple[str, str, str]] = {
    "text": ("text", "TextSuite", "MiniLM-L6 sentence encoder, 5 text classification tasks + language id (OOD)"),
    "vision": ("vision", "VisionSuite", "EfficientNet-Lite0 at 32 px, digits / letters tasks + OOD"),
    "llm": ("llm", "LLMSuite", "SmolLM2-135M with LoRA experts, instruction-phrased text tasks + OOD"),
}


def available_suites() -> dict[str, str]:
    """Registered suite names -> description (whether or not their module is installed)."""
    return {name: desc for name, (_, _, desc) in SUITES.items()}


def get_suite(name: str) -> Suite:
    """A fresh instance of the suite ``name``."""
    try:
        module_name, class_name, _ = SUITES[name]
    except KeyError:
        raise BenchError(f"unknown suite {name!r}; available: {', '.join(SUITES)}") from None
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__package__}.{module_name}":
            raise BenchError(f"suite {name!r} is registered but its module neuromerge.bench.{module_name} "
                             "is not available in this version") from None
        raise BenchError(f"suite {name!r} needs the package {err.name!r}, which is not installed") from None
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise BenchError(f"suite {name!r}: neuromerge.bench.{module_name} defines no class {class_name}") from None
    return cls()
