"""neuromerge: fine-grained model merging, one tensor at a time.

Python API:

- :func:`merge` — merge the pool a config describes into a Hugging Face folder (streaming, atomic);
- :func:`inspect` — task-vector interference of the pool a config describes (cosines, sign conflicts,
  parallel / orthogonal energy, norms, figures, a suggested method);
- :func:`neuromerge.functional.merge_state_dicts` — the same methods on in-memory state dicts;
- :class:`TaskVector` / :class:`Weights` — task-vector algebra for notebooks;
- :func:`methods` — the registered merge methods;
- :func:`load_routed` — a routed-model folder (``neuromerge route build``) as a ready module;
- :func:`route_build` — build a routed model (MIN-Merging, Twin, EMR, WEMoE, MERGE) from a config, as
  ``neuromerge route build`` does;
- ``search(config, out, ...)`` — a MERGE search (``neuromerge search``) on a named suite or on your own model
  (the package :mod:`neuromerge.search` is callable: :func:`neuromerge.search.merge_run.search`);
- :func:`evaluate` — score merged / routed folders and the base on your tasks, normalised against your experts.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TaskVector", "Weights", "__version__", "evaluate", "inspect", "load_routed", "merge", "methods",
           "route_build", "search"]


def merge(config: Any, out: Any, **kwargs: Any) -> Any:
    """Merge the pool of ``config`` (YAML path, dict or :class:`~neuromerge.config.MergeConfig`) into ``out``.
    See :func:`neuromerge.engine.run.merge` for the options. A config with ``data:`` (Fisher, RegMean, AdaMerging
    on the user's task data) runs :func:`neuromerge.data_aware.merge.merge_with_data`."""
    from .config import load_config

    if load_config(config).data is not None:
        from .data_aware.merge import merge_with_data

        return merge_with_data(config, out, **kwargs)
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


def route_build(method: str, config: Any, out: Any, **kwargs: Any) -> Any:
    """Build the routed model ``method`` that ``config`` (YAML path or mapping) describes into ``out``; returns the
    folder. See :func:`neuromerge.routing.api.route_build` for the options (``force``, ``threads``,
    ``allow_download``)."""
    from .routing.api import route_build as _route_build

    return _route_build(method, config, out, **kwargs)


def evaluate(config: Any, models: Any = (), out: Any = None, **kwargs: Any) -> Any:
    """Score ``models`` (merged folders, merged LoRA adapters, routed folders) and the base on the tasks of ``config``
    (a user-model YAML / mapping — ``base``, ``tasks``, ``experts`` — or a :class:`~neuromerge.tasks.TaskSet`),
    normalised against its experts; with ``out``, write ``results.json``, ``results.md`` and a PNG there. Returns an
    :class:`~neuromerge.evaluation.EvalResults`; see :func:`neuromerge.evaluation.evaluate` for the options."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(config, models, out, **kwargs)


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
