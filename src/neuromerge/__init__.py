"""neuromerge: fine-grained model merging, one tensor at a time.

Python API:

- :func:`merge` — merge the pool a config describes into a Hugging Face folder (streaming, atomic);
- :func:`inspect` — task-vector interference of the pool a config describes (cosines, sign conflicts,
  parallel / orthogonal energy, norms, figures, a suggested method);
- :func:`neuromerge.functional.merge_state_dicts` — the same methods on in-memory state dicts;
- :class:`TaskVector` / :class:`Weights` — task-vector algebra for notebooks;
- :func:`methods` — the registered merge methods;
- :func:`load_routed` — a routed-model folder (``neuromerge route build``) as a ready module;
- ``search(config, out, ...)`` — a MERGE search (``neuromerge search``) on a named suite or on your own model
  (the package :mod:`neuromerge.search` is callable: :func:`neuromerge.search.merge_run.search`);
- :func:`route_build` — build a routed-model folder (``neuromerge route build METHOD``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TaskVector", "Weights", "__version__", "inspect", "load_routed", "merge", "methods", "route_build",
           "search"]


def merge(config: Any, out: Any, **kwargs: Any) -> Any:
    """Merge the pool of ``config`` (YAML path, dict or :class:`~neuromerge.config.MergeConfig`) into ``out``.
    See :func:`neuromerge.engine.run.merge` for the options."""
    from .engine.run import merge as _merge

    return _merge(config, out, **kwargs)


def inspect(config: Any, out: Any = None, **kwargs: Any) -> Any:
    """Inspect the pool of ``config`` (YAML path, dict or MergeConfig; ``None`` with ``suite=`` for a bench
    suite's experts) and return an :class:`~neuromerge.inspection.InspectReport`; with ``out``, also write
    ``inspect.json`` and the PNG figures there. See :func:`neuromerge.inspection.inspect` for the options."""
    from .inspection import inspect as _inspect

    return _inspect(config, out, **kwargs)


def load_routed(folder: Any, **kwargs: Any) -> Any:
    """Load a routed-model folder in one call (MIN-Merging, Twin-Merging, EMR, WEMoE or MERGE); see
    :func:`neuromerge.routing.folder.load_routed` for the options."""
    from .routing.folder import load_routed as _load

    return _load(folder, **kwargs)


def route_build(method: str, config: Any, out: Any, *, force: bool = False, allow_download: bool = False,
                **params: Any) -> Any:
    """``neuromerge route build METHOD --config CONFIG -o OUT`` from Python: ``method`` one of ``min_merging``,
    ``twin``, ``emr``, ``wemoe``, ``merge``; ``config`` a YAML file (relative paths resolve against its folder) or a
    mapping (against the working directory); ``params`` override its keys. Returns the routed-model folder
    (:func:`load_routed` loads it). Every problem of the config is one line of the raised error."""
    from pathlib import Path

    from .errors import ConfigError
    from .io.output_guard import check_output
    from .routing.cli import call_builder, route_inputs
    from .textfile import load_yaml

    source = None
    if isinstance(config, dict):
        raw = dict(config)
    else:
        source = Path(config)
        if not source.is_file():
            raise ConfigError(f"route config {source} not found" if not source.is_dir()
                              else f"route config {source} is a folder, expected a YAML file")
        raw = load_yaml(source, "route config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must hold a mapping of parameters")
    if raw.get("method", method) != method:
        raise ConfigError(f"the config's method {raw['method']!r} differs from {method!r}")
    raw.pop("method", None)
    raw.update(params)
    check_output(Path(out), route_inputs(method, source, raw))
    return call_builder(method, raw, Path(out), force=force, source=source, allow_download=allow_download)


def methods() -> dict[str, Any]:
    """Registered merge methods by name."""
    from .methods import available

    return available()


def __getattr__(name: str) -> Any:
    if name == "search":  # the package is callable (neuromerge.search(config, out, ...))
        import importlib

        return importlib.import_module(".search", __name__)
    if name in ("TaskVector", "Weights"):
        from . import task_vector

        return getattr(task_vector, name)
    raise AttributeError(name)
