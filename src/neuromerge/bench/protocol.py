"""The evaluation protocol (issue #3 §3), independent of any model: it talks to a :class:`~.suite.Suite`.

1. **Experts**: one per in-domain task, fine-tuned by the suite (``full`` by default), cached in the user cache
   (:mod:`.cache`) under a hash of the suite fingerprint (backbone, versions, training hyper-parameters), the
   task fingerprint (split contents), the budget, the mode and the seed. Their own test accuracy is the
   denominator of normalized accuracy.
2. **Baseline rows**: "pretrained + heads" (a linear probe per task on frozen pre-trained features, cached the
   same way) and "individual experts" (each expert on its own task).
3. **Methods**: for each method, every point of its grid (:mod:`.grids`) merges the experts' backbones
   (:func:`neuromerge.functional.merge_state_dicts`, the suite's excluded tensors kept from the base) and is
   scored by the **mean validation accuracy over the in-domain tasks, each task using its own expert's head**;
   the best point (first in grid order on ties) is chosen and scored on the test splits. Nothing is tuned on
   test labels. Per task: test accuracy and normalized accuracy ``100 · acc_merged(t) / acc_expert(t)``; their
   means; out-of-domain score = a fresh probe trained on the OOD task's train split over frozen merged
   features, scored on its test split. Beside each tuned row, a row ``"<method> (paper default)"`` scores the
   method once at its paper defaults, without validation (:data:`.grids.PAPER_DEFAULTS`; normal budget).
   Methods that need a number of models the run does not have (SLERP: exactly 2) get a row with the reason,
   never a silent gap. A method that fails raises.
4. **Transductive flag**: ``getattr(method_class, "transductive", False)`` (AdaMerging / WEMoE learn from
   unlabelled test inputs); shown in every table.

5. **Seeds** (``seeds=[0, 1, 2]``): steps 1–3 run once per seed on the same splits; every row keeps its
   per-example test correctness (``Row.examples``, :meth:`Suite.evaluate_examples`); the rows of several seeds are
   averaged and the statistics (t-intervals, paired bootstrap against TA / TIES, Holm) come from :mod:`.stats`.
   With ``out``, each finished (seed, row) is written at once and a rerun resumes (:mod:`.runstore`).

Timings are recorded per phase (data, training, baselines, merging, evaluation) and per method.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import cache, grids
from .suite import Budget, ExampleScores, Expert, StateDict, Suite, TaskData
from .suites import BenchError

ENTRY_FORMAT = 1
#: validation means closer than this are a tie (the first grid point wins)
TIE_TOLERANCE = 1e-9
BASE_ROW = "pretrained + heads"
EXPERT_ROW = "individual experts"


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One line of the results table. Scores are in [0, 1] (accuracy) or perplexities; ``normalized`` in %."""

    name: str
    kind: str  # "baseline" | "experts" | "method" | "model"
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    transductive: bool = False
    test: dict[str, float] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)
    ood: dict[str, float] = field(default_factory=dict)
    #: metric of each OOD task; perplexity tasks (lower is better) are reported but never averaged
    ood_metrics: dict[str, str] = field(default_factory=dict)
    val_mean: float | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)
    time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    #: bytes a user stores to run this row (backbones, expert library, router); heads are not counted
    storage_bytes: int | None = None
    #: inference latency in ms per batch, e.g. {"batch_1": …, "batch_32": …} (routed rows)
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: what a non-static method read and built: data split and examples, steps, router accuracy, pruning …
    info: dict[str, Any] = field(default_factory=dict)
    #: per-example correctness on each task's test split (in-domain and OOD), packed by
    #: :func:`neuromerge.evaluation.statistics.pack_correct`; absent where the suite cannot tell (perplexity)
    examples: dict[str, str] = field(default_factory=dict)
    #: the seed this row was computed with (None: a mean over seeds, see :attr:`BenchResults.per_seed`)
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        """Inverse of :meth:`to_dict` (derived keys dropped; NaN written as null read back as NaN)."""
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        row = cls(**{k: v for k, v in d.items() if k in names})
        for part in (row.test, row.normalized, row.ood):
            for k, v in part.items():
                part[k] = float("nan") if v is None else float(v)
        return row

    @property
    def mean(self) -> float | None:
        return _mean(self.test.values())

    @property
    def mean_normalized(self) -> float | None:
        return _mean(self.normalized.values())

    @property
    def ood_mean(self) -> float | None:
        """Mean OOD *accuracy*: perplexity tasks are left out (another scale, lower is better)."""
        return _mean(v for k, v in self.ood.items() if self.ood_metrics.get(k, "accuracy") == "accuracy")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "mean_normalized": self.mean_normalized,
                "ood_mean": self.ood_mean}


