"""Text data loaders and splits: deterministic, stratified, disjoint, cleaned, capped, fingerprinted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from neuromerge.bench import data
from neuromerge.errors import ConfigError, TaskError


def _toy(n_per_class: tuple[int, ...] = (50, 30, 20)) -> tuple[list[str], list[int], list[str]]:
    texts, labels = [], []
    for c, n in enumerate(n_per_class):
        texts += [f"class {c} example {i}" for i in range(n)]
        labels += [c] * n
    return texts, labels, [f"c{c}" for c in range(len(n_per_class))]


def _all(td):
    return [td.train, td.val, td.test]


def test_splits_are_deterministic_and_seed_dependent():
    texts, labels, classes = _toy()
    a = data.make_splits("toy", texts, labels, classes, seed=0, sizes=None)
    b = data.make_splits("toy", texts, labels, classes, seed=0, sizes=None)
    c = data.make_splits("toy", texts, labels, classes, seed=1, sizes=None)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert [s.inputs for s in _all(a)] == [s.inputs for s in _all(b)]
    assert a.train.inputs != c.train.inputs and a.fingerprint != c.fingerprint


def test_splits_are_disjoint_complete_and_stratified():
    texts, labels, classes = _toy((50, 30, 20))
    td = data.make_splits("toy", texts, labels, classes, seed=3, sizes=None)
    sets = [set(s.inputs) for s in _all(td)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(texts)
    # 60 / 20 / 20 % of each class (rounded), computed independently here
    for split, frac in zip(_all(td), (0.6, 0.2, 0.2), strict=True):
        counts = Counter(split.labels.tolist())
        for c, n in enumerate((50, 30, 20)):
            assert abs(counts[c] - frac * n) <= 1
    # labels follow their texts
    for split in _all(td):
        for t, y in zip(split.inputs, split.labels.tolist(), strict=True):
            assert t.startswith(f"class {y} ")


def test_caps_are_stratified_nested_and_exact():
    texts, labels, classes = _toy((300, 100, 50))
    full = data.make_splits("toy", texts, labels, classes, seed=0, sizes=None)
    small = data.make_splits("toy", texts, labels, classes, seed=0, sizes=(90, 20, None))
    assert (len(small.train), len(small.val), len(small.test)) == (90, 20, len(full.test))
    counts = Counter(small.train.labels.tolist())
    assert counts == Counter({0: 60, 1: 20, 2: 10})  # 300:100:50 = 6:2:1
    assert set(small.train.inputs) <= set(full.train.inputs)
    assert small.fingerprint != full.fingerprint


def test_stratified_cap_keeps_every_class_and_the_total():
    assert data.stratified_cap([90, 9, 1], 10) == [8, 1, 1]
    assert sum(data.stratified_cap([5, 5, 5], 7)) == 7
    assert data.stratified_cap([3, 4], 100) == [3, 4]
    keep = data.stratified_cap([1000, 1, 1, 1], 3)
    assert sum(keep) == 3


def test_cleaning_drops_empty_nan_and_conflicting_duplicates():
    texts = ["a", " a ", "b", "", None, float("nan"), "c", "c", "d"]
    labels = [0, 0, 1, 0, 1, 0, 0, 1, 1]
    t, y = data.clean_texts(texts, labels)
    assert t == ["a", "b", "d"] and y == [0, 1, 1]  # "c" has two labels: dropped


def test_too_small_class_and_bad_labels_raise():
    with pytest.raises(TaskError, match="fewer than 3"):
        data.make_splits("toy", ["a", "b", "c", "d"], [0, 0, 0, 1], ["x", "y"], seed=0, sizes=None)
    with pytest.raises(TaskError, match="outside"):
        data.make_splits("toy", ["a"], [5], ["x", "y"], seed=0, sizes=None)


def test_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown text dataset 'nope'"):
        data.raw_text_dataset("nope")


@pytest.mark.parametrize("name,n_classes", [("sentiment", 2), ("subjectivity", 2), ("bbc_topic", 5),
                                            ("debate_party", 2), ("chatter_topic", 6), ("language_id", 9)])
def test_packaged_datasets(name, n_classes):
    texts, labels, classes = data.raw_text_dataset(name)
    assert len(classes) == n_classes and len(texts) == len(labels)
    counts = Counter(labels)
    assert sorted(counts) == list(range(n_classes))
    td = data.make_splits(name, texts, labels, classes, seed=0, sizes=(64, 32, 32))
    assert len(td.train) == 64 and len(td.val) == 32 and len(td.test) == 32
    assert td.train.labels.dtype == torch.long
    assert all(isinstance(t, str) and t.strip() == t and t for t in td.train.inputs)


def test_dataset_specific_rules():
    _, labels, classes = data.raw_text_dataset("subjectivity")
    c = Counter(labels)
    assert c[0] == c[1]  # reviews balanced down to the plot count
    texts, labels, classes = data.raw_text_dataset("debate_party")
    assert classes == ["democrat", "republican"] and len(texts) == 348 + 454  # moderators dropped
    _, _, topics = data.raw_text_dataset("chatter_topic")
    assert "tech_support" not in topics and "trivia" in topics
