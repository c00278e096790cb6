"""Toy search problems (module-level, importable by worker processes): cheap deterministic objectives."""

from __future__ import annotations

import itertools
import time

import numpy as np

from neuromerge.search import Configuration, SearchProblem, SearchSpace, set_partitions
from neuromerge.search.problem import Evaluate

BYTES_PER_MODULE = 1000
# affinity[c][i][j] > 0: merging tasks i and j in component c helps; < 0: it hurts
AFFINITY = np.random.default_rng(1234).normal(0.0, 1.0, size=(8, 8, 8))


def toy_space(n_tasks: int = 3, n_components: int = 4) -> SearchSpace:
    return SearchSpace(tuple(f"t{i}" for i in range(n_tasks)), tuple(f"c{i}" for i in range(n_components)))


def toy_score(config: Configuration) -> float:
    """Mean over components of a pairwise affinity score of the merged task pairs, squashed to (0, 1)."""
    total = 0.0
    for c, labels in enumerate(config.partitions):
        for i, j in itertools.combinations(range(len(labels)), 2):
            if labels[i] == labels[j]:
                total += AFFINITY[c % 8, i, j] - 0.5
    return float(1.0 / (1.0 + np.exp(-total / len(config.partitions))))


def toy_storage(config: Configuration) -> int:
    """One module per group per component."""
    return BYTES_PER_MODULE * sum(len(set(p)) for p in config.partitions)


def slow_toy_score(config: Configuration) -> float:
    """``toy_score`` after a short sleep (so that both workers of the distributed test get work)."""
    time.sleep(0.05)
    return toy_score(config)


def toy_problem(n_tasks: int = 3, n_components: int = 4, evaluate: Evaluate | None = toy_score) -> SearchProblem:
    return SearchProblem(toy_space(n_tasks, n_components), evaluate, toy_storage, fingerprint="toy-v1")


def all_configurations(space: SearchSpace) -> list[Configuration]:
    """Every configuration of a small single-operator space."""
    zeros = (0,) * space.n_components
    parts = list(set_partitions(space.n_tasks))
    return [Configuration(tuple(p), zeros, zeros) for p in itertools.product(parts, repeat=space.n_components)]


def failing_toy_score(config: Configuration) -> float:
    """``toy_score``, but the all-separate configuration (always in the initial population) raises."""
    if all(len(set(p)) == len(p) for p in config.partitions):
        raise ValueError("toy evaluation failed on purpose")
    return toy_score(config)
