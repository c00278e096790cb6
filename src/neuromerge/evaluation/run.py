"""Score models on a task set, normalised against the task set's experts.

For every task ``t`` of the :class:`~neuromerge.tasks.TaskSet` and every split asked for (``test``; ``val`` too on
request), three kinds of rows:

- **experts** — the upper reference: each task's own expert on its own task, with the expert's head (its
  ``*ForSequenceClassification`` classifier when it has one, else label words, else the probe fitted on its
  features: :mod:`.heads`);
- **base** — the pre-trained base with the same heads as a merged model (the zero task-vector point);
- one row per **model** given (a merged folder, a merged LoRA adapter, a routed folder: :mod:`.models`), with the
  folder's own head for a task when it has one, else the expert's head. A routed model is scored through its own
  router (its forward pass).

Normalised accuracy (as the bench, docs/methods/spec.md): ``norm_t = 100 · acc_t(model) / acc_t(expert)`` — for a
perplexity task ``100 · ppl_t(expert) / ppl_t(model)`` — where the expert's score is the experts row's (same split, same
examples). The mean normalised accuracy averages ``norm_t`` over the tasks. Every row records which head scored each
task (``heads``).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TaskError
from ..tasks.contract import ExampleScores, Expert, StateDict, TaskData, TaskSet
from ..tasks.hf import HFSuite
from .heads import ClassifierHead, HeadSource, classifier_architecture
from .models import EvaluatedModel, check_model_path, open_model

SPLITS = ("test", "val")
#: keys of a ``route build`` config that :func:`load_taskset` ignores (a route config works as an evaluate config)
ROUTE_KEYS = ("method", "variant", "params", "embed_base")
#: keys of a config that names a suite (``suite: text``)
SUITE_KEYS = ("suite", "tasks", "quick", "seed", "mode")


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One row of the report: scores per split and task, normalised accuracies (100 = the expert), the head that
    scored each task, and seconds spent."""

    name: str
    kind: str  # "experts" | "base" | "merged" | "adapter" | "routed"
    path: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    normalized: dict[str, dict[str, float]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    def mean(self, split: str = "test") -> float | None:
        return _mean(self.scores.get(split, {}).values())

    def mean_normalized(self, split: str = "test") -> float | None:
        return _mean(self.normalized.get(split, {}).values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        splits = sorted(self.scores)
        d["mean"] = {s: self.mean(s) for s in splits}
        d["mean_normalized"] = {s: self.mean_normalized(s) for s in splits}
        return d


@dataclass
class EvalResults:
    """What :func:`evaluate` measured: the tasks, the splits, the rows (experts, base, then the models in the order
    given) and where the task set came from."""

    tasks: list[dict[str, Any]]
    splits: list[str]
    rows: list[Row]
    suite: str
    source: str | None = None
    seed: int = 0
    created: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    out: str | None = None

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "source": self.source, "seed": self.seed, "created": self.created,
                "splits": self.splits, "tasks": self.tasks, "rows": [r.to_dict() for r in self.rows],
                "timings": self.timings}

    def markdown(self, split: str = "test") -> str:
        from .report import markdown_table

        return markdown_table(self, split)


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def normalized_accuracy(score: float, expert_score: float, metric: str = "accuracy") -> float:
    """``100 · acc / acc_expert``; for perplexity (lower is better) ``100 · ppl_expert / ppl``. NaN when the
    denominator is 0."""
    if metric == "perplexity":
        return 100.0 * expert_score / score if score else float("nan")
    return 100.0 * score / expert_score if expert_score else float("nan")


# ------------------------------------------------------------------------------------------------ the task set
def load_taskset(config: str | os.PathLike[str] | Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                 tasks: Sequence[str] | None = None, allow_download: bool = False) -> TaskSet:
    """The :class:`~neuromerge.tasks.TaskSet` a config describes: a user's model (the
    :class:`~neuromerge.tasks.hf.UserModelConfig` keys ``base``, ``tasks``, ``experts``…; a ``route build``
    config's own keys are ignored) or a named suite (``suite: NAME`` with optional ``tasks`` (list), ``quick``,
    ``seed``, ``mode``: :func:`~neuromerge.tasks.named.resolve_suite`). ``config`` is a YAML file (relative paths
    resolve against its folder) or a mapping (``source``: the file it came from, if any). ``tasks`` selects tasks
    by name (each must have an expert). Every problem is listed, one per line, before anything is loaded."""
    opener, problems, _ = check_taskset(config, source=source, tasks=tasks, allow_download=allow_download)
    if problems or opener is None:
        raise TaskError("\n".join(problems))
    return opener()


def check_taskset(config: str | os.PathLike[str] | Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                  tasks: Sequence[str] | None = None, allow_download: bool = False
                  ) -> tuple[Callable[[], TaskSet] | None, list[str], list[str]]:
    """``(opener, problems, inputs)`` of a config (:func:`load_taskset`), nothing loaded: the problems one per line;
    when there is none, a function that loads the :class:`~neuromerge.tasks.TaskSet` and the files it reads (the
    config, the base, the task file, the experts: what an output must not replace)."""
    from ..tasks.hf import USER_MODEL_KEYS, open_user_model, validate_user_model

    try:
        raw, source = _read_config(config, source)
    except TaskError as err:
        return None, str(err).splitlines(), []
    where = f"{source}: " if source is not None else "config: "
    if "suite" in raw:
        opener, problems = _named_taskset(raw, where, tasks)
        return opener, problems, [] if source is None else [str(source)]
    unknown = sorted(set(raw) - set(USER_MODEL_KEYS) - set(ROUTE_KEYS))
    problems = [f"{where}{k}: unknown key (known: {', '.join(USER_MODEL_KEYS)}, or suite:)" for k in unknown]
    try:
        cfg, _ = validate_user_model(raw, source=source, allow_download=allow_download)
    except TaskError as err:
        return None, problems + str(err).splitlines(), []
    if tasks is not None:
        problems += [f"task {t!r} has no expert (experts: {', '.join(cfg.experts)})" for t in tasks
                     if t not in cfg.experts]
    if problems:
        return None, problems, []
    inputs = [*([] if source is None else [str(source)]), cfg.base, cfg.tasks, *cfg.experts.values()]
    return (lambda: open_user_model(cfg, names=None if tasks is None else list(tasks))), [], inputs


def _read_config(config: str | os.PathLike[str] | Mapping[str, Any], source: str | os.PathLike[str] | None
                 ) -> tuple[dict[str, Any], str | os.PathLike[str] | None]:
    if isinstance(config, Mapping):
        return dict(config), source
    import yaml

    path = Path(config)
    if not path.is_file():
        raise TaskError(f"config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(f"cannot read config {path}: {first}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"config {path} must be a mapping (base, tasks, experts — or suite)")
    return raw, path


def user_model_config(base: str | os.PathLike[str], experts: str | os.PathLike[str], task_file: str | os.PathLike[str]
                      ) -> tuple[dict[str, Any], Path]:
    """``(config mapping, source)`` of ``--base B --experts E --task-file T``: ``E`` is a YAML file mapping each
    task to its expert (a PEFT adapter folder or a full checkpoint; relative paths resolve against ``E``'s folder),
    or a user-model config whose ``experts:`` does (its other keys — ``seq_len``, ``probe_steps``… — are kept;
    ``base`` and ``tasks`` are the ones given here). ``B`` and ``T`` resolve against the working directory."""
    import yaml

    path = Path(experts)
    if not path.is_file():
        raise TaskError(f"experts file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(f"cannot read experts file {path}: {first}") from None
    if not isinstance(doc, dict) or not doc:
        raise TaskError(f"experts file {path} must map each task to its expert (task: path/to/expert)")
    raw = {k: v for k, v in doc.items() if k not in ("base", "tasks")} if isinstance(doc.get("experts"), dict) \
        else {"experts": doc}
    return {**raw, "base": os.path.abspath(base), "tasks": os.path.abspath(task_file)}, path


def _named_taskset(raw: dict[str, Any], where: str, tasks: Sequence[str] | None
                   ) -> tuple[Callable[[], TaskSet] | None, list[str]]:
    from ..tasks.named import has_suite_provider, resolve_suite

    problems = [f"{where}{k}: unknown key with suite: (known: {', '.join(SUITE_KEYS)})" for k in raw
                if k not in SUITE_KEYS]
    names = raw.get("tasks")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        problems.append(f"{where}tasks: with suite:, a list of task names")
    if not isinstance(raw["suite"], str):
        problems.append(f"{where}suite: a suite name (text, vision, llm)")
    if not has_suite_provider():
        from ..tasks.named import NO_PROVIDER

        problems.append(f"{where}suite: {NO_PROVIDER}")
    if problems:
        return None, problems
    chosen = list(tasks) if tasks is not None else names
    return (lambda: resolve_suite(raw["suite"], tasks=chosen, quick=bool(raw.get("quick", False)),
                                  seed=int(raw.get("seed", 0)), mode=raw.get("mode"))), []


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class _Heads:
    """Per task: the expert's classifier (None: none), the head the expert's reference and the fallbacks use."""

    classifiers: dict[str, ClassifierHead | None]

    def expert_source(self, ts: TaskSet, t: TaskData, e: Expert) -> HeadSource:
        if self.classifiers.get(t.name) is not None:
            return "classifier"
        # no head: label words (a user's causal LM entry with label_words; the llm suite's tasks)
        return "label_words" if e.head is None or _scores_words(ts, t) else "probe"


def _scores_words(ts: TaskSet, t: TaskData) -> bool:
    """Whether the suite scores ``t`` by label-word likelihood (then no head is read)."""
    words = getattr(ts.suite, "scores_words", None)
    return bool(callable(words) and words(t))


def _classifiers(ts: TaskSet) -> dict[str, ClassifierHead | None]:
    out: dict[str, ClassifierHead | None] = {}
    for t, e in zip(ts.tasks, ts.experts, strict=True):
        path = e.meta.get("path")
        out[t.name] = ClassifierHead(path, t) if classifier_architecture(path) is not None else None
    return out


class _Scorer:
    """Scores one model (a state dict or a module) on one task and split with one head."""

    def __init__(self, ts: TaskSet) -> None:
        self.ts = ts
        self._last: tuple[StateDict, Any] | None = None  # one module at a time (memory)

    def module(self, backbone: StateDict) -> Any:
        if self._last is None or self._last[0] is not backbone:
            self._last = (backbone, self.ts.suite.module(backbone))
        return self._last[1]

    def score(self, model: StateDict | Any, t: TaskData, split: str, source: HeadSource,
              head: StateDict | None, classifier: ClassifierHead | None) -> float:
        """The score of ``model`` on ``t``'s ``split`` with the head of ``source`` (the suite's ``evaluate`` /
        ``evaluate_module``, so a suite without per-example results is scored too)."""
        return self._run(model, t, split, source, head, classifier, examples=False)

    def examples(self, model: StateDict | Any, t: TaskData, split: str, source: HeadSource,
                 head: StateDict | None, classifier: ClassifierHead | None) -> ExampleScores:
        """Per-example results of ``model`` on ``t``'s ``split`` with the head of ``source`` (the same paths as
        :meth:`score`; ``.score`` equals it)."""
        return self._run(model, t, split, source, head, classifier, examples=True)

    def _run(self, model: StateDict | Any, t: TaskData, split: str, source: HeadSource, head: StateDict | None,
             classifier: ClassifierHead | None, *, examples: bool) -> Any:
        """One path for :meth:`score` and :meth:`examples`: a classifier expert's head on the module, or the
        suite's ``evaluate`` / ``evaluate_module`` (their ``*_examples`` forms with ``examples``)."""
        suite, budget = self.ts.suite, self.ts.budget
        if source == "classifier":
            assert classifier is not None
            module = self.module(model) if isinstance(model, dict) else model
            batches = suite.batches(t, split, budget, limit=budget.eval_examples)  # type: ignore[arg-type]
            return classifier.examples(module, batches) if examples else classifier.accuracy(module, batches)
        head = None if source == "label_words" else head
        if isinstance(model, dict) and isinstance(suite, HFSuite):  # evaluate = evaluate_module on a fresh copy
            model = self.module(model)  # reuse one
        if isinstance(model, dict):
            fn = suite.evaluate_examples if examples else suite.evaluate
        else:
            fn = suite.evaluate_module_examples if examples else suite.evaluate_module
        return fn(model, head, t, split, budget)  # type: ignore[arg-type]


def _fill(row: Row, model: StateDict | Any, ts: TaskSet, splits: Sequence[str], scorer: _Scorer,
          pick: Callable[[TaskData, Expert], tuple[HeadSource, StateDict | None, ClassifierHead | None]],
          reference: Row) -> None:
    """``row``'s scores with the heads ``pick`` gives, normalised by ``reference``'s (the experts row)."""
    t0 = time.perf_counter()
    for t, e in zip(ts.tasks, ts.experts, strict=True):
        source, head, classifier = pick(t, e)
        row.heads[t.name] = source
        for split in splits:
            score = scorer.score(model, t, split, source, head, classifier)
            row.scores.setdefault(split, {})[t.name] = score
            ref = reference.scores[split][t.name]
            row.normalized.setdefault(split, {})[t.name] = normalized_accuracy(score, ref, t.metric)
    row.time_s = time.perf_counter() - t0


def evaluate(config: TaskSet | str | os.PathLike[str] | Mapping[str, Any],
             models: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] = (),
             out: str | os.PathLike[str] | None = None, *, splits: Sequence[str] = ("test",),
             tasks: Sequence[str] | None = None, names: Sequence[str] | None = None, source: str | None = None,
             force: bool = False, plot: bool = True, allow_download: bool = False,
             progress: Callable[[str], None] | None = None) -> EvalResults:
    """Score ``models`` (merged folders, merged LoRA adapters, routed folders; none: the base and the experts only)
    on every task of ``config`` and write the report to ``out`` (module docstring).

    ``config``: a :class:`~neuromerge.tasks.TaskSet`, or a config (YAML path or mapping, :func:`load_taskset`).
    ``splits``: ``test`` and / or ``val``. ``tasks``: a subset of the tasks (configs only). ``names``: row names
    of the models (default: their folder names). ``out``: a report folder (``results.json``, ``results.md``,
    ``normalized_accuracy.png``; written atomically, refused when it exists without ``force`` or would replace an
    input). ``plot=False`` skips the PNG (skipped with a warning when matplotlib is missing). ``progress``: called
    with a line per step. Bad input (a missing model, a task without an expert, a head that does not fit) is a
    :class:`~neuromerge.errors.NeuromergeError` raised before the output is written."""
    from ..io.writer import AtomicOutput

    t_start = time.perf_counter()
    say = progress or (lambda _line: None)
    paths = [models] if isinstance(models, str | os.PathLike) else list(models)
    problems = [f"split {s!r} is not one of {', '.join(SPLITS)}" for s in splits if s not in SPLITS]
    problems += [p for p in (check_model_path(m) for m in paths) if p is not None]
    if names is not None and len(names) != len(paths):
        problems.append(f"{len(names)} names for {len(paths)} models")
    if isinstance(config, TaskSet) and tasks is not None:
        problems.append("tasks= selects the tasks of a config; give a TaskSet with the tasks wanted")
    if not splits:
        problems.append("no split to score; give test and / or val")
    opener: Callable[[], TaskSet] | None = None
    inputs: list[Any] = list(paths)
    if isinstance(config, TaskSet):
        inputs += [e.meta.get("path") for e in config.experts] + [getattr(config.suite, "path", None)]
    else:
        opener, config_problems, config_inputs = check_taskset(config, source=source, tasks=tasks,
                                                               allow_download=allow_download)
        problems = config_problems + problems
        inputs += config_inputs
    writer = None
    if not problems and out is not None:  # refusals before anything is loaded
        writer = AtomicOutput(Path(out), force=force, inputs=inputs)
    if problems:
        raise TaskError("\n".join(problems))
    splits = list(dict.fromkeys(splits))
    if isinstance(config, TaskSet):
        ts, where = config, source
    else:
        say("loading the base, the experts and their probes")
        assert opener is not None
        ts = opener()
        where = source or (None if isinstance(config, Mapping) else str(config))
    t_loaded = time.perf_counter()
    labels = _row_names(paths, names)
    classifiers = _classifiers(ts)
    heads = _Heads(classifiers)
    scorer = _Scorer(ts)

    def expert_pick(t: TaskData, e: Expert) -> tuple[HeadSource, StateDict | None, ClassifierHead | None]:
        return heads.expert_source(ts, t, e), e.head, classifiers.get(t.name)

    def model_pick(m: EvaluatedModel) -> Callable[[TaskData, Expert],
                                                   tuple[HeadSource, StateDict | None, ClassifierHead | None]]:
        def pick(t: TaskData, e: Expert) -> tuple[HeadSource, StateDict | None, ClassifierHead | None]:
            if t.name in m.heads and e.head is not None and not _scores_words(ts, t):  # label words read no head
                return "folder", m.heads[t.name], None
            return expert_pick(t, e)
        return pick

    experts_row = Row("experts", "experts", info={"reference": "each task's own expert on its own task"})
    t0 = time.perf_counter()
    for t, e in zip(ts.tasks, ts.experts, strict=True):  # each expert on its own task only
        say(f"scoring expert {t.name}")
        source, head, classifier = expert_pick(t, e)
        experts_row.heads[t.name] = source
        for split in splits:
            s = scorer.score(e.backbone, t, split, source, head, classifier)
            experts_row.scores.setdefault(split, {})[t.name] = s
            experts_row.normalized.setdefault(split, {})[t.name] = 100.0
    experts_row.time_s = time.perf_counter() - t0
    say("scoring the base")
    base_row = Row("base", "base", info={"heads": "the experts' heads"})
    _fill(base_row, ts.base, ts, splits, scorer, expert_pick, experts_row)
    rows = [experts_row, base_row]
    for path, label in zip(paths, labels, strict=True):  # one model in memory at a time
        say(f"scoring {path}")
        m = open_model(path, ts, label)
        row = Row(m.name, m.kind, m.path, info=m.info)
        _fill(row, m.module if m.module is not None else m.backbone, ts, splits, scorer, model_pick(m), experts_row)
        rows.append(row)
        del m
    results = EvalResults(
        tasks=[_task_info(t, e) for t, e in zip(ts.tasks, ts.experts, strict=True)], splits=splits, rows=rows,
        suite=ts.suite.name, source=None if where is None else str(where), seed=ts.seed,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        timings={"loading": t_loaded - t_start, "scoring": time.perf_counter() - t_loaded})
    for t in results.tasks:
        c = classifiers.get(t["name"])
        if c is not None:
            t["expert_classifier"] = c.architecture
    if writer is not None:
        from .report import write_report

        results.timings["total"] = time.perf_counter() - t_start
        with writer as tmp:
            write_report(results, tmp, plot=plot)
        results.out = str(writer.out)
    results.timings["total"] = time.perf_counter() - t_start
    return results


def _row_names(paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None) -> list[str]:
    """The models' row names: ``names``, else their folder names; a name given twice, or ``experts`` / ``base``
    (reserved), becomes the path as given."""
    out = list(names) if names is not None else [Path(p).expanduser().name or str(p) for p in paths]
    counts = {n: out.count(n) for n in out}
    return [str(p) if counts[n] > 1 or n in ("experts", "base") else n for n, p in zip(out, paths, strict=True)]


def _task_info(t: TaskData, e: Expert) -> dict[str, Any]:
    return {"name": t.name, "classes": list(t.classes), "metric": t.metric, "source": t.source,
            "sizes": {"train": len(t.train), "val": len(t.val), "test": len(t.test)},
            "expert": e.meta.get("path"), "expert_kind": e.meta.get("kind")}


__all__ = ["ROUTE_KEYS", "SPLITS", "EvalResults", "Row", "check_taskset", "evaluate", "load_taskset",
           "normalized_accuracy",
           "user_model_config"]
