"""Evaluate anything on your own tasks: merged folders, merged LoRA adapters, routed folders and the base, scored on
a task set and normalised against its experts (layer 3: it reads routed folders).

- :func:`evaluate` (:mod:`.run`): the scores, the normalised accuracies, the head behind each score, and the report
  (``results.json``, ``results.md``, ``normalized_accuracy.png``: :mod:`.report`);
- :func:`load_taskset`: a user-model config (``base``, ``tasks``, ``experts``) or ``suite: NAME`` as a
  :class:`~neuromerge.tasks.TaskSet`;
- :mod:`.heads`: which head scores a task (the folder's ``heads/<task>.safetensors``, the expert's
  ``*ForSequenceClassification`` head, label words, or a probe on the expert's features);
- :mod:`.models`: opening a merged, adapter or routed folder.
- :mod:`.statistics`: t-intervals over seeds, the paired task-stratified bootstrap of a difference in mean
  normalized accuracy, Holm's adjustment, minimum detectable differences, packed per-example correctness
  (numpy only; the bench's statistics use it).

``neuromerge evaluate CONFIG --model X`` and ``neuromerge bench --base B --experts E --task-file T --model X`` call
:func:`evaluate`; so does :func:`neuromerge.evaluate`. Names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "run",
    "load_taskset": "run",
    "EvalResults": "run",
    "Row": "run",
    "normalized_accuracy": "run",
    "user_model_config": "run",
    "write_report": "report",
    "ClassifierHead": "heads",
    "EvaluatedModel": "models",
    "open_model": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neuromerge.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuromerge.evaluation.{module}"), name)
