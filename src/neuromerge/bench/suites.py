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


#: head protocols of the suites with task heads (``--heads``): the first is the default
HEADS: tuple[str, ...] = ("frozen", "trained")


def with_heads(suite: Suite, heads: str) -> Suite:
    """``suite`` (changed in place and returned) with its experts' head protocol set: ``"frozen"`` = heads fit on
    θ0 (the base probe) and fixed while the backbone trains, the papers' protocol and the default; ``"trained"`` =
    zero heads trained together with the backbone. The protocol is part of the suite fingerprint, hence of the
    expert cache key. A suite without heads (``llm``: label words) or an unknown protocol is a
    :class:`BenchError`."""
    if heads not in HEADS:
        raise BenchError(f"--heads must be one of {', '.join(HEADS)}, not {heads!r}")
    config = getattr(suite, "config", None)
    if config is None or not hasattr(config, "with_heads"):
        raise BenchError(f"suite {suite.name!r} has no task heads (it scores label words): --heads does not apply")
    suite.config = config.with_heads(heads)  # type: ignore[attr-defined]
    return suite