@dataclass
class BenchResults:
    """Everything a run measured; :mod:`.report` renders it."""

    suite: str
    description: str
    quick: bool
    seed: int
    mode: str
    budget: dict[str, Any]
    tasks: list[dict[str, Any]]
    experts: dict[str, dict[str, Any]]
    rows: list[Row]
    timings: dict[str, float]
    created: str = ""
    out: str | None = None
    #: every seed of the run, in order (``seed`` is the first); ``rows`` are means over them when there are several
    seeds: list[int] = field(default_factory=list)
    #: the rows of each seed (their per-example correctness included)
    per_seed: dict[int, list[Row]] = field(default_factory=dict)
    #: intervals over seeds and paired-bootstrap comparisons (:func:`neuromerge.bench.stats.statistics`)
    statistics: dict[str, Any] = field(default_factory=dict)
    #: machine, threads and package versions of each seed's run (:func:`neuromerge.bench.runstore.environment`)
    environment: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def in_domain(self) -> list[str]:
        return [t["name"] for t in self.tasks if t["in_domain"]]

    @property
    def out_of_domain(self) -> list[str]:
        return [t["name"] for t in self.tasks if not t["in_domain"]]

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("rows", "per_seed")}
        return {**d, "rows": [r.to_dict() for r in self.rows],
                "per_seed": {str(s): [r.to_dict() for r in rows] for s, rows in self.per_seed.items()}}

    def markdown(self) -> str:
        from .report import markdown_table

        return markdown_table(self)


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def normalized_accuracy(score: float, expert_score: float, metric: str = "accuracy") -> float:
    """``100 · acc_merged / acc_expert`` (docs/methods/spec.md); for perplexity (lower is better) ``100 · ppl_expert /
    ppl_merged``. NaN when the denominator is 0."""
    if metric == "perplexity":
        return 100.0 * expert_score / score if score else float("nan")
    return 100.0 * score / expert_score if expert_score else float("nan")


