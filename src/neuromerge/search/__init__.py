"""Generic surrogate-assisted NSGA-II search over per-component task partitions (MERGE, METHODS.md §2).

The search core knows nothing about models: the caller supplies ``evaluate(config) -> float`` (maximize) and
``storage(config) -> int`` (bytes, minimize). See :mod:`.nsga` for the algorithm, :mod:`.encoding` for the
configuration encoding, :mod:`.distributed` for running the exact evaluations on Optuna workers. MERGE on models:
:mod:`.merge_problem` (the two objectives over any :class:`neuromerge.tasks.TaskSet`) and :mod:`.merge_run`
(``neuromerge search``, ``search-worker``, ``route build merge``), imported on demand.
"""

from __future__ import annotations

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

