"""MERGE on any implementation of the tasks contract: the two objectives of the search and the representative table.

docs/methods/spec.md §2 (MERGE, arXiv 2602.06552), reconstruction step 4:

- ``f1 = evaluate(config)`` = mean over the in-domain tasks of the normalized validation accuracy
  ``100 · acc_val(chain_t, head_t) / acc_val(expert_t, head_t)``, where task ``t`` runs its chain
  (:meth:`neuromerge.routing.recombination.Library.chain`) with its expert's head through ``suite.evaluate``
  (the vision suite re-estimates BatchNorm statistics there, per task and chain);
- ``f2 = storage(config)`` = exact bytes of the configuration's library file.

Components come from the suite's backbone names (:func:`neuromerge.routing.components.component_map` with
``suite.model_type()``); the suite's ``merge_exclude()`` tensors are kept from the base in merged groups, as for the
static merges. Encoded modules are memoized across configurations (bounded LRU), the experts' validation
accuracies once.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TaskError
from ..routing.components import component_map, components
from ..routing.recombination import DEFAULT_PERCENTILE, Configuration, Library, build_library
from ..tasks.contract import Budget, Expert, StateDict, Suite, TaskData, TaskSet


class _LRU(OrderedDict):
    """A bounded mapping (least recently used entries dropped), usable as :func:`build_library`'s cache."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class MergeProblem:
    """The MERGE search problem on a contract object (a bench suite or a user's model folder: any
    :class:`~neuromerge.tasks.Suite`): ``space``, ``evaluate(config) -> float``, ``storage(config) -> int``.
    :meth:`from_taskset` builds it from a :class:`~neuromerge.tasks.TaskSet`.

    ``experts``: one per in-domain task (a list aligned with ``tasks``' in-domain tasks, or ``{task name:
    Expert}``); out-of-domain tasks are ignored. ``ops`` / ``coefficients``: the operator and λ choices per
    component (one each = a fixed operator); ``op_params``: extra parameters per operator. ``val_limit`` caps the
    validation examples per task (``budget.eval_examples`` otherwise). ``quantize`` / ``percentile``: the library's
    8-bit storage. ``cache_size``: encoded modules kept across configurations.
    """

    def __init__(self, suite: Suite, base: StateDict, experts: Sequence[Expert] | Mapping[str, Expert],
                 tasks: Sequence[TaskData], budget: Budget, *, ops: Sequence[str] = ("task_arithmetic",),
                 coefficients: Sequence[float] = (0.3,), op_params: Mapping[str, Mapping[str, Any]] | None = None,
                 val_limit: int | None = None, quantize: bool = True, percentile: float = DEFAULT_PERCENTILE,
                 component_overrides: Mapping[str, str] | None = None, cache_size: int = 256) -> None:
        self.suite = suite
        self.base = base
        self.tasks = [t for t in tasks if t.in_domain]
        if len(self.tasks) < 2:
            raise TaskError(f"MERGE needs at least 2 in-domain tasks, got {len(self.tasks)}")
        if isinstance(experts, Mapping):
            missing = [t.name for t in self.tasks if t.name not in experts]
            if missing:
                raise TaskError(f"no expert for tasks {missing}")
            self.experts = [experts[t.name] for t in self.tasks]
        else:
            self.experts = list(experts)
            if len(self.experts) != len(self.tasks):
                raise TaskError(f"{len(self.experts)} experts for {len(self.tasks)} in-domain tasks")
        self.suite_budget = budget  # the suite's own budget: test scores, router training
        self.budget = budget if val_limit is None else dataclasses.replace(budget, eval_examples=int(val_limit))
        self.ops = tuple(ops)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.op_params = dict(op_params or {})
        self.quantize, self.percentile = quantize, percentile
        self.component_of = component_map(base, suite.model_type(), component_overrides)
        self.components = components(self.component_of)
        self._cache: _LRU = _LRU(cache_size)
        self._libraries: _LRU = _LRU(2)
        self._expert_val: list[float] | None = None
        self.evaluations = 0

    @classmethod
    def from_taskset(cls, ts: TaskSet, **kwargs: Any) -> MergeProblem:
        """The problem over ``ts``'s suite, base, in-domain tasks, experts and budget (``kwargs``: the operators,
        coefficients and library options of :meth:`__init__`)."""
        return cls(ts.suite, ts.base, ts.experts, ts.tasks, ts.budget, **kwargs)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def space(self) -> Any:
        """The :class:`neuromerge.search.SearchSpace` of this problem."""
        from ..search.encoding import SearchSpace

        return SearchSpace(tuple(self.task_names), tuple(self.components), self.ops, self.coefficients)

    def configuration(self, config: Any) -> Configuration:
        """A search configuration (indices) as a :class:`~neuromerge.routing.recombination.Configuration`."""
        return config if isinstance(config, Configuration) else Configuration.from_search(self.space, config)

    def library(self, config: Any) -> Library:
        """The library of ``config`` (the last two are memoized)."""
        cfg = self.configuration(config)
        key = repr(cfg.to_dict())
        lib = self._libraries.get(key)
        if lib is None:
            lib = build_library(self.base, [e.backbone for e in self.experts], self.component_of, cfg, self.op_params,
                                tasks=self.task_names, quantize=self.quantize, percentile=self.percentile,
                                exclude=self.suite.merge_exclude(), model_type=self.suite.model_type(),
                                cache=self._cache)
            self._libraries[key] = lib
        return lib

    def expert_val(self) -> list[float]:
        """Validation accuracy of each expert on its task (computed once)."""
        if self._expert_val is None:
            self._expert_val = [self.suite.evaluate(e.backbone, e.head, t, "val", self.budget)
                                for e, t in zip(self.experts, self.tasks, strict=True)]
            bad = [t.name for t, a in zip(self.tasks, self._expert_val, strict=True) if a <= 0]
            if bad:
                raise TaskError(f"experts with zero validation accuracy cannot normalize: {bad}")
        return self._expert_val

    def measure_expert_tests(self) -> list[float]:
        """Each expert's *test* accuracy on its task with its own head or probe (``suite.evaluate`` under the
        suite's budget), measured for the experts that come without one (``test_score`` NaN: a user's model,
        :func:`~neuromerge.tasks.hf.open_user_model`) and stored in their :class:`~neuromerge.tasks.Expert`;
        :meth:`test_score` normalizes by these. Returns every expert's test score."""
        for i, (e, t) in enumerate(zip(self.experts, self.tasks, strict=True)):
            if math.isnan(e.test_score):
                score = float(self.suite.evaluate(e.backbone, e.head, t, "test", self.suite_budget))
                self.experts[i] = dataclasses.replace(e, test_score=score)
        bad = [t.name for t, e in zip(self.tasks, self.experts, strict=True) if e.test_score <= 0]
        if bad:
            raise TaskError(f"experts with zero test accuracy cannot normalize the test scores: {bad}")
        return [e.test_score for e in self.experts]

    def task_scores(self, config: Any) -> list[float]:
        """Normalized validation accuracy ``100 · acc(chain_t) / acc(expert_t)`` per in-domain task."""
        lib = self.library(config)
        ref = self.expert_val()
        out = []
        for i, (e, t) in enumerate(zip(self.experts, self.tasks, strict=True)):
            acc = self.suite.evaluate(lib.chain(i), e.head, t, "val", self.budget)
            out.append(100.0 * acc / ref[i])
        lib.clear_cache()  # keep only the int8 modules between configurations
        return out

    def test_score(self, config: Any) -> float:
        """Mean normalized *test* accuracy ``100 · acc_test(chain_t) / acc_test(expert_t)`` under the suite's budget
        (the bench's metric), for comparing search points with the bench's rows. Not an objective."""
        lib = self.library(config)
        scores = [100.0 * self.suite.evaluate(lib.chain(i), e.head, t, "test", self.suite_budget) / e.test_score
                  for i, (e, t) in enumerate(zip(self.experts, self.tasks, strict=True))]
        lib.clear_cache()
        return sum(scores) / len(scores)

    def evaluate(self, config: Any) -> float:
        """``f1``: mean normalized validation accuracy (maximize)."""
        self.evaluations += 1
        scores = self.task_scores(config)
        return sum(scores) / len(scores)

    def storage(self, config: Any) -> int:
        """``f2``: exact bytes of the configuration's library file (minimize)."""
        return self.library(config).storage_bytes()