# --------------------------------------------------------------------------------------------------- timing
class Clock:
    """Wall-clock seconds accumulated per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- caching
def _save(tensors: StateDict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def _load(path: Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _entry_key(suite: Suite, task: TaskData, budget: Budget, seed: int, **extra: Any) -> dict[str, Any]:
    return {"format": ENTRY_FORMAT, "suite": suite.fingerprint(), "task": task.fingerprint or task.name,
            "budget": asdict(budget), "seed": seed, **extra}


def cached_expert(suite: Suite, task: TaskData, budget: Budget, mode: str, seed: int, base: StateDict, *,
                  rebuild: bool = False) -> tuple[Expert, bool]:
    """The expert of ``task`` from the cache, trained (and stored) when absent, invalid or ``rebuild``.
    Only backbone tensors that differ from the base are stored; returns ``(expert, was_cached)``."""
    built: list[bool] = []

    def build(folder: Path) -> dict[str, Any]:
        expert = suite.train_expert(task, budget, mode, seed)
        changed = {k: v for k, v in expert.backbone.items() if k not in base or not torch.equal(v, base[k])}
        _save(changed, folder / "backbone.safetensors")
        if expert.head is not None:
            _save(expert.head, folder / "head.safetensors")
        built.append(True)
        return {"task": task.name, "test_score": expert.test_score, "meta": expert.meta,
                "backbone_names": sorted(expert.backbone), "has_head": expert.head is not None,
                "test_correct": _packed(suite.evaluate_examples(expert.backbone, expert.head, task, "test", budget))}

    key = _entry_key(suite, task, budget, seed, kind="expert", mode=mode)
    for attempt in range(2):
        entry = cache.cached("experts", key, build, rebuild=rebuild or attempt > 0)
        meta = cache.read_meta(entry)
        try:
            stored = _load(entry / "backbone.safetensors")
            names = meta["backbone_names"]
            backbone = {n: stored[n] if n in stored else base[n] for n in names}
            head = _load(entry / "head.safetensors") if meta["has_head"] else None
            expert = Expert(task=task.name, backbone=backbone, head=head, test_score=float(meta["test_score"]),
                            meta=dict(meta.get("meta", {})))
            # per-example test correctness (entries written before it was kept: computed now, not stored)
            packed = meta["test_correct"] if "test_correct" in meta else _packed(
                suite.evaluate_examples(backbone, head, task, "test", budget))
            if packed is not None:
                expert.meta["test_correct"] = packed
            return expert, not built
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            if attempt:
                raise BenchError(f"cache entry {entry} cannot be read after a rebuild: {err}") from err
            warnings.warn(f"cache entry {entry} is unreadable ({err}); rebuilding it", stacklevel=2)
    raise AssertionError("unreachable")  # pragma: no cover


def _correct(result: ExampleScores | torch.Tensor | None) -> torch.Tensor | None:
    """Per-example correctness from a suite's per-example result: :class:`ExampleScores` of an accuracy task (its
    ``correct``), a bool tensor as is; None for a perplexity task or a suite that gives none."""
    if isinstance(result, ExampleScores):
        return result.correct if result.metric == "accuracy" else None
    return result


def _packed(result: ExampleScores | torch.Tensor | None) -> str | None:
    from ..evaluation.statistics import pack_correct

    correct = _correct(result)
    return None if correct is None else pack_correct(correct.cpu().numpy())


def cached_base_probe(suite: Suite, task: TaskData, budget: Budget, seed: int, base: StateDict, *,
                      rebuild: bool = False) -> tuple[StateDict | None, float, str | None]:
    """The linear probe of ``task`` on frozen pre-trained features, its test score and its packed per-example test
    correctness (None where the suite cannot tell), cached."""

    def build(folder: Path) -> dict[str, Any]:
        head = suite.fit_probe(base, task, budget, seed)
        if head is not None:
            _save(head, folder / "head.safetensors")
        score, correct = scored(suite, base, head, task, "test", budget)
        return {"task": task.name, "test_score": score, "has_head": head is not None, "test_correct": _packed(correct)}

    key = _entry_key(suite, task, budget, seed, kind="base-probe")
    for attempt in range(2):
        entry = cache.cached("probes", key, build, rebuild=rebuild or attempt > 0)
        meta = cache.read_meta(entry)
        try:
            head = _load(entry / "head.safetensors") if meta["has_head"] else None
            packed = meta["test_correct"] if "test_correct" in meta else _packed(
                suite.evaluate_examples(base, head, task, "test", budget))
            return head, float(meta["test_score"]), packed
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            if attempt:
                raise BenchError(f"cache entry {entry} cannot be read after a rebuild: {err}") from err
            warnings.warn(f"cache entry {entry} is unreadable ({err}); rebuilding it", stacklevel=2)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------- merging
def scaled(base: StateDict, merged_at_one: StateDict, s: float) -> StateDict:
    """``θ0 + s·(θ(1) − θ0)`` on floating tensors (the others are taken from ``merged_at_one``)."""
    out = {}
    for k, v in merged_at_one.items():
        b = base.get(k)
        if b is None or not v.is_floating_point() or v is b:
            out[k] = v
        else:
            out[k] = (b.float() + s * (v.float() - b.float())).to(v.dtype)
    return out


@dataclass
class Produced:
    """What a non-static method (data-aware or routed, :data:`Runner`) hands back: a merged ``backbone`` state
    (scored like a static merge) or a ``module`` wrapping the backbone (a routed model, scored through the suite's
    forward hooks), the parameters it used, what it read and built (``info``), and optionally its validation
    mean, storage and latency."""

    backbone: StateDict | None = None
    module: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    val_mean: float | None = None
    storage_bytes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: oracle rows: each in-domain task is scored with these forced router probabilities (task index one-hot)
    oracle: bool = False


#: a non-static method's entry point: ``runner(ctx, name) -> Produced``
Runner = Callable[["Context", str], Produced]


@dataclass
class MethodSpec:
    """A method requested for a run: canonical name, class (static methods) or runner, transductive flag."""

    name: str
    cls: Any
    transductive: bool
    runner: Runner | None = None
    #: score the method once at :data:`.grids.PAPER_DEFAULTS` (no validation) instead of tuning it on its grid
    paper_default: bool = False

    @property
    def row_name(self) -> str:
        return self.name + (grids.PAPER_DEFAULT_SUFFIX if self.paper_default else "")


def with_paper_defaults(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """``specs`` with, after each static method that has paper defaults (:data:`.grids.PAPER_DEFAULTS`), its
    paper-default spec (row ``"<method> (paper default)"``)."""
    out: list[MethodSpec] = []
    for spec in specs:
        out.append(spec)
        if spec.runner is None and not spec.paper_default and grids.paper_default(spec.name) is not None:
            out.append(MethodSpec(spec.name, spec.cls, spec.transductive, paper_default=True))
    return out


def extra_runners() -> dict[str, tuple[Runner, bool]]:
    """Non-static methods the bench runs: name → (runner, transductive), from :mod:`.data_methods` (Fisher,
    RegMean, AdaMerging, WEMoE) and :mod:`.routed_methods` (MIN-Merging and its ablations, Twin-Merging, EMR)."""
    from . import extra_methods

    return extra_methods.runners()


def resolve_methods(names: Sequence[str] | None) -> list[MethodSpec]:
    """Requested method names (aliases allowed) → canonical specs, in order, without duplicates; ``None`` →
    the papers' static methods with a grid (:data:`~.grids.DEFAULT_METHODS`). Names of non-static methods
    (:func:`extra_runners`) resolve to runners. Unknown names raise :class:`BenchError`."""
    from ..errors import ConfigError
    from ..methods import available, get

    if names is None:  # data-aware methods read task data and take minutes, mergekit-parity ones are extra:
        names = list(grids.DEFAULT_METHODS)  # only when asked for
    out: list[MethodSpec] = []
    extra: dict[str, tuple[Runner, bool]] = {}
    for n in names:
        try:
            cls = get(n)
        except ConfigError:
            cls = None
        if cls is not None and not getattr(cls, "data_aware", False):
            spec = MethodSpec(cls.name, cls, bool(getattr(cls, "transductive", False)))
        else:
            extra = extra or extra_runners()
            key = cls.name if cls is not None else n
            if key not in extra:
                raise BenchError(f"unknown method {n!r}; available: {', '.join([*available(), *extra])}")
            runner, transductive = extra[key]
            spec = MethodSpec(key, None, transductive, runner)
        if all(m.name != spec.name for m in out):
            out.append(spec)
    return out


def model_count_problem(cls: Any, count: int) -> str | None:
    """Why ``cls`` cannot merge ``count`` experts (None when it can)."""
    lo, hi = int(getattr(cls, "min_models", 1)), getattr(cls, "max_models", None)
    if count < lo or (hi is not None and count > hi):
        need = f"exactly {lo}" if hi == lo else (f"at least {lo}" + (f" and at most {hi}" if hi else ""))
        return f"{cls.name} merges {need} models; this run has {count} in-domain experts"
    return None


# --------------------------------------------------------------------------------------------------- protocol
Progress = Callable[[str, int], Any]


@dataclass
class Context:
    """What the method rows need: the suite, its tasks, experts, base and budget."""

    suite: Suite
    budget: Budget
    base: StateDict
    in_domain: list[TaskData]
    ood: list[TaskData]
    experts: dict[str, Expert]
    seed: int
    clock: Clock
    bar: Callable[..., Any]

    @property
    def expert_states(self) -> list[StateDict]:
        return [self.experts[t.name].backbone for t in self.in_domain]

    def merge(self, method: str, params: dict[str, Any]) -> StateDict:
        from ..functional import merge_state_dicts

        with self.clock("merging"):
            return merge_state_dicts(method, self.base, self.expert_states, parameters=params,
                                     exclude=self.suite.merge_exclude(), seed=self.seed,
                                     model_type=self.suite.model_type())

    def val_mean(self, backbone: StateDict) -> float:
        with self.clock("evaluation"):
            scores = [self.suite.evaluate(backbone, self.experts[t.name].head, t, "val", self.budget)
                      for t in self.in_domain]
        return sum(scores) / len(scores)

    def score_module(self, row: Row, module: Any, *, oracle: bool = False) -> None:
        """Test scores of a routed ``module`` (the experts' heads; ``oracle``: each in-domain task routed to its
        own expert by forced one-hot router probabilities), normalized accuracy, OOD probes on its features."""

        def evaluate(head: StateDict | None, t: TaskData) -> Scored:
            result = self.suite.evaluate_module_examples(module, head, t, "test", self.budget)
            correct = _correct(result)
            if correct is None:
                score = result.score if isinstance(result, ExampleScores) else self.suite.evaluate_module(
                    module, head, t, "test", self.budget)
                return score, None
            return _accuracy(correct), correct

        def evaluate_in_domain(i: int, head: StateDict | None, t: TaskData) -> Scored:
            if not oracle:
                return evaluate(head, t)
            probs = torch.zeros(1, len(self.in_domain))
            probs[0, i] = 1.0
            with module.force(probs):
                return evaluate(head, t)

        self._fill(row, evaluate_in_domain, evaluate,
                   lambda t: self.suite.fit_probe_module(module, t, self.budget, self.seed))

    def score(self, row: Row, backbone: StateDict) -> None:
        """Test scores with the experts' heads, normalized accuracy, OOD probes."""

        def evaluate(head: StateDict | None, t: TaskData) -> Scored:
            return scored(self.suite, backbone, head, t, "test", self.budget)

        self._fill(row, lambda _i, head, t: evaluate(head, t), evaluate,
                   lambda t: self.suite.fit_probe(backbone, t, self.budget, self.seed))

    def _fill(self, row: Row, evaluate_in_domain: Callable[[int, StateDict | None, TaskData], Scored],
              evaluate: Callable[[StateDict | None, TaskData], Scored],
              probe: Callable[[TaskData], StateDict | None]) -> None:
        """``row``'s in-domain test scores (experts' heads), normalized accuracies and OOD scores (fresh probes),
        with each task's per-example correctness where the suite gives it (``row.examples``)."""
        from ..evaluation.statistics import pack_correct

        with self.clock("evaluation"):
            for i, t in enumerate(self.in_domain):
                e = self.experts[t.name]
                row.test[t.name], correct = evaluate_in_domain(i, e.head, t)
                row.normalized[t.name] = normalized_accuracy(row.test[t.name], e.test_score, t.metric)
                if correct is not None:
                    row.examples[t.name] = pack_correct(correct.cpu().numpy())
            for t in self.ood:
                row.ood[t.name], correct = evaluate(probe(t), t)
                row.ood_metrics[t.name] = t.metric
                if correct is not None:
                    row.examples[t.name] = pack_correct(correct.cpu().numpy())


