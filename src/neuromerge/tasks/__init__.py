"""Layer 2: the one contract for "models + task data", and its implementation over a user's model folder.

- :mod:`.contract`: :class:`Suite` (the abstract contract), :class:`ModelAccess` (its forward hooks as a
  Protocol), the data classes :class:`TaskData`, :class:`Split`, :class:`Budget`, :class:`Expert`, :class:`Batch`,
  :class:`TaskSet` and the batching / pooling helpers;
- :mod:`.hf`: :class:`HFSuite` and :func:`open_user_model` / :func:`load_user_model` (a Hugging Face folder, a task
  file and adapter or full-checkpoint experts as a :class:`TaskSet`);
- :mod:`.taskfile`: task files (entries for a user's model need no ``suite:`` key); :mod:`.splits`: seeded
  stratified splits; :mod:`.probe`: the linear probe;
- :mod:`.named`: ``suite: NAME`` resolved by a registered provider (the bench's), never by the library.

Names are imported lazily (``import neuromerge.tasks`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Suite": "contract",
    "ModelAccess": "contract",
    "BatchLike": "contract",
    "TaskData": "contract",
    "Split": "contract",
    "SplitName": "contract",
    "Budget": "contract",
    "Expert": "contract",
    "Batch": "contract",
    "ExampleScores": "contract",
    "TaskSet": "contract",
    "StateDict": "contract",
    "FeatureSource": "contract",
    "mean_pool": "contract",
    "pad_right": "contract",
    "token_batches": "contract",
    "length_batches": "contract",
    "find_submodule": "contract",
    "module_output": "contract",
    "output_of": "contract",
    "HFSuite": "hf",
    "UserModelConfig": "hf",
    "validate_user_model": "hf",
    "open_user_model": "hf",
    "load_user_model": "hf",
    "TaskEntry": "taskfile",
    "read_entries": "taskfile",
    "load_task_file": "taskfile",
    "load_user_tasks": "taskfile",
    "make_splits": "splits",
    "fit_linear": "probe",
    "register_suite_provider": "named",
    "resolve_suite": "named",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neuromerge.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuromerge.tasks.{module}"), name)
