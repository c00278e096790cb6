"""neuromerge: fine-grained model merging, one tensor at a time.

Python API:

- :func:`merge` — merge the pool a config describes into a Hugging Face folder (streaming, atomic);
- :func:`inspect` — task-vector interference of the pool a config describes (cosines, sign conflicts,
  parallel / orthogonal energy, norms, figures, a suggested method);
- :func:`neuromerge.functional.merge_state_dicts` — the same methods on in-memory state dicts;
- :class:`TaskVector` / :class:`Weights` — task-vector algebra for notebooks;
- :func:`methods` — the registered merge methods;
- :func:`load_routed` — a routed-model folder (``neuromerge route build``) as a ready module.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TaskVector", "Weights", "__version__", "inspect", "load_routed", "merge", "methods"]


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


def methods() -> dict[str, Any]:
    """Registered merge methods by name."""
    from .methods import available

    return available()


def __getattr__(name: str) -> Any:
    if name in ("TaskVector", "Weights"):
        from . import task_vector

        return getattr(task_vector, name)
    raise AttributeError(name)