#: a score and its per-example correctness (None where the suite cannot give it)
Scored = tuple[float, "torch.Tensor | None"]


def _accuracy(correct: torch.Tensor) -> float:
    """``#correct / N`` as an exact Python float (equal counts, equal scores)."""
    return int(correct.sum()) / len(correct) if len(correct) else float("nan")


def scored(suite: Suite, backbone: StateDict, head: StateDict | None, task: TaskData, split: str,
           budget: Budget) -> Scored:
    """A backbone's score on a split and its per-example correctness: :meth:`Suite.evaluate_examples` where the
    suite gives it (the score is then its mean), else :meth:`Suite.evaluate` and None."""
    result = suite.evaluate_examples(backbone, head, task, split, budget)  # type: ignore[arg-type]
    correct = _correct(result)
    if correct is None:
        if isinstance(result, ExampleScores):  # a perplexity task: its score, no per-example correctness
            return result.score, None
        return suite.evaluate(backbone, head, task, split, budget), None  # type: ignore[arg-type]
    return _accuracy(correct), correct


def state_bytes(state: StateDict) -> int:
    """Bytes of a state dict's tensors as stored (their dtypes)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def run_produced(ctx: Context, spec: MethodSpec) -> Row:
    """A non-static method: its runner builds a backbone or a routed module, which is scored like the others."""
    assert spec.runner is not None
    row = Row(name=spec.name, kind="method", method=spec.name, transductive=spec.transductive)
    t0 = time.perf_counter()
    phases0 = dict(ctx.clock.phases)
    with ctx.bar(total=2, desc=f"{spec.name:<16}", leave=False) as bar:
        try:
            produced = spec.runner(ctx, spec.name)
        except BenchError:
            raise
        except Exception as err:
            err.add_note(f"while running {spec.name}")
            raise
        bar.update(1)
        row.params, row.info, row.val_mean = dict(produced.params), dict(produced.info), produced.val_mean
        row.latency_ms = dict(produced.latency_ms)
        if produced.backbone is not None:
            ctx.score(row, produced.backbone)
            row.storage_bytes = produced.storage_bytes or state_bytes(produced.backbone)
        elif produced.module is not None:
            ctx.score_module(row, produced.module, oracle=produced.oracle)
            row.storage_bytes = produced.storage_bytes
        else:
            raise BenchError(f"method {spec.name!r} produced neither a backbone nor a module")
        bar.update(1)
    row.time_s = time.perf_counter() - t0
    row.timings = {k: v - phases0.get(k, 0.0) for k, v in ctx.clock.phases.items()
                   if v - phases0.get(k, 0.0) > 0}
    return row


def run_method_or_record(ctx: Context, spec: MethodSpec) -> Row:
    """:func:`run_method`, with a failure recorded in the row instead of ending the run: one method's error must
    not lose the rows already computed. ``skipped`` reads ``not applicable: …`` for :class:`NotApplicable`,
    ``failed: …`` otherwise (the traceback goes to stderr; the CLI then exits with status 1)."""
    import sys
    import traceback

    from ..errors import NotApplicable

    try:
        return run_method(ctx, spec)
    except NotApplicable as err:
        reason = f"not applicable: {err}"
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        reason = f"failed: {type(err).__name__}: {err}"
    return Row(name=spec.row_name, kind="method", method=spec.name, transductive=spec.transductive, skipped=reason)


def run_method(ctx: Context, spec: MethodSpec) -> Row:
    """Tune ``spec`` on the validation splits over its grid, then score the chosen point (see module doc); a
    ``paper_default`` spec is scored at its paper defaults, without validation."""
    if spec.runner is not None:
        return run_produced(ctx, spec)
    row = Row(name=spec.row_name, kind="method", method=spec.name, transductive=spec.transductive)
    problem = model_count_problem(spec.cls, len(ctx.in_domain))
    if problem:
        row.skipped = problem
        return row
    if spec.paper_default:
        return _run_paper_default(ctx, spec, row)
    t0 = time.perf_counter()
    phases0 = dict(ctx.clock.phases)
    points = grids.grid_for(spec.name, ctx.budget.quick)
    scale = grids.SCALE_PARAMS.get(spec.name)
    best: tuple[float, int, StateDict] | None = None
    with ctx.bar(total=len(points) + 1, desc=f"{spec.name:<16}", leave=False) as bar:
        for merge_params, members in grids.scale_groups(spec.name, points):
            try:
                merged = ctx.merge(spec.name, merge_params)
            except Exception as err:
                err.add_note(f"while merging with {spec.name} {merge_params}")
                raise
            for i, s in members:
                model = merged if s is None else scaled(ctx.base, merged, s)
                val = ctx.val_mean(model)
                row.grid.append({"params": points[i], "val_mean": val,
                                 "derived": s is not None and scale is not None})
                if best is None or val > best[0] + TIE_TOLERANCE or (abs(val - best[0]) <= TIE_TOLERANCE
                                                                      and i < best[1]):
                    best = (val, i, model)
                bar.update(1)
            del merged
        assert best is not None
        row.val_mean, row.params = best[0], dict(points[best[1]])
        row.grid.sort(key=lambda g: points.index(g["params"]))
        ctx.score(row, best[2])
        row.storage_bytes = state_bytes(best[2])
        bar.update(1)
    row.time_s = time.perf_counter() - t0
    row.timings = {k: v - phases0.get(k, 0.0) for k, v in ctx.clock.phases.items()
                   if v - phases0.get(k, 0.0) > 0}
    return row


def _run_paper_default(ctx: Context, spec: MethodSpec, row: Row) -> Row:
    """One merge at :data:`.grids.PAPER_DEFAULTS`, scored on the test splits (no validation score, no grid)."""
    params = grids.paper_default(spec.name)
    if params is None:
        raise BenchError(f"method {spec.name!r} has no paper defaults (grids.PAPER_DEFAULTS)")
    t0 = time.perf_counter()
    phases0 = dict(ctx.clock.phases)
    with ctx.bar(total=1, desc=f"{spec.row_name:<16}", leave=False) as bar:
        try:
            merged = ctx.merge(spec.name, params)
        except Exception as err:
            err.add_note(f"while merging with {spec.name} {params}")
            raise
        row.params = params
        row.info["paper_default"] = grids.PAPER_DEFAULTS[spec.name].source
        ctx.score(row, merged)
        row.storage_bytes = state_bytes(merged)
        bar.update(1)
    row.time_s = time.perf_counter() - t0
    row.timings = {k: v - phases0.get(k, 0.0) for k, v in ctx.clock.phases.items()
                   if v - phases0.get(k, 0.0) > 0}
    return row


def task_info(t: TaskData) -> dict[str, Any]:
    return {"name": t.name, "in_domain": t.in_domain, "classes": list(t.classes), "metric": t.metric,
            "source": t.source, "fingerprint": t.fingerprint,
            "sizes": {"train": len(t.train), "val": len(t.val), "test": len(t.test)}}


def to_json(results: BenchResults) -> str:
    """``results.json``: strict JSON (NaN written as null)."""
    from ..evaluation.report import strict_json

    return json.dumps(strict_json(results.to_dict()), indent=2, default=str)


# --------------------------------------------------------------------------------------------------- a run
def select_tasks(tasks: list[TaskData], names: Sequence[str] | None) -> list[TaskData]:
    """The tasks named in ``names`` (all when None), in the suite's order; unknown names raise."""
    if names is None:
        return list(tasks)
    known = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown task {unknown[0]!r}; this suite has: {', '.join(known)}")
    wanted = set(names)
    return [t for t in tasks if t.name in wanted]


