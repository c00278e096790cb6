"""Static merge methods, one module per method family, registered with ``@method``."""

from .base import GlobalStats, MergeInput, MergeMethod, MethodParams
from .registry import available, get, method

__all__ = ["GlobalStats", "MergeInput", "MergeMethod", "MethodParams", "available", "get", "method"]
