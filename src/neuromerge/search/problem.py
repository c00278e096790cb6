"""The search problem handed in by the caller (space + objectives) and the search settings, validated.

Objectives (docs/methods/spec.md §2, reconstruction step 4): ``f1 = evaluate(config)`` — an accuracy-like score to
maximize (expensive; e.g. mean normalized validation accuracy) — and ``f2 = storage(config)`` — stored bytes of
the module library, to minimize (cheap). The search package knows nothing about models: both are callables.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError, NeuromergeError
from .encoding import Configuration, SearchSpace

Evaluate = Callable[[Configuration], float]
Storage = Callable[[Configuration], int]

MAX_POPULATION = 1000
MAX_BUDGET = 1_000_000


class SearchError(NeuromergeError):
    """A search cannot go on: evaluate returned a non-finite score, a worker failed, the database is unreachable…"""


@dataclass(frozen=True)
class SearchSettings:
    """Settings of a surrogate-assisted NSGA-II search (defaults from docs/methods/spec.md §2: population 20,
    300 evaluations).

    * ``budget`` — exact evaluations per seed (the initial population included); each seed's search stops there.
    * ``pop_size`` — NSGA-II population, also the number of exact evaluations per generation.
    * ``seeds`` — independent runs (the paper reports 5); they share the evaluation cache.
    * ``pool_factor`` — offspring proposed per generation = ``pool_factor · pop_size``; the surrogate keeps the
      ``pop_size`` best-predicted of them.
    * ``n_trees`` — trees of the random-forest surrogate.
    * ``storage_ref`` — hypervolume reference for f2 in bytes (default ``1.05 · storage(all separate)``);
      ``score_ref`` — hypervolume reference for f1 (default 0).
    * ``max_stale`` — stop early after this many consecutive generations that propose no new configuration
      (a small space is exhausted).
    """

    budget: int = 300
    pop_size: int = 20
    seeds: tuple[int, ...] = (0,)
    pool_factor: int = 5
    n_trees: int = 100
    storage_ref: int | None = None
    score_ref: float = 0.0
    max_stale: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        _int_range("pop_size", self.pop_size, 4, MAX_POPULATION)
        _int_range("budget", self.budget, self.pop_size, MAX_BUDGET, low_name="pop_size")
        _int_range("pool_factor", self.pool_factor, 1, 100)
        _int_range("n_trees", self.n_trees, 1, 10_000)
        _int_range("max_stale", self.max_stale, 1, 10_000)
        if not self.seeds:
            raise ConfigError("search: `seeds` needs at least one seed")
        for s in self.seeds:
            _int_range("seed", s, 0, 2**32 - 1)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"search: duplicate seeds in {list(self.seeds)}")
        if self.storage_ref is not None:
            _int_range("storage_ref", self.storage_ref, 1, 2**63 - 1)
        if not isinstance(self.score_ref, int | float) or not math.isfinite(self.score_ref):
            raise ConfigError(f"search: `score_ref` must be a finite number, got {self.score_ref!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSettings:
        return cls(**{**d, "seeds": tuple(d["seeds"])})


def _int_range(name: str, value: Any, low: int, high: int, low_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"search: `{name}` must be an integer, got {value!r}")
    if not low <= value <= high:
        lo = f"{low_name} = {low}" if low_name else str(low)
        raise ConfigError(f"search: `{name}` = {value} is out of range [{lo}, {high}]")


@dataclass(frozen=True)
class SearchProblem:
    """What to search: the space, the two objectives and a fingerprint of the models behind them.

    ``fingerprint`` identifies the models/data the objectives are computed on (e.g. a hash of the base and expert
    checkpoints); a resumed or distributed search refuses a run folder or study recorded with another one.
    ``evaluate`` may be ``None`` for a coordinator whose workers evaluate (``storage_url`` given).
    """

    space: SearchSpace
    evaluate: Evaluate | None
    storage: Storage
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not callable(self.storage):
            raise ConfigError("search: `storage` must be a callable config -> bytes")
        if self.evaluate is not None and not callable(self.evaluate):
            raise ConfigError("search: `evaluate` must be a callable config -> score")

    def score(self, config: Configuration) -> float:
        """``f1`` of one configuration, checked finite."""
        if self.evaluate is None:
            raise SearchError("search: no `evaluate` callable given (needed without `storage_url`)")
        return finite_score(self.evaluate(config), config)

    def bytes(self, config: Configuration) -> int:
        """``f2`` of one configuration, checked non-negative integer."""
        value = self.storage(config)
        try:
            out = operator.index(value) if not isinstance(value, bool) else -1
        except TypeError:
            out = -1
        if out < 0:
            raise SearchError(f"search: storage() returned {value!r} for {config.key}; expected bytes (int >= 0)")
        return out


def finite_score(value: Any, config: Configuration) -> float:
    """``float(value)``, or :class:`SearchError` when it is not a finite number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise SearchError(f"search: evaluate() returned {value!r} for {config.key}; expected a finite number")
    return out
