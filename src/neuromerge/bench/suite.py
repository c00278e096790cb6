"""The contract between the benchmark protocol and a suite: re-exported from :mod:`neuromerge.tasks.contract`
(layer 2), where it lives since the bench became a client of the library."""

from __future__ import annotations

from ..tasks.contract import (
    Batch,
    BatchLike,
    Budget,
    ExampleScores,
    Expert,
    FeatureSource,
    Metric,
    ModelAccess,
    Split,
    SplitName,
    StateDict,
    Suite,
    TaskData,
    find_submodule,
    length_batches,
    mean_pool,
    module_output,
    output_of,
    pad_right,
    token_batches,
)

__all__ = ["Batch", "BatchLike", "Budget", "ExampleScores", "Expert", "FeatureSource", "Metric", "ModelAccess",
           "Split", "SplitName", "StateDict", "Suite", "TaskData", "find_submodule", "length_batches", "mean_pool",
           "module_output", "output_of", "pad_right", "token_batches"]