def is_routed_folder(path: str | Path) -> bool:
    """Whether ``path`` is a routed-model folder (``neuromerge route build``: a ``manifest.json`` of ours)."""
    from ..routing.folder import FORMAT, MANIFEST

    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_routed_module(path: str | Path, suite: Suite, base: StateDict) -> Any:
    """A routed-model folder as a module the suite can score (its experts' heads are the bench's): the folder's
    own backbone when it embeds or names one, else the suite's backbone (``module=``). Its base must be this
    suite's backbone (same tensor names and shapes)."""
    from ..errors import NeuromergeError
    from ..routing.folder import load_routed

    try:
        routed = load_routed(path, module=suite.module(base))
    except NeuromergeError as err:
        raise BenchError(f"--model {path}: {err}") from None
    return routed.eval()


def load_merged_backbone(path: str | Path, base: StateDict) -> StateDict:
    """The backbone tensors of a merged model folder (``neuromerge merge`` output), found by name: exactly, or
    as ``<prefix>.<name>`` when the folder holds a model with a task head (``bert.encoder...``) — the library's
    :func:`~neuromerge.evaluation.models.read_backbone`, its error prefixed with the bench's option (``--model``)."""
    from ..errors import TaskError
    from ..evaluation.models import read_backbone

    try:
        return read_backbone(path, base)
    except TaskError as err:
        raise BenchError(f"--{err}") from None


