"""Per-example results (:class:`ExampleScores`) and the contract's default per-example evaluation of a module:
split order whatever the batch order, score = the mean, formulas on hand-made data."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from neuromerge.errors import TaskError
from neuromerge.tasks.contract import Batch, Budget, ExampleScores, Split, Suite, TaskData, scatter_rows


def test_accuracy_score_is_the_exact_fraction_and_subsets_resample() -> None:
    s = ExampleScores("accuracy", correct=torch.tensor([1, 0, 1, 1, 0, 1, 1]))
    assert s.correct is not None and s.correct.dtype == torch.bool and len(s) == 7
    assert s.score == 5 / 7  # exact (a Python float of the count), not a float32 mean
    assert s.subset([0, 0, 1]).score == 2 / 3
    assert s.subset(torch.tensor([4, 1])).score == 0.0
    assert s.to_list() == [True, False, True, True, False, True, True]
    assert math.isnan(ExampleScores("accuracy", correct=torch.zeros(0, dtype=torch.bool)).score)


def test_perplexity_score_is_the_token_micro_average() -> None:
    nll = torch.tensor([2.0, 9.0, 0.5], dtype=torch.float64)
    tokens = torch.tensor([4, 6, 1])
    s = ExampleScores("perplexity", nll=nll, tokens=tokens)
    assert s.score == pytest.approx(math.exp(11.5 / 11))
    assert s.subset([1, 1]).score == pytest.approx(math.exp(18 / 12))
    assert s.to_list() == [[2.0, 4], [9.0, 6], [0.5, 1]]


def test_bad_example_scores_are_one_clear_error() -> None:
    with pytest.raises(TaskError, match="correctness"):
        ExampleScores("accuracy")
    with pytest.raises(TaskError, match="nll"):
        ExampleScores("perplexity", nll=torch.zeros(3), tokens=torch.zeros(2))
    with pytest.raises(TaskError, match="metric"):
        ExampleScores("f1", correct=torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="exactly once"):
        scatter_rows([(torch.ones(2), torch.tensor([0, 0]))])


class _Shuffled(Suite):
    """Backbone = a linear map; batches of 3 in a scrambled order (like length-grouped batches)."""

    name: ClassVar[str] = "shuffled"
    description: ClassVar[str] = "test suite"

    def budget(self, quick: bool) -> Budget:
        return Budget(eval_examples=100)

    def tasks(self, budget: Budget) -> list[TaskData]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(11, 4, generator=g)
        y = torch.randint(0, 3, (11,), generator=g)
        empty = Split(x[:0], y[:0])
        return [TaskData("t", ["a", "b", "c"], empty, empty, Split(x, y))]

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(3, 4, generator=torch.Generator().manual_seed(1))}

    def train_expert(self, *a: Any) -> Any:
        raise NotImplementedError

    def fit_probe(self, *a: Any) -> None:
        return None

    def evaluate(self, backbone: Any, head: Any, task: TaskData, split: Any, budget: Budget) -> float:
        return self.evaluate_module(self.module(backbone), head, task, split, budget)

    def module(self, backbone: dict[str, torch.Tensor]) -> nn.Module:
        m = nn.Linear(4, 3, bias=False)
        m.load_state_dict(backbone)
        return m.eval()

    def batches(self, task: TaskData, split: Any, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        data = getattr(task, split)
        order = torch.tensor([7, 2, 9, 0, 10, 4, 1, 8, 3, 6, 5])[: limit or len(data)]
        return [Batch({"input": data.inputs[i]}, data.labels[i], None, i) for i in order.split(3)]

    def logits(self, module: nn.Module, head: Any, task: TaskData, batch: Batch) -> torch.Tensor:
        return module(batch.inputs["input"])


def test_default_per_example_evaluation_is_in_split_order() -> None:
    suite = _Shuffled()
    budget = suite.budget(False)
    task = suite.tasks(budget)[0]
    state = suite.backbone_state()
    got = suite.evaluate_examples(state, None, task, "test", budget)
    expected = (task.test.inputs @ state["weight"].T).argmax(-1) == task.test.labels  # direct formula
    assert got.correct is not None and torch.equal(got.correct, expected)
    assert 0 < int(expected.sum()) < len(expected)  # some right, some wrong: the order matters
    assert suite.evaluate(state, None, task, "test", budget) == int(expected.sum()) / len(expected)
    module = suite.module(state).train()
    assert torch.equal(suite.evaluate_module_examples(module, None, task, "test", budget).correct, expected)
    assert module.training  # the training flag is restored
