"""Encoding of a MERGE configuration: per component a partition of the tasks (+ optional operator and coefficient).

docs/methods/spec.md §2 (MERGE, arXiv 2602.06552), reconstruction step 2: "for each component c a partition ``P_c``
of the tasks, encoded as a label vector canonicalized by first occurrence; optionally an operator and its λ per
component".

A partition of ``T`` tasks is written as a label vector ``l ∈ {0..T-1}^T`` (task t belongs to group ``l[t]``).
Many label vectors describe the same partition (relabelling the groups); the canonical one is the *restricted
growth string* (RGS): groups are numbered in order of first occurrence, so ``l[0] = 0`` and
``l[t] ≤ 1 + max(l[:t])``. Two label vectors describe the same partition iff their RGS are equal, so the RGS is the
key of the evaluation cache. There are Bell(T) partitions (1, 2, 5, 15, 52, 203, 877, 4140 for T = 1..8).

The genotype seen by the optimizer is the flat integer vector
``[l_0 (T genes), …, l_{C-1} (T genes), op_0 … op_{C-1} (if >1 operator), k_0 … k_{C-1} (if >1 coefficient)]``
with bounds ``0 ≤ l ≤ T-1``, ``0 ≤ op < n_operators``, ``0 ≤ k < n_coefficients``; :meth:`SearchSpace.decode`
canonicalizes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ..errors import ConfigError

Labels = tuple[int, ...]


def canonicalize(labels: Sequence[int]) -> Labels:
    """Restricted growth string of a label vector: ``[2, 2, 0, 2, 1] → (0, 0, 1, 0, 2)``.

    Group ids are renumbered by first occurrence; the result describes the same partition and is idempotent
    (``canonicalize(canonicalize(l)) == canonicalize(l)``).
    """
    mapping: dict[int, int] = {}
    return tuple(mapping.setdefault(int(v), len(mapping)) for v in labels)


def groups(labels: Sequence[int]) -> list[list[int]]:
    """The partition as a list of groups of task indices, in canonical order: ``(0, 0, 1) → [[0, 1], [2]]``."""
    out: dict[int, list[int]] = {}
    for task, g in enumerate(canonicalize(labels)):
        out.setdefault(g, []).append(task)
    return list(out.values())


def set_partitions(n: int) -> Iterator[Labels]:
    """All partitions of ``n`` items as restricted growth strings, in lexicographic order (Bell(n) of them)."""

    def extend(prefix: list[int], top: int) -> Iterator[Labels]:
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for g in range(top + 2):
            yield from extend([*prefix, g], max(top, g))

    if n == 0:
        yield ()
    else:
        yield from extend([0], 0)


@cache
def bell(n: int) -> int:
    """Bell number B(n) by the Bell triangle (number of partitions of n items)."""
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for v in row:
            nxt.append(nxt[-1] + v)
        row = nxt
    return row[0]


@dataclass(frozen=True)
class Configuration:
    """One point of the search space: a canonical partition per component, and operator/coefficient indices.

    ``operators[c]`` indexes :attr:`SearchSpace.operators`, ``coefficients[c]`` indexes
    :attr:`SearchSpace.coefficients` (both all zeros when the space offers a single choice).
    """

    partitions: tuple[Labels, ...]
    operators: tuple[int, ...]
    coefficients: tuple[int, ...]

    @property
    def key(self) -> str:
        """Canonical JSON text, the cache key: ``{"p": [[0,0,1], …], "o": […], "k": […]}``."""
        return json.dumps(
            {"p": [list(p) for p in self.partitions], "o": list(self.operators), "k": list(self.coefficients)},
            separators=(",", ":"),
        )

    @classmethod
    def from_key(cls, key: str) -> Configuration:
        d = json.loads(key)
        return cls(tuple(tuple(int(v) for v in p) for p in d["p"]), tuple(d["o"]), tuple(d["k"]))


@dataclass(frozen=True)
class SearchSpace:
    """``C`` components × ``T`` tasks; optional per-component operator (from ``operators``) and coefficient grid.

    ``tasks`` and ``components`` are names (recorded with the search so a resumed or distributed search can check it
    runs the same problem); only their counts enter the encoding.
    """

    tasks: tuple[str, ...]
    components: tuple[str, ...]
    operators: tuple[str, ...] = ("average",)
    coefficients: tuple[float, ...] = (1.0,)
    _bounds: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("tasks", "components", "operators", "coefficients"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.tasks) < 2:
            raise ConfigError(f"a search needs at least 2 tasks, got {len(self.tasks)}")
        if len(self.components) < 1:
            raise ConfigError("a search needs at least 1 component, got 0")
        for name in ("tasks", "components", "operators"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"search space: duplicate {name} names in {list(values)}")
        if not self.operators or not self.coefficients:
            raise ConfigError("search space: `operators` and `coefficients` need at least one value each")
        if not all(math.isfinite(float(v)) for v in self.coefficients):
            raise ConfigError(f"search space: coefficients must be finite, got {list(self.coefficients)}")
        hi = [self.n_tasks - 1] * (self.n_components * self.n_tasks)
        hi += [len(self.operators) - 1] * self.n_components * (len(self.operators) > 1)
        hi += [len(self.coefficients) - 1] * self.n_components * (len(self.coefficients) > 1)
        object.__setattr__(self, "_bounds", np.asarray(hi, dtype=np.int64))

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_var(self) -> int:
        """Length of the genotype."""
        return len(self._bounds)

    @property
    def upper(self) -> np.ndarray:
        """Inclusive upper bound per gene (lower bounds are 0)."""
        return self._bounds.copy()

    @property
    def size(self) -> int:
        """Number of distinct configurations: ``(Bell(T) · n_operators · n_coefficients)^C``."""
        return (bell(self.n_tasks) * len(self.operators) * len(self.coefficients)) ** self.n_components

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "components": list(self.components), "operators": list(self.operators),
                "coefficients": [float(v) for v in self.coefficients]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        return cls(tuple(d["tasks"]), tuple(d["components"]), tuple(d["operators"]), tuple(d["coefficients"]))

    # ---- genotype <-> configuration ----

    def decode(self, x: Sequence[float] | np.ndarray) -> Configuration:
        """Genotype → canonical configuration (genes rounded and clipped to their bounds, partitions → RGS)."""
        g = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, self._bounds).astype(np.int64)
        c, t = self.n_components, self.n_tasks
        parts = tuple(canonicalize(g[i * t:(i + 1) * t]) for i in range(c))
        pos = c * t
        ops: tuple[int, ...] = (0,) * c
        if len(self.operators) > 1:
            ops, pos = tuple(int(v) for v in g[pos:pos + c]), pos + c
        coefs: tuple[int, ...] = (0,) * c
        if len(self.coefficients) > 1:
            coefs = tuple(int(v) for v in g[pos:pos + c])
        return Configuration(parts, ops, coefs)

    def encode(self, config: Configuration) -> np.ndarray:
        """Configuration → genotype (canonical partitions); inverse of :meth:`decode` on canonical genotypes."""
        self.check(config)
        genes: list[int] = [v for p in config.partitions for v in canonicalize(p)]
        if len(self.operators) > 1:
            genes += list(config.operators)
        if len(self.coefficients) > 1:
            genes += list(config.coefficients)
        return np.asarray(genes, dtype=np.int64)

    def canonical(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """Repair a genotype to its canonical form (``encode(decode(x))``)."""
        return self.encode(self.decode(x))

    def check(self, config: Configuration) -> None:
        """Raise :class:`ConfigError` when ``config`` does not belong to this space."""
        c, t = self.n_components, self.n_tasks
        ok = (len(config.partitions) == c and all(len(p) == t for p in config.partitions)
              and len(config.operators) == c and len(config.coefficients) == c
              and all(0 <= o < len(self.operators) for o in config.operators)
              and all(0 <= k < len(self.coefficients) for k in config.coefficients))
        if not ok:
            raise ConfigError(f"configuration {config.key} does not fit a space of {c} components × {t} tasks")

    def all_merged(self) -> Configuration:
        """Every component merges all tasks into one group (labels all 0); first operator and coefficient."""
        zeros = (0,) * self.n_components
        return Configuration(((0,) * self.n_tasks,) * self.n_components, zeros, zeros)

    def static_merges(self) -> list[Configuration]:
        """Every component merging all tasks with one operator and one coefficient, for each (operator,
        coefficient) of the space: the static merges the space contains (the first is :meth:`all_merged`)."""
        ones = (0,) * self.n_tasks
        return [Configuration((ones,) * self.n_components, (o,) * self.n_components, (k,) * self.n_components)
                for o in range(len(self.operators)) for k in range(len(self.coefficients))]

    def all_separate(self) -> Configuration:
        """Every task keeps its own expert in every component (labels ``0..T-1``)."""
        zeros = (0,) * self.n_components
        return Configuration((tuple(range(self.n_tasks)),) * self.n_components, zeros, zeros)

    def random(self, rng: np.random.Generator) -> Configuration:
        """A random configuration: uniform labels per gene, then canonicalized (not uniform over partitions)."""
        return self.decode(rng.integers(0, self._bounds + 1))

    # ---- surrogate features ----

    def features(self, configs: Sequence[Configuration]) -> np.ndarray:
        """Surrogate features, shape ``(n, C · T(T-1)/2 + C · n_ops + C · n_coefs)`` (the last two only when > 1).

        Per component the co-membership indicators ``[l_i == l_j]`` for task pairs ``i < j`` (invariant to how the
        groups are numbered, so equal partitions give equal features), then one-hot operator and coefficient
        indices per component.
        """
        t = self.n_tasks
        iu, ju = np.triu_indices(t, k=1)
        rows = []
        for cfg in configs:
            labels = np.asarray(cfg.partitions, dtype=np.int64)  # (C, T)
            parts = [(labels[:, iu] == labels[:, ju]).astype(np.float32).ravel()]
            for idx, n in ((cfg.operators, len(self.operators)), (cfg.coefficients, len(self.coefficients))):
                if n > 1:
                    parts.append(np.eye(n, dtype=np.float32)[list(idx)].ravel())
            rows.append(np.concatenate(parts))
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