def _bar_factory(show: bool) -> Callable[..., Any]:
    import sys

    from tqdm.auto import tqdm

    def bar(**kwargs: Any) -> Any:
        return tqdm(file=sys.stderr, disable=not show, dynamic_ncols=True, **kwargs)

    return bar


@dataclass
class Prepared:
    """A suite ready for method rows: its budget, chosen tasks, base and per-task experts (trained or cached)."""

    suite: Suite
    mode: str
    budget: Budget
    chosen: list[TaskData]
    in_domain: list[TaskData]
    ood: list[TaskData]
    base: StateDict
    experts: dict[str, Expert]
    expert_info: dict[str, dict[str, Any]]

    def context(self, seed: int, clock: Clock, bar: Callable[..., Any]) -> Context:
        return Context(suite=self.suite, budget=self.budget, base=self.base, in_domain=self.in_domain, ood=self.ood,
                       experts=self.experts, seed=seed, clock=clock, bar=bar)


def prepare_suite(suite: str | Suite, tasks: Sequence[str] | None = None, *, quick: bool = False,
                  rebuild: bool = False, task_file: str | Path | None = None, seed: int = 0, mode: str | None = None,
                  clock: Clock | None = None, bar: Callable[..., Any] | None = None,
                  need_experts: bool = True) -> Prepared:
    """The suite, its budget and tasks (``tasks`` selects by name; ``task_file`` adds user tasks), the base and
    one expert per in-domain task from the expert cache (trained on first use). ``need_experts=False`` allows a
    selection without in-domain tasks (scoring a given model only)."""
    from .suites import get_suite

    clock = clock or Clock()
    bar = bar or _bar_factory(False)
    s = suite if isinstance(suite, Suite) else get_suite(suite)
    mode = mode or s.modes[0]
    if mode not in s.modes:
        raise BenchError(f"suite {s.name!r} has no expert mode {mode!r}; modes: {', '.join(s.modes)}")
    budget = s.budget(quick)
    with clock("data"):
        all_tasks = s.tasks(budget)
        if task_file is not None:
            from .taskfile import load_task_file

            all_tasks += load_task_file(task_file, s.name, budget, reserved=[t.name for t in all_tasks])
    chosen = select_tasks(all_tasks, tasks)
    in_domain = [t for t in chosen if t.in_domain]
    if callable(getattr(s, "prepare_mode", None)):  # a suite whose merged weights depend on the mode (llm)
        s.prepare_mode(mode)  # type: ignore[attr-defined]
    if not in_domain and need_experts:
        raise BenchError("no in-domain task selected: nothing to train experts on or to merge")
    return Prepared(s, mode, budget, chosen, in_domain, [t for t in chosen if not t.in_domain], s.backbone_state(),
                    {}, {})


