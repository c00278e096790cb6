"""Generic surrogate-assisted NSGA-II search over per-component task partitions (MERGE, docs/methods/spec.md §2).

The search core knows nothing about models: the caller supplies ``evaluate(config) -> float`` (maximize) and
``storage(config) -> int`` (bytes, minimize). See :mod:`.nsga` for the algorithm, :mod:`.encoding` for the
configuration encoding, :mod:`.distributed` for running the exact evaluations on Optuna workers. MERGE on models:
:mod:`.merge_problem` (the two objectives over any :class:`neuromerge.tasks.TaskSet`) and :mod:`.merge_run`
(``neuromerge search``, ``search-worker``, ``route build merge``), imported on demand.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .archive import Evaluation, EvaluationCache, hypervolume, non_dominated
from .distributed import run_worker
from .encoding import Configuration, SearchSpace, bell, canonicalize, groups, set_partitions
from .nsga import GenerationRecord, SearchResult, SeedResult, archive_table, resume_search, run_search
from .plots import plot_front, plot_hypervolume
from .problem import SearchError, SearchProblem, SearchSettings

__all__ = [
    "Configuration",
    "Evaluation",
    "EvaluationCache",
    "GenerationRecord",
    "SearchError",
    "SearchProblem",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "SeedResult",
    "archive_table",
    "bell",
    "canonicalize",
    "groups",
    "hypervolume",
    "non_dominated",
    "plot_front",
    "plot_hypervolume",
    "resume_search",
    "run_search",
    "run_worker",
    "set_partitions",
]


class _CallableModule(types.ModuleType):
    """``neuromerge.search`` is both this package and the Python API of ``neuromerge search``: importing a
    submodule rebinds the package attribute ``neuromerge.search`` to the module, so the module itself is callable."""

    def __call__(self, config: Any, out: Any, **kwargs: Any) -> dict[str, Any]:
        """``neuromerge.search(config, out, ...)``: :func:`neuromerge.search.merge_run.search` (a MERGE search on a
        named suite or on your own model; returns the report)."""
        from .merge_run import search

        return search(config, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
