"""``neuromerge search`` and ``neuromerge route build merge``: MERGE (docs/methods/spec.md §2) end to end on a
contract object.

A search config (YAML, validated by :class:`SearchRunConfig` before any weight is read) names either a suite (its
tasks and expert mode) or the user's own model (``base`` folder, ``tasks`` file, ``experts``: adapters or full
checkpoints), the operators and coefficients each component may use and the search settings. The search
(:func:`run_merge_search`; :func:`search` = ``neuromerge.search(config, out, ...)``) takes any
:class:`~neuromerge.tasks.TaskSet` (``taskset=``), or opens the config's model (:func:`open_taskset`: a ``suite:``
name through the registered provider, :func:`neuromerge.tasks.named.resolve_suite`, whose bench trains or loads
the per-task experts; a user's model through :func:`neuromerge.tasks.hf.open_user_model`, its inputs' content
digest saved as :data:`INPUTS_FILE` so resume, workers and ``route build merge`` refuse changed files), builds
:class:`~.merge_problem.MergeProblem`
(f1 = mean normalized validation accuracy with each task running its own chain, f2 = exact library bytes), runs the
surrogate-assisted NSGA-II (:func:`neuromerge.search.run_search`; locally or with PostgreSQL workers) and writes,
next to the resumable run files:

- ``pareto.json``: the non-dominated archive (score, bytes, configuration key, per-component groups),
  the reference points (static merges, all separate, all merged) and the three representative points;
- ``pareto.png`` (front with the reference points marked) and ``hypervolume.png`` (one line per seed);
- ``report.json`` (settings, timings, the representative table) and ``representative.md``.

:func:`build_routed` picks a point of a finished search (``point: high accuracy | mid | low storage | <index>``, or
``storage_mb``: the best score within that many MB), trains the 3-layer MLP router over frozen-backbone features
(≤ 1000 inputs per task, 30 epochs, lr 5e-4) and saves a routed-model folder that :func:`neuromerge.load_routed`
reloads (a transformers backbone is embedded; others need ``load_routed(..., module=)``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError, validation_lines
from ..io.output_guard import check_output
from ..numeric import FiniteFloat
from ..paths import config_dir, resolve_path
from ..routing.cli import register_builder
from ..routing.recombination import DEFAULT_PERCENTILE
from ..routing.router_fit import RouterParams
from ..textfile import existing_file, load_yaml

if TYPE_CHECKING:
    from ..tasks.contract import TaskSet
    from .merge_problem import MergeProblem

CONFIG_FILE = "search-config.json"
SEARCH_OPERATORS = ("linear", "task_arithmetic", "ties", "breadcrumbs")


#: keys of a user's model (``neuromerge.tasks.hf.UserModelConfig``) a search config may give instead of ``suite:``
#: (``tasks`` and ``seed`` are shared: the task file / the split seed for a user's model)
USER_ONLY_KEYS = ("base", "experts", "seq_len", "batch_size", "train_examples", "val_examples", "probe_steps",
                  "probe_l2")
#: keys that only a named suite reads
SUITE_ONLY_KEYS = ("quick", "mode")
#: the file of a search folder holding the user-model inputs' digest (:mod:`neuromerge.tasks.digest`)
INPUTS_FILE = "search-inputs.json"


class SearchRunConfig(BaseModel):
    """A MERGE search (``neuromerge search CONFIG``) on a named suite (``suite:``, resolved by the registered
    provider) or on a user's own model (``base:`` folder, ``tasks:`` task file, ``experts: {task: adapter folder or
    full checkpoint}``, plus :class:`~neuromerge.tasks.hf.UserModelConfig`'s optional data keys) — exactly one of
    the two; or on the :class:`~neuromerge.tasks.TaskSet` given to :func:`run_merge_search`."""

    model_config = ConfigDict(extra="forbid")

    suite: str | None = Field(None, description="bench suite: text, vision, llm (or give base/tasks/experts)")
    base: str | None = Field(None, description="your model: a Hugging Face model folder (or a cached hub id)")
    experts: dict[str, str] | None = Field(None, description="your model: task name -> PEFT LoRA adapter folder or "
                                                             "full checkpoint (≥ 2, in router order)")
    tasks: list[str] | str | None = Field(None, description="suite: in-domain tasks (all when unset); your model: "
                                                            "the task file (YAML)")
    quick: bool = Field(False, description="the suite's quick budget (smaller data, fewer steps)")
    mode: str | None = Field(None, description="expert mode (full / lora; the suite's first when unset)")
    seed: int = Field(0, ge=0, description="seed of the experts and of everything the bench draws (your model: the "
                                           "seed of the 60/20/20 splits and the probes)")
    seq_len: int | None = Field(None, ge=4, description="your model: tokens per input (default 64)")
    batch_size: int | None = Field(None, ge=1, description="your model: batch size (default 16)")
    train_examples: int | None = Field(None, ge=1, description="your model: train examples per task (probes, "
                                                               "router; default 1000)")
    val_examples: int | None = Field(None, ge=1, description="your model: validation / test examples per task "
                                                             "(default 200)")
    probe_steps: int | None = Field(None, ge=1, description="your model: probe optimizer steps (default 100)")
    probe_l2: FiniteFloat | None = Field(None, ge=0, description="your model: probe L2 penalty (default 1e-3)")
    budget: int = Field(300, description="exact evaluations per search seed")
    population: int = Field(20, description="NSGA-II population (exact evaluations per generation)")
    seeds: list[int] = Field(default_factory=lambda: [0], description="search seeds")
    ops: list[str] = Field(default_factory=lambda: ["task_arithmetic"],
                           description=f"merge operators a merged group may use: {', '.join(SEARCH_OPERATORS)}")
    coefficients: list[FiniteFloat] = Field(default_factory=lambda: [0.3], description="λ choices of the operators")
    op_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="extra parameters per operator")
    val_limit: int | None = Field(None, ge=1, description="validation examples per task (suite budget when unset)")
    quantize: bool = Field(True, description="8-bit per-channel library (False: stored in fp32)")
    percentile: FiniteFloat = Field(DEFAULT_PERCENTILE, gt=50, le=100, description="clipping percentile of the 8-bit "
                                                                                "quantizer")
    components: dict[str, str] = Field(default_factory=dict, description="component overrides: regex → name")
    storage_url: str | None = Field(None, description="SQLAlchemy URL of the Optuna RDB study the workers serve "
                                                      "(local evaluation when unset)")
    study_name: str | None = Field(None, description="study name of a distributed search (default: derived)")
    n_trees: int = Field(100, ge=1, description="trees of the random-forest surrogate")
    pool_factor: int = Field(5, ge=1, description="offspring proposed per generation / population")

    @model_validator(mode="after")
    def _check(self) -> SearchRunConfig:
        from . import SearchSettings

        problems = source_problems(self.model_dump())
        bad = [o for o in self.ops if o not in SEARCH_OPERATORS]
        if bad or not self.ops:
            problems.append(f"ops must be a non-empty subset of {', '.join(SEARCH_OPERATORS)}; got {self.ops}")
        if not self.coefficients:
            problems.append("coefficients needs at least one value")
        try:
            self.settings(SearchSettings)
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def source_problems(self) -> list[str]:
        """What is wrong with the choice of models (:func:`source_problems`)."""
        return source_problems(self.model_dump())

    @property
    def user_model(self) -> bool:
        """Whether the search runs on a user's own model (``base:``) rather than a named suite."""
        return self.base is not None

    def user_raw(self) -> dict[str, Any]:
        """The :class:`~neuromerge.tasks.hf.UserModelConfig` keys of a user-model config (unset ones omitted)."""
        keys = ("base", "tasks", "experts", *USER_ONLY_KEYS[2:], "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def label(self) -> str:
        """What the search runs on, for titles: the suite name or the base folder's name."""
        return self.suite if self.suite is not None else Path(str(self.base)).name

    def settings(self, cls: Any = None) -> Any:
        from . import SearchSettings

        return (cls or SearchSettings)(budget=self.budget, pop_size=self.population, seeds=tuple(self.seeds),
                                       n_trees=self.n_trees, pool_factor=self.pool_factor)


def source_problems(raw: Mapping[str, Any]) -> list[str]:
    """What is wrong with a search config's choice of models: exactly one of ``suite:`` or a user's model
    (``base``, ``tasks`` = task file, ``experts`` ≥ 2), and no key of the other kind (one line each)."""
    given = [k for k in USER_ONLY_KEYS if raw.get(k) is not None]
    suite, base, tasks, experts = raw.get("suite"), raw.get("base"), raw.get("tasks"), raw.get("experts")
    if suite is not None and base is not None:
        return ["give either `suite:` (a named suite) or `base:` + `tasks:` + `experts:` (your own model), not both"]
    if suite is None and base is None:
        return ["give `suite:` (a named suite: text, vision, llm) or `base:` + `tasks:` + `experts:` (your own "
                "model)"]
    out = []
    if suite is not None:
        out += [f"{k}: applies to your own model (base:), not to suite {suite!r}" for k in given]
        if isinstance(tasks, str):
            out.append("tasks: with `suite:`, a list of the suite's task names (a task file goes with `base:`)")
        return out
    if not isinstance(tasks, str):
        out.append("tasks: with `base:`, the task file (YAML) listing every expert's task data")
    if not experts:
        out.append("experts: missing (required with `base:`): {task name: adapter folder or checkpoint}")
    elif isinstance(experts, Mapping) and len(experts) < 2:
        out.append(f"experts: MERGE needs at least 2 experts, got {len(experts)}")
    out += [f"{k}: applies to a named suite only (your model's data budget: seq_len, val_examples, …)"
            for k in SUITE_ONLY_KEYS if raw.get(k) not in (None, False)]
    return out


def _config_lines(err: ValidationError) -> list[str]:
    """One line per problem of a :class:`SearchRunConfig` validation (a model-level error may hold several)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = {"extra_forbidden": "unknown key", "missing": "missing (required)"}.get(e["type"], e["msg"])
        msg = msg.removeprefix("Value error, ")
        lines += [f"{loc}: {m}" if loc else m for m in msg.splitlines()]
    return lines


def load_search_config(source: str | Path | dict[str, Any] | SearchRunConfig, *, allow_download: bool = False,
                       **overrides: Any) -> SearchRunConfig:
    """A validated :class:`SearchRunConfig` from a YAML file, a mapping or a config, with CLI ``overrides``
    (None = keep). Every problem is listed, one line each, prefixed by the file (or ``search config``), before any
    weight is read: the keys, then — for a user's model — the base, the task file and its data files, each expert
    (:func:`~neuromerge.tasks.hf.check_user_model`). A user's model's paths resolve against the config file's
    folder (a mapping: the working directory) and are returned absolute, so the saved config loads from anywhere;
    ``allow_download``: a ``base`` hub id missing from the local cache may be downloaded."""
    from ..tasks.hf import check_user_model

    path: Path | None = None
    if isinstance(source, SearchRunConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = existing_file(source, "search config", missing="not found")
        raw = load_yaml(path, "search config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    problems: list[str] = []
    cfg: SearchRunConfig | None = None
    try:
        cfg = SearchRunConfig.model_validate(raw)
    except ValidationError as err:
        problems += _config_lines(err)
        problems += [p for p in source_problems(raw) if p not in problems]  # not reached when a field failed
    found = None
    if isinstance(raw.get("base"), str) and raw.get("suite") is None:  # the user's model: every path, headers only
        found = check_user_model(raw, config_dir(path), allow_download=allow_download)
        problems += found.problems
    if problems or cfg is None:
        where = f"{path}: " if path is not None else "search config: "
        raise ConfigError("\n".join(where + p for p in problems))
    if found is not None:
        cfg = cfg.model_copy(update={"base": str(found.base), "tasks": str(found.tasks), "experts": found.experts})
    return cfg


def user_model_config(cfg: SearchRunConfig) -> Any:
    """The validated :class:`~neuromerge.tasks.hf.UserModelConfig` of a user-model search config (absolute paths)."""
    from ..tasks.hf import validate_user_model

    try:
        return validate_user_model(cfg.user_raw(), source=None)[0]
    except ConfigError as err:
        raise ConfigError(str(err).replace("config: ", "search config: ")) from None


def inputs_digest(cfg: SearchRunConfig) -> dict[str, Any] | None:
    """The content digest of a user-model config's inputs (:func:`neuromerge.tasks.digest.user_model_digest`: base,
    task file, data files, experts); None for a named suite (its fingerprint covers it)."""
    if not cfg.user_model:
        return None
    from ..tasks.digest import user_model_digest

    ucfg = user_model_config(cfg)
    return user_model_digest(ucfg.base, ucfg.tasks, ucfg.experts)


def check_inputs(folder: Path, cfg: SearchRunConfig, what: str) -> dict[str, Any] | None:
    """Refuse (one line) a user's model whose inputs changed since the search in ``folder`` started (its
    :data:`INPUTS_FILE`); returns the current digest (None for a named suite)."""
    from ..tasks.digest import digest_changes

    digest = inputs_digest(cfg)
    saved_file = folder / INPUTS_FILE
    if digest is None or not saved_file.is_file():
        return digest
    changed = digest_changes(json.loads(saved_file.read_text()), digest)
    if changed:
        raise ConfigError(f"{what}: the search in {folder} ran on other inputs; changed since: {', '.join(changed)} "
                          "(content of the files differs); use a new search folder for changed models or data")
    return digest


# ------------------------------------------------------------------------------------------------ problem
def open_taskset(cfg: SearchRunConfig, *, progress: bool = False) -> TaskSet:
    """The contract object of ``cfg``: the named suite ``cfg.suite`` (:func:`~neuromerge.tasks.named.resolve_suite`:
    its experts cached, trained on first use) or the user's model (:func:`~neuromerge.tasks.hf.open_user_model`:
    the base, the experts in their order, one probe per task; out-of-domain entries are refused — MERGE routes
    between the experts it holds)."""
    if cfg.suite is not None:
        from ..tasks.named import resolve_suite

        return resolve_suite(cfg.suite, tasks=cfg.tasks, quick=cfg.quick, seed=cfg.seed, mode=cfg.mode,
                             progress=progress)
    from ..tasks.hf import open_user_model

    ucfg = user_model_config(cfg)
    ts = open_user_model(ucfg)
    if ts.ood:
        raise ConfigError(f"task(s) {', '.join(t.name for t in ts.ood)} are out of domain (in_domain: false) in "
                          f"{ucfg.tasks}; MERGE's experts need in-domain tasks")
    return ts


def make_problem(cfg: SearchRunConfig, *, progress: bool = False, taskset: TaskSet | None = None) -> MergeProblem:
    """The :class:`~.merge_problem.MergeProblem` of ``cfg`` over ``taskset`` — or, when None, over
    :func:`open_taskset` (the named suite or the user's model of ``cfg``)."""
    from .merge_problem import MergeProblem

    ts = taskset if taskset is not None else open_taskset(cfg, progress=progress)
    return MergeProblem.from_taskset(ts, ops=cfg.ops, coefficients=cfg.coefficients, op_params=cfg.op_params,
                                     val_limit=cfg.val_limit, quantize=cfg.quantize, percentile=cfg.percentile,
                                     component_overrides=cfg.components)


def fingerprint(cfg: SearchRunConfig, problem: Any, digest: dict[str, Any] | None = None) -> str:
    """What the objectives depend on: suite fingerprint, tasks, budget, expert scores, operators, library format.
    A user's model: instead of the base path and the (unmeasured) expert scores, the content ``digest`` of its
    inputs (:func:`inputs_digest`, computed when None), its data budget and the tasks' split fingerprints — no
    absolute path, so workers on other machines with the same files agree."""
    doc = {"suite": problem.suite.fingerprint(), "tasks": problem.task_names, "quick": cfg.quick, "mode": cfg.mode,
           "seed": cfg.seed, "experts": [e.test_score for e in problem.experts], "ops": cfg.ops,
           "coefficients": cfg.coefficients, "op_params": cfg.op_params, "val_limit": cfg.val_limit,
           "quantize": cfg.quantize, "percentile": cfg.percentile, "components": cfg.components}
    if cfg.user_model:
        digest = inputs_digest(cfg) if digest is None else digest
        suite = {k: v for k, v in problem.suite.fingerprint().items() if k != "base"}
        budget = {k: getattr(cfg, k) for k in USER_ONLY_KEYS[2:]}
        doc.update(suite=suite, experts=digest, budget=budget,
                   splits=[t.fingerprint for t in problem.tasks])
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def study_name(cfg: SearchRunConfig, fp: str) -> str:
    return cfg.study_name or f"neuromerge-merge-{cfg.suite or 'user'}-{fp}"


# ------------------------------------------------------------------------------------------------ search
def run_merge_search(cfg: SearchRunConfig, out: str | Path, *, resume: bool = False, progress: bool | None = None,
                     problem: Any = None, taskset: TaskSet | None = None) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg`` into ``out``; returns the report (also written as ``report.json``).
    The problem: ``problem`` as given, else :func:`make_problem` over ``taskset`` (any contract object with its
    experts), else over :func:`open_taskset` (the named suite or the user's model of ``cfg``). On ``resume``, the
    saved config must equal ``cfg`` and — a user's model — the inputs' content digest (:data:`INPUTS_FILE`) the
    current files'; experts without a test score (a user's) are scored on their test split for the table."""
    from . import non_dominated, plot_front, plot_hypervolume, run_search
    from .archive import write_json
    from .encoding import Configuration as SearchConfiguration
    from .merge_problem import format_table, representative_points, representative_table

    out = Path(out)
    show = sys.stderr.isatty() if progress is None else progress
    if out.exists() and not resume and any(out.iterdir()):
        raise ConfigError(f"search folder {out} exists and is not empty; pass --resume to continue it")
    if resume and not (out / CONFIG_FILE).exists():
        raise ConfigError(f"nothing to resume in {out} (no {CONFIG_FILE})")
    digest = None
    if resume:
        try:
            saved = SearchRunConfig.model_validate(json.loads((out / CONFIG_FILE).read_text()))
        except (ValidationError, ValueError):
            raise ConfigError(f"{out / CONFIG_FILE} is not a search config of this version") from None
        if saved.model_dump(mode="json") != cfg.model_dump(mode="json"):
            raise ConfigError(f"{out} holds a search with another config; resume it with the same config")
    if taskset is None and problem is None:
        digest = check_inputs(out, cfg, "resume") if resume else inputs_digest(cfg)
    if not resume and cfg.user_model:  # the search folder must not be (inside) the model it reads
        check_output(out, [cfg.base, cfg.tasks, *(cfg.experts or {}).values()])
    t0 = time.perf_counter()
    problem = problem or make_problem(cfg, progress=show, taskset=taskset)
    fp = fingerprint(cfg, problem, digest)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, cfg.model_dump(mode="json"))
    if digest is not None:
        write_json(out / INPUTS_FILE, digest)
    from . import SearchProblem

    sp = SearchProblem(problem.space, problem.evaluate if cfg.storage_url is None else None, problem.storage, fp)
    settings = cfg.settings()
    bar = _progress_bar(show, settings.budget * len(settings.seeds))
    t_search = time.perf_counter()
    try:
        result = run_search(sp, out, settings, resume=resume, storage_url=cfg.storage_url,
                            study_name=study_name(cfg, fp) if cfg.storage_url else None,
                            on_generation=lambda r: bar(r))
    finally:
        bar(None)
    search_s = time.perf_counter() - t_search
    archive = non_dominated(result.archive)
    rep = representative_points(archive)
    problem.measure_expert_tests()  # a user's experts come unscored: the table normalizes by their test accuracy
    table = representative_table(problem, archive)
    for row in table:  # the same points on the test split, normalized by the experts' test accuracy (as the bench)
        row["test_score"] = problem.test_score(SearchConfiguration.from_key(row["config"]))
    # the static merges of the space and "all separate" (evaluated once, in the table)
    refs = {r["row"]: (r["score"], r["bytes"]) for r in table if r["row"] not in rep}
    plot_front(archive, out / "pareto.png", marks={**refs, **{f"{k} (front)": (e.f1, e.f2) for k, e in rep.items()}},
               title=f"MERGE on {cfg.label()}: mean normalized val. accuracy vs library bytes")
    plot_hypervolume({s: r.history for s, r in result.seeds.items()}, out / "hypervolume.png",
                     title=f"MERGE on {cfg.label()}: hypervolume per generation")
    space = problem.space
    front = [{"index": i, "score": e.f1, "bytes": e.f2, "config": e.config.key,
              "groups": _groups(problem, e.config)} for i, e in enumerate(archive)]
    write_json(out / "pareto.json", {
        "tasks": problem.task_names, "components": list(space.components), "ops": list(problem.ops),
        "coefficients": list(problem.coefficients), "front": front,
        "reference_points": {k: {"score": f1, "bytes": f2} for k, (f1, f2) in refs.items()},
        "representative": {k: {"score": e.f1, "bytes": e.f2, "config": e.config.key,
                               "quant_error": problem.library(e.config).quant_report()} for k, e in rep.items()},
    })
    (out / "representative.md").write_text(format_table(table) + "\n", encoding="utf-8")
    report = {
        "suite": cfg.suite, "base": cfg.base, "quick": cfg.quick, "tasks": problem.task_names, "fingerprint": fp,
        "experts": {t: {"val": v, "test": e.test_score} for t, v, e in
                    zip(problem.task_names, problem.expert_val(), problem.experts, strict=True)},
        "settings": settings.to_dict(), "storage_url": _redacted(cfg.storage_url),
        "evaluations": sum(len(r.evaluations) for r in result.seeds.values()),
        "front_size": len(archive), "hypervolume": {str(s): r.history[-1].hypervolume for s, r in result.seeds.items()},
        "stop_reason": {str(s): r.stop_reason for s, r in result.seeds.items()},
        "representative_table": table, "timings_s": {"search": search_s, "total": time.perf_counter() - t0},
        "dominates_static": _dominates(archive, refs),
    }
    write_json(out / "report.json", report)
    return report


def search(config: str | Path | dict[str, Any] | SearchRunConfig, out: str | Path, *, resume: bool = False,
           progress: bool | None = False, taskset: TaskSet | None = None, allow_download: bool = False,
           **overrides: Any) -> dict[str, Any]:
    """``neuromerge search CONFIG -o OUT`` from Python (``neuromerge.search(config, out, ...)``): ``config`` a YAML
    file, a mapping (relative paths: the working directory) or a :class:`SearchRunConfig`; ``overrides`` any config
    key (``budget=``, ``population=``, ``seeds=[0, 1]``, ``storage_url=``…); ``taskset``: run on this contract
    object instead of the config's suite / model. Returns the report (``report.json``); the search folder holds
    ``pareto.json``, the plots and the resumable state (see :func:`run_merge_search`)."""
    cfg = load_search_config(config, allow_download=allow_download, **overrides)
    if not resume and isinstance(config, str | Path):
        check_output(out, [config])
    return run_merge_search(cfg, out, resume=resume, progress=progress, taskset=taskset)


def _dominates(archive: list[Any], refs: dict[str, tuple[float, int]]) -> dict[str, bool]:
    """Per static merge: does a front point score at least as high within the same storage (weakly better)?"""
    return {k: any(e.f2 <= f2 and e.f1 >= f1 for e in archive)
            for k, (f1, f2) in refs.items() if k.startswith("static")}


def _groups(problem: Any, config: Any) -> dict[str, list[list[str]]]:
    from . import groups

    names = problem.task_names
    return {c: [[names[i] for i in g] for g in groups(lab)]
            for c, lab in zip(problem.space.components, config.partitions, strict=True)}


def _redacted(url: str | None) -> str | None:
    if url is None:
        return None
    from .distributed import redact

    return redact(url)


def _progress_bar(show: bool, total: int) -> Any:
    """A callback for ``on_generation`` that advances a tqdm bar by the new exact evaluations (None closes it)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="search evaluations", disable=not show, leave=False)
    last: dict[int, int] = {}

    def update(res: Any) -> None:
        if res is None:
            bar.close()
            return
        n = res.history[-1].n_evaluated
        bar.update(max(0, n - last.get(res.seed, 0)))
        last[res.seed] = n
        bar.set_postfix_str(f"seed {res.seed} gen {res.history[-1].generation} hv {res.history[-1].hypervolume:.3g}")

    return update