def train_experts(prep: Prepared, seed: int, *, rebuild: bool = False, clock: Clock | None = None,
                  bar: Callable[..., Any] | None = None) -> None:
    """Fill ``prep.experts`` (and ``expert_info``) from the expert cache, training the missing experts."""
    clock = clock or Clock()
    bar = bar or _bar_factory(False)
    with clock("training"), bar(total=len(prep.in_domain), desc="experts         ", leave=False) as b:
        for t in prep.in_domain:
            b.set_postfix_str(t.name)
            prep.experts[t.name], was_cached = cached_expert(prep.suite, t, prep.budget, prep.mode, seed, prep.base,
                                                             rebuild=rebuild)
            prep.expert_info[t.name] = {"test_score": prep.experts[t.name].test_score, "mode": prep.mode,
                                        "cached": was_cached, "meta": prep.experts[t.name].meta}
            b.update(1)


def baseline_rows(prep: Prepared, seed: int, *, rebuild: bool, clock: Clock, bar: Callable[..., Any]) -> list[Row]:
    """The "pretrained + heads" row (cached probes on the base) and the "individual experts" row of ``seed``."""
    s, budget, base, experts = prep.suite, prep.budget, prep.base, prep.experts
    base_row = Row(name=BASE_ROW, kind="baseline", seed=seed)
    with clock("baselines"), bar(total=len(prep.chosen), desc="pretrained+heads", leave=False) as b:
        t0 = time.perf_counter()
        for t in prep.chosen:
            _, score, packed = cached_base_probe(s, t, budget, seed, base, rebuild=rebuild)
            if t.in_domain:
                base_row.test[t.name] = score
                base_row.normalized[t.name] = normalized_accuracy(score, experts[t.name].test_score, t.metric)
            else:
                base_row.ood[t.name] = score
                base_row.ood_metrics[t.name] = t.metric
            if packed is not None:
                base_row.examples[t.name] = packed
            b.update(1)
        base_row.time_s = time.perf_counter() - t0
    base_row.storage_bytes = state_bytes(base)
    expert_row = Row(name=EXPERT_ROW, kind="experts", params={"mode": prep.mode}, seed=seed,
                     test={n: e.test_score for n, e in experts.items()},
                     normalized={n: 100.0 for n in experts},
                     time_s=sum(float(e.meta.get("train_seconds", 0.0)) for e in experts.values()),
                     storage_bytes=sum(state_bytes(e.backbone) for e in experts.values()),
                     examples={n: e.meta["test_correct"] for n, e in experts.items() if "test_correct" in e.meta})
    return [base_row, expert_row]


def parse_seeds(seeds: Sequence[int] | None, seed: int) -> list[int]:
    """The run's seeds: ``seeds`` (distinct, non-negative, in order) or ``[seed]``."""
    out = [seed] if seeds is None else [int(s) for s in seeds]
    if not out:
        raise BenchError("--seeds needs at least one seed")
    if len(set(out)) != len(out):
        raise BenchError(f"--seeds lists a seed twice: {out}")
    if any(s < 0 for s in out):
        raise BenchError(f"seeds are non-negative integers: {out}")
    return out


