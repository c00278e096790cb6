"""The streaming merge engine: plan → statistics pass (optional) → merge pass, one tensor (chunk) at a time."""

from .run import MergeResult, merge

__all__ = ["MergeResult", "merge"]