def run_search_worker(cfg: SearchRunConfig, *, max_idle_s: float | None = None, wait_s: float = 120.0,
                      taskset: TaskSet | None = None) -> int:
    """Serve the exact evaluations of ``cfg``'s distributed search (its ``storage_url``; the problem over
    ``taskset``, else :func:`open_taskset`: the named suite or the user's model, rebuilt from the same config);
    returns the count. The study refuses a worker whose fingerprint differs (:func:`fingerprint`: for a user's
    model, the files' content digest)."""
    from . import run_worker

    if cfg.storage_url is None:
        raise ConfigError("a search worker needs `storage_url` (the study's database) in the config or --storage")
    digest = inputs_digest(cfg) if taskset is None else None
    problem = make_problem(cfg, taskset=taskset)
    fp = fingerprint(cfg, problem, digest)
    return run_worker(cfg.storage_url, study_name(cfg, fp), problem.evaluate, fingerprint=fp, wait_s=wait_s,
                      max_idle_s=max_idle_s)


# ------------------------------------------------------------------------------------------------ routed model
class RoutedMergeParams(RouterParams):
    """``neuromerge route build merge --config``: which point of which search, and the router."""

    search: str = Field(description="folder of a finished `neuromerge search`")
    point: str | int | None = Field(None, description="'high accuracy', 'mid', 'low storage' or a front index")
    storage_mb: FiniteFloat | None = Field(None, gt=0, description="best score whose library fits in this many MB")
    feature_source: Literal["auto", "embeddings", "final"] = "embeddings"
    embed_base: bool = Field(True, description="store the backbone in the folder (transformers backbones; others "
                                               "are given to load_routed(..., module=))")
    seed: int = 0

    @model_validator(mode="after")
    def _one_choice(self) -> RoutedMergeParams:
        if (self.point is None) == (self.storage_mb is None):
            raise ValueError("give exactly one of `point` (a representative name or front index) and `storage_mb`")
        return self


