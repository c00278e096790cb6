"""The contract between the benchmark protocol and a suite (a backbone plus a set of tasks).

A suite knows its data, its backbone, how to fine-tune an expert, how to fit a linear probe and how to score a
backbone on a task. The protocol (:mod:`neuromerge.bench.protocol`) knows nothing of models: it trains and
caches experts through the suite, merges their *backbone* state dicts with any registered method
(:func:`neuromerge.functional.merge_state_dicts`), tunes each method's hyper-parameters on the validation splits,
and scores on the test splits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

StateDict = dict[str, torch.Tensor]
SplitName = Literal["train", "val", "test"]
Metric = Literal["accuracy", "perplexity"]


@dataclass
class Split:
    """Inputs (a list of strings, or an ``(N, C, H, W)`` float tensor of images) and integer labels."""

    inputs: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TaskData:
    """One task with fixed, seeded splits. ``in_domain=False`` tasks are kept out of the merge (OOD)."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    in_domain: bool = True
    metric: Metric = "accuracy"
    #: short description of the data source (shown in reports)
    source: str = ""
    #: content hash of the splits (part of the expert cache key); set by the suite
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Budget:
    """Compute budget of a run (``quick`` caps everything so a suite finishes in minutes on 2 cores)."""

    quick: bool = False
    train_steps: int = 200
    batch_size: int = 32
    eval_examples: int = 400  # per task and split (val/test), at most
    probe_steps: int = 100
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Expert:
    """A fine-tuned expert: its backbone state dict (the merged part), its task head (None for LM suites whose
    tasks are scored with label words), its own test score and training metadata."""

    task: str
    backbone: StateDict
    head: StateDict | None
    test_score: float
    meta: dict[str, Any] = field(default_factory=dict)


class Suite(ABC):
    """A benchmark suite. Subclasses are registered in :mod:`neuromerge.bench.suites`."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: expert fine-tuning modes this suite supports; the first is the default for static merges
    modes: ClassVar[tuple[str, ...]] = ("full", "lora")

    @abstractmethod
    def budget(self, quick: bool) -> Budget:
        """The default budget for a normal or ``--quick`` run."""

    @abstractmethod
    def tasks(self, budget: Budget) -> list[TaskData]:
        """Every task (in-domain and out-of-domain) with its fixed seeded splits, subsampled per the budget."""

    @abstractmethod
    def backbone_state(self) -> StateDict:
        """The pre-trained backbone's state dict (the part that is merged)."""

    def merge_exclude(self) -> list[str]:
        """Regexes of backbone tensors that are never merged (kept from the pre-trained backbone)."""
        return []

    def model_type(self) -> str | None:
        """``config.json``'s model_type of the backbone (tensor layouts for neuron-wise methods)."""
        return None

    @abstractmethod
    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        """Fine-tune the backbone (+ a head) on ``task``'s train split; ``test_score`` on its test split."""

    @abstractmethod
    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """A fresh head trained on frozen ``backbone`` features of ``task``'s train split (the "pre-trained +
        heads" row and the out-of-domain probe). None for suites without heads."""

    @abstractmethod
    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        """Score of ``backbone`` + ``head`` on a split (accuracy in [0, 1], or perplexity)."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the task data and the budget that determines an expert (backbone id, versions,
        training hyper-parameters). Part of the expert cache key."""
        return {"suite": self.name}
