"""``neuromerge search`` / ``route build merge``: moved to :mod:`neuromerge.search.merge_run` (re-exported).

The library resolves a config's ``suite:`` through the provider the bench registers
(:func:`neuromerge.tasks.named.register_suite_provider`, see :mod:`neuromerge.bench.tasksets`).
"""

from __future__ import annotations

from ..search.merge_run import (
    CONFIG_FILE,
    SEARCH_OPERATORS,
    RoutedMergeParams,
    SearchRunConfig,
    build_routed,
    choose_point,
    fingerprint,
    load_search_config,
    make_problem,
    run_merge_search,
    run_search_worker,
    study_name,
)

__all__ = ["CONFIG_FILE", "SEARCH_OPERATORS", "RoutedMergeParams", "SearchRunConfig", "build_routed", "choose_point",
           "fingerprint", "load_search_config", "make_problem", "run_merge_search", "run_search_worker",
           "study_name"]