# -------------------------------------------------------------------------------- representative points


#: storage within this fraction of the smallest counts as "the smallest" for the low-storage point (libraries of
#: the same modules differ by a few header bytes)
LOW_STORAGE_TOLERANCE = 0.01


def representative_points(archive: Sequence[Any]) -> dict[str, Any]:
    """Three points of a front (objects with ``f1`` score, ``f2`` bytes): ``high accuracy`` (best f1, then fewest
    bytes), ``low storage`` (best f1 among the points within :data:`LOW_STORAGE_TOLERANCE` of the fewest bytes)
    and ``mid`` (the non-dominated point whose bytes are closest to the middle of the two, ties → better f1).
    Dominated points are ignored."""
    if not archive:
        raise TaskError("representative points of an empty archive")
    front = [e for e in archive if not any(o.f1 >= e.f1 and o.f2 <= e.f2 and (o.f1 > e.f1 or o.f2 < e.f2)
                                           for o in archive)]
    high = min(front, key=lambda e: (-e.f1, e.f2))
    smallest = min(e.f2 for e in front)
    low = min((e for e in front if e.f2 <= smallest * (1 + LOW_STORAGE_TOLERANCE)), key=lambda e: (-e.f1, e.f2))
    middle = (high.f2 + low.f2) / 2
    mid = min(front, key=lambda e: (abs(e.f2 - middle), -e.f1))
    return {"high accuracy": high, "mid": mid, "low storage": low}