def choose_point(pareto: dict[str, Any], point: str | int | None, storage_mb: float | None) -> dict[str, Any]:
    """The front entry a user asked for (see :class:`RoutedMergeParams`)."""
    front = pareto["front"]
    if storage_mb is not None:
        fits = [e for e in front if e["bytes"] <= storage_mb * 1e6]
        if not fits:
            smallest = min(e["bytes"] for e in front) / 1e6
            raise ConfigError(f"no Pareto point fits in {storage_mb} MB (the smallest needs {smallest:.2f} MB)")
        return max(fits, key=lambda e: (e["score"], -e["bytes"]))
    if isinstance(point, int) or (isinstance(point, str) and point.isdigit()):
        i = int(point)
        if not 0 <= i < len(front):
            raise ConfigError(f"point {i} is out of range: the front has {len(front)} points (0..{len(front) - 1})")
        return front[i]
    rep = pareto["representative"]
    if point not in rep:
        raise ConfigError(f"unknown point {point!r}: use a front index or one of {', '.join(rep)}")
    key = rep[point]["config"]
    return next(e for e in front if e["config"] == key)


def build_routed(params: dict[str, Any], out: Path, *, force: bool = False, source: Path | None = None,
                 taskset: TaskSet | None = None) -> Path:
    """Builder of ``neuromerge route build merge`` (see the module docstring); ``source``: the config file, a
    relative ``search`` folder resolves against its folder (:mod:`neuromerge.paths`); ``taskset``: the contract
    object the search ran on (default: :func:`open_taskset` of the search's saved config — its named suite, or the
    user's model from the absolute paths it recorded, refused when the files changed since the search)."""
    from ..routing.recombination import ChainRoutedModel, Configuration, save_chain_routed
    from ..routing.router_fit import fit_router, routing_kwargs
    from .encoding import Configuration as SearchConfiguration

    try:
        p = RoutedMergeParams.model_validate(params)
    except ValidationError as err:  # every problem, one line each
        raise ConfigError("\n".join(validation_lines(err, "route build merge: "))) from None
    folder = resolve_path(p.search, config_dir(source))[0] if source is not None else Path(p.search)
    if not (folder / "pareto.json").exists():
        raise ConfigError(f"{folder} holds no finished search (no pareto.json); run `neuromerge search` first")
    if Path(out).exists() and not force:
        raise ConfigError(f"output folder {out} exists; pass --force to replace it")
    check_output(out, [folder])  # --force must not replace the search it reads
    cfg = load_search_config(folder / CONFIG_FILE)  # a user's model: absolute paths, checked (one line each)
    if cfg.user_model:
        check_output(out, [cfg.base, cfg.tasks, *(cfg.experts or {}).values()])
    entry = choose_point(json.loads((folder / "pareto.json").read_text()), p.point, p.storage_mb)
    if taskset is None:
        check_inputs(folder, cfg, "route build merge")
    problem = make_problem(cfg, taskset=taskset)
    lib = problem.library(Configuration.from_search(problem.space, SearchConfiguration.from_key(entry["config"])))
    suite = problem.suite
    backbone = suite.module(problem.base)
    fitted = fit_router(suite, backbone, problem.tasks, problem.suite_budget, p, p.seed)
    kwargs = routing_kwargs(suite, fitted.source)
    model = ChainRoutedModel(backbone, lib, fitted.router, **kwargs)
    extra = {"search": str(folder), "point": entry, "suite": cfg.suite, "router": fitted.meta,
             "heads": "per task, from the suite's experts"}
    if cfg.user_model:
        extra.update(base=cfg.base, task_file=cfg.tasks, experts=cfg.experts,
                     heads="per task: a linear probe on the expert's final features (label words: none)")
    return save_chain_routed(model, out, embed_base=p.embed_base and hasattr(backbone, "save_pretrained"), extra=extra,
                             force=force, heads={t.name: e.head for t, e in zip(problem.tasks, problem.experts,
                                                                                 strict=True)},
                             router_validation=fitted.validation)


register_builder("merge", build_routed)
