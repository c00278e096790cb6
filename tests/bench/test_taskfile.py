"""User task files: loading CSV / JSONL / .npz tasks and every documented error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from neuromerge.bench.taskfile import load_task_file, map_labels, read_entries
from neuromerge.errors import ConfigError, TaskError
from neuromerge.tasks.contract import Budget

BUDGET = Budget(quick=True, eval_examples=10, extra={"train_examples": 30, "val_examples": 8})


def _yaml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "tasks.yaml"
    p.write_text(body)
    return p


def _csv(tmp_path: Path, rows: list[tuple[str, str]], name: str = "d.csv", header: str = "text,label") -> Path:
    p = tmp_path / name
    p.write_text(header + "\n" + "\n".join(f'"{t}",{y}' for t, y in rows) + "\n")
    return p


def _rows(labels: list[str]) -> list[tuple[str, str]]:
    return [(f"example number {i} about {y}", y) for i, y in enumerate(labels)]


def test_csv_with_string_labels(tmp_path):
    _csv(tmp_path, _rows(["spam", "ham", "eggs"] * 10))
    f = _yaml(tmp_path, "tasks:\n  - {name: mine, suite: text, file: d.csv}\n")
    [task] = load_task_file(f, "text", BUDGET)
    assert task.classes == ["eggs", "ham", "spam"]  # alphabetical
    assert task.in_domain and len(task.train) + len(task.val) + len(task.test) == 30
    for split in (task.train, task.val, task.test):
        for text, y in zip(split.inputs, split.labels.tolist(), strict=True):
            assert text.endswith(task.classes[y])
    assert len(task.val) <= 8 and len(task.test) <= 10 and len(task.fingerprint) == 64


def test_jsonl_with_integer_labels_and_custom_columns(tmp_path):
    lines = [json.dumps({"body": f"text {i}", "y": [5, 0, 2][i % 3]}) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    f = _yaml(tmp_path, "tasks:\n  - name: ints\n    suite: llm\n    file: d.jsonl\n    text_column: body\n"
                        "    label_column: y\n    in_domain: false\n")
    [task] = load_task_file(f, "llm", BUDGET)
    assert task.classes == ["0", "2", "5"] and not task.in_domain
    assert Counter(task.train.labels.tolist()) == Counter({0: 6, 1: 6, 2: 6})


def test_declared_classes_order_and_index_labels(tmp_path):
    _csv(tmp_path, _rows(["pos", "neg", "1"] * 5))
    f = _yaml(tmp_path, "tasks:\n  - {name: c, suite: text, file: d.csv, classes: [neg, pos]}\n")
    [task] = load_task_file(f, "text", BUDGET)
    assert task.classes == ["neg", "pos"]
    assert Counter(torch.cat([task.train.labels, task.val.labels, task.test.labels]).tolist()) == {1: 10, 0: 5}


def test_entries_for_other_suites_are_skipped(tmp_path):
    _csv(tmp_path, _rows(["a", "b"] * 6))
    f = _yaml(tmp_path, "tasks:\n  - {name: t1, suite: text, file: d.csv}\n"
                        "  - {name: v1, suite: vision, file: x.npz}\n")
    assert [t.name for t in load_task_file(f, "text", BUDGET)] == ["t1"]


def test_npz_images(tmp_path):
    g = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", x=g.integers(0, 255, (24, 28, 28), dtype=np.uint8), y=np.repeat([3, 7], 12))
    f = _yaml(tmp_path, "tasks:\n  - {name: im, suite: vision, file: imgs.npz}\n")
    [task] = load_task_file(f, "vision", BUDGET)
    assert task.classes == ["3", "7"] and task.train.inputs.dtype == torch.float32
    assert task.train.inputs.shape[0] == len(task.train) and float(task.train.inputs.max()) <= 1.0
    assert len(task.train) + len(task.val) + len(task.test) == 24


@pytest.mark.parametrize("body,files,message", [
    ("tasks: [{name: a, suite: text, file: d.csv, label_column: category}]", "csv", "no column 'category'"),
    ("tasks: [{name: a, suite: text, file: d.csv, classes: [x, y, z]}]", "csv", "'z' have no examples"),
    ("tasks: [{name: a, suite: text, file: d.csv}]", "csv_float", "non-integer number"),
    ("tasks: [{name: a, suite: text, file: d.csv}]", "csv_missing_label", "row 2: missing label"),
    ("tasks: [{name: a, suite: text, file: d.csv}]", "csv_one_class", "only one class"),
    ("tasks: [{name: a, suite: text, file: d.csv}]", "csv_tiny_class", "fewer than 3 examples"),
    ("tasks: [{name: a, suite: vision, file: s.npz}]", "npz_strings", "labels y must be integer numbers"),
    ("tasks: [{name: a, suite: vision, file: d.csv}]", "csv", "takes .npz files"),
    ("tasks: [{name: a, suite: txt, file: d.csv}]", "csv", "unknown suite 'txt'"),
    ("tasks: [{name: a, suite: text, file: nothere.csv}]", "csv", "does not exist"),
    ("tasks: [{name: a, suite: text, file: d.csv, colour: red}]", "csv", "colour"),
    ("tasks: [{suite: text, file: d.csv}]", "csv", "name"),
    ("tasks: [{name: a, suite: text, file: d.csv}, {name: a, suite: text, file: d.csv}]", "csv", "used twice"),
    ("tasks: [{name: sentiment, suite: text, file: d.csv}]", "csv", "already a task"),
    ("tasks: []", "csv", "non-empty list"),
    ("tasks: [unclosed", "csv", "not valid YAML"),
])
def test_errors(tmp_path, body, files, message):
    if files == "csv":
        _csv(tmp_path, _rows(["x", "y"] * 6))
    elif files == "csv_float":
        _csv(tmp_path, _rows(["0.5", "1"] * 6))
    elif files == "csv_missing_label":
        _csv(tmp_path, [("first", "1"), ("second", ""), ("third", "0")])
    elif files == "csv_one_class":
        _csv(tmp_path, _rows(["x"] * 6))
    elif files == "csv_tiny_class":
        _csv(tmp_path, _rows(["x"] * 6 + ["y"] * 2))
    elif files == "npz_strings":
        np.savez(tmp_path / "s.npz", x=np.zeros((6, 8, 8)), y=np.array(["a", "b"] * 3))
    f = _yaml(tmp_path, body)
    suite = "vision" if "vision" in body else "text"
    with pytest.raises(ConfigError, match=message) as info:
        load_task_file(f, suite, BUDGET, reserved=["sentiment"])
    assert isinstance(info.value, TaskError) and "\n" not in str(info.value)
    assert str(f) in str(info.value)


def test_missing_file_and_label_mapping_rules(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        read_entries(tmp_path / "none.yaml")
    assert map_labels([1, 3.0, "3", " 1 "]) == ([0, 1, 1, 0], ["1", "3"])
    assert map_labels(["b", "a", 1]) == ([2, 1, 0], ["1", "a", "b"])  # mixed: all treated as strings
    assert map_labels([True, False, True]) == ([1, 0, 1], ["False", "True"])
    with pytest.raises(TaskError, match="not one of the declared classes"):
        map_labels(["a", "c"], ["a", "b"])
