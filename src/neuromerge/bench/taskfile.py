"""``neuromerge bench SUITE --task-file F``: the entries of a task file that join a bench suite.

The task-file format, its reader and its label rules are the library's (:mod:`neuromerge.tasks.taskfile`); the
bench adds what only it knows: the registered suite names a ``suite:`` key may take, the data each suite takes
(:data:`SUITE_INPUTS`) and how the vision suite turns ``.npz`` images into its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..tasks.taskfile import (
    TaskEntry,
    make_tensor_splits,
    map_labels,
)
from ..tasks.taskfile import load_task_file as _load_task_file
from ..tasks.taskfile import read_entries as _read_entries
from .suite import Budget, TaskData
from .suites import available_suites

#: suite -> the kind of data files it takes
SUITE_INPUTS: dict[str, tuple[str, ...]] = {"text": (".csv", ".jsonl"), "llm": (".csv", ".jsonl"),
                                            "vision": (".npz",)}


def read_entries(path: str | Path) -> list[TaskEntry]:
    """Parse and validate the YAML file (every entry; a ``suite:`` key must name a registered suite)."""
    return _read_entries(path, suites=list(available_suites()))


def _model_images(x: Any) -> torch.Tensor:
    """The vision suite's inputs (its image size, [0, 1]); without the vision extras, the array as float."""
    try:
        from .vision_data import to_model_images
    except ImportError:
        return torch.as_tensor(x).float()
    return to_model_images(x)


def load_task_file(path: str | Path, suite: str, budget: Budget, *, reserved: Sequence[str] = (),
                   split_seed: int = 0) -> list[TaskData]:
    """The tasks of ``path`` whose ``suite:`` is ``suite``, as :class:`TaskData` capped by ``budget``; entries
    of another suite, or without one (a user model's), are skipped; a name in ``reserved`` is an error."""
    return _load_task_file(path, suite, budget, reserved=reserved, split_seed=split_seed,
                           suites=list(available_suites()),
                           allowed=SUITE_INPUTS.get(suite, (".csv", ".jsonl", ".npz")), image_transform=_model_images)


__all__ = ["SUITE_INPUTS", "TaskEntry", "load_task_file", "make_tensor_splits", "map_labels", "read_entries"]