def run_suite(suite: str | Suite, methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None, *,
              quick: bool = False, out: str | Path | None = None, rebuild: bool = False,
              model: str | Path | None = None, task_file: str | Path | None = None, seed: int = 0,
              progress: bool | None = None, mode: str | None = None, seeds: Sequence[int] | None = None,
              paper_defaults: bool | None = None) -> BenchResults:
    """Run the protocol (module docstring) for every seed of ``seeds`` (default ``[seed]``); see
    :func:`neuromerge.bench.run`. With ``out``, each finished (seed, row) is written there at once and a rerun with
    the same ``out`` resumes (:mod:`.runstore`); ``rebuild`` recomputes every row. ``paper_defaults``: add the
    paper-default rows (:func:`with_paper_defaults`; default: in the normal budget, not with ``quick``)."""
    import datetime
    import sys

    from . import runstore
    from .suites import get_suite

    t_start = time.perf_counter()
    seed_list = parse_seeds(seeds, seed)
    clock = Clock()
    bar = _bar_factory(sys.stderr.isatty() if progress is None else progress)
    s = suite if isinstance(suite, Suite) else get_suite(suite)
    if methods is None and model is None and quick and s.quick_methods is not None:
        methods = list(s.quick_methods)
    specs = resolve_methods(methods) if (methods is not None or model is None) else []
    if paper_defaults is None:
        paper_defaults = not quick  # one more merge and test scoring per method: not in the quick budget
    if paper_defaults:
        specs = with_paper_defaults(specs)
    prep = prepare_suite(s, tasks, quick=quick, rebuild=rebuild, task_file=task_file, seed=seed_list[0], mode=mode,
                         clock=clock, bar=bar, need_experts=model is None or bool(specs))
    s, base, chosen = prep.suite, prep.base, prep.chosen
    # checked before training: a merged model folder (its backbone tensors) or a routed-model folder (a module)
    model_backbone: Any = None
    if model is not None:
        model_backbone = (load_routed_module(model, s, base) if is_routed_folder(model)
                          else load_merged_backbone(model, base))
    model_name = f"model: {Path(model).name}" if model is not None else None
    folder = Path(out) if out is not None else None
    names = [BASE_ROW, EXPERT_ROW, *([model_name] if model_name else []), *(sp.row_name for sp in specs)]
    if folder is not None:
        ident = runstore.identity(s.name, s.fingerprint(), [task_info(t) for t in chosen], asdict(prep.budget),
                                  prep.mode, quick, str(model) if model is not None else None)
        runstore.open_run(folder, ident, seed_list, names)

    per_seed: dict[int, list[Row]] = {}
    env: dict[int, dict[str, Any]] = {}
    expert_info: dict[str, dict[str, Any]] = {}
    for sd in seed_list:
        done: dict[str, Row] = {}
        if folder is not None and not rebuild:
            done = {n: r for n in names if (r := runstore.load_row(folder, sd, n)) is not None}
        env[sd] = runstore.environment()
        if folder is not None:  # the machine that started the seed (a resume on another one keeps it)
            if not runstore.load_environment(folder, sd):
                runstore.save_environment(folder, sd, env[sd])
            env[sd] = runstore.load_environment(folder, sd) or env[sd]
        if len(done) == len(names):  # every row of this seed is finished: no expert is needed
            per_seed[sd] = [done[n] for n in names]
            continue
        prep.experts, prep.expert_info = {}, {}
        train_experts(prep, sd, rebuild=rebuild, clock=clock, bar=bar)
        expert_info = expert_info or prep.expert_info
        rows: dict[str, Row] = dict(done)

        def keep(row: Row, sd: int = sd, rows: dict[str, Row] = rows) -> None:
            row.seed = sd
            rows[row.name] = row
            if folder is not None and not (row.skipped or "").startswith("failed"):  # a failure is retried
                runstore.save_row(folder, sd, row)

        if BASE_ROW not in done or EXPERT_ROW not in done:
            for row in baseline_rows(prep, sd, rebuild=rebuild, clock=clock, bar=bar):
                if row.name not in done:
                    keep(row)
        ctx = prep.context(sd, clock, bar)
        if model_name is not None and model_backbone is not None and model_name not in done:
            t0 = time.perf_counter()
            model_row = Row(name=model_name, kind="model", params={"path": str(model)})
            if isinstance(model_backbone, torch.nn.Module):
                ctx.score_module(model_row, model_backbone)
            else:
                ctx.score(model_row, model_backbone)
            model_row.time_s = time.perf_counter() - t0
            keep(model_row)
        todo = [sp for sp in specs if sp.row_name not in done]
        with bar(total=len(todo), desc=f"methods seed {sd:<4}") as b:
            for spec in todo:
                b.set_postfix_str(spec.row_name)
                keep(run_method_or_record(ctx, spec))
                b.update(1)
        per_seed[sd] = [rows[n] for n in names]

    timings = {**clock.phases, "total": time.perf_counter() - t_start}
    results = assemble(s.name, s.description, quick, prep.mode, asdict(prep.budget), [task_info(t) for t in chosen],
                       expert_info, per_seed, timings, env,
                       datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if folder is not None:
        from .report import write_report

        results.out = str(folder)
        write_report(results, folder)
    return results


def assemble(suite: str, description: str, quick: bool, mode: str, budget: dict[str, Any],
             tasks: list[dict[str, Any]], experts: dict[str, dict[str, Any]], per_seed: dict[int, list[Row]],
             timings: dict[str, float], environment: dict[int, dict[str, Any]], created: str) -> BenchResults:
    """:class:`BenchResults` of one or several seeds: with one seed its rows as computed, with several the mean
    rows (:func:`.stats.mean_rows`); statistics over the seeds (:func:`.stats.statistics`)."""
    from . import stats

    seeds = list(per_seed)
    rows = per_seed[seeds[0]] if len(seeds) == 1 else stats.mean_rows(per_seed)
    results = BenchResults(suite=suite, description=description, quick=quick, seed=seeds[0], mode=mode, budget=budget,
                           tasks=tasks, experts=experts, rows=rows, timings=timings, created=created, seeds=seeds,
                           per_seed=per_seed, environment=environment)
    results.statistics = stats.statistics(results)
    return results