def static_labels(problem: MergeProblem) -> list[tuple[str, Any]]:
    """``(label, configuration)`` of every static merge of the space (all merged with one operator and one λ),
    labelled ``static <op>`` (``static <op> λ<v>`` when the space has several coefficients)."""
    space = problem.space
    many = len(problem.coefficients) > 1
    out = []
    for cfg in space.static_merges():
        op = problem.ops[cfg.operators[0]]
        lam = problem.coefficients[cfg.coefficients[0]]
        out.append((f"static {op}" + (f" λ{lam:g}" if many and op != "linear" else ""), cfg))
    return list(dict(out).items())  # averaging has no λ: one entry


def representative_table(problem: MergeProblem, archive: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows ``{"row", "score", "bytes", "backbones", "config"}``: the three representative points of ``archive``,
    then the static merges (:func:`static_labels`: 1 backbone stored each) and "all separate" (T backbones).
    ``backbones`` = bytes / bytes of the first static merge."""
    statics = [*static_labels(problem), ("all separate", problem.space.all_separate())]
    one = problem.storage(statics[0][1])
    rows = [{"row": name, "score": float(e.f1), "bytes": int(e.f2), "backbones": e.f2 / one,
             "config": getattr(e.config, "key", str(e.config))} for name, e in representative_points(archive).items()]
    for name, cfg in statics:
        b = problem.storage(cfg)
        rows.append({"row": name, "score": problem.evaluate(cfg), "bytes": b, "backbones": b / one, "config": cfg.key})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of :func:`representative_table` rows."""
    test = all("test_score" in r for r in rows)
    lines = [f"{'row':<24} {'val score':>9} {'MB':>10} {'backbones':>10}" + (f" {'test score':>10}" if test else "")]
    lines += [f"{r['row']:<24} {r['score']:9.2f} {r['bytes'] / 1e6:10.2f} {r['backbones']:10.2f}"
              + (f" {r['test_score']:10.2f}" if test else "") for r in rows]
    return "\n".join(lines)
