"""MERGE's objectives and representative table: moved to :mod:`neuromerge.search.merge_problem` (re-exported)."""

from __future__ import annotations

from ..search.merge_problem import (
    LOW_STORAGE_TOLERANCE,
    MergeProblem,
    format_table,
    representative_points,
    representative_table,
    static_labels,
)

__all__ = ["LOW_STORAGE_TOLERANCE", "MergeProblem", "format_table", "representative_points", "representative_table",
           "static_labels"]
