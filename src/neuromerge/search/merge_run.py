"""``neuromerge search`` and ``neuromerge route build merge``: MERGE (METHODS.md §2) end to end on a contract object.

A search config (YAML, validated by :class:`SearchRunConfig` before any weight is read) names the suite, its tasks
and expert mode, the operators and coefficients each component may use and the search settings. The search
(:func:`run_merge_search`) takes any :class:`~neuromerge.tasks.TaskSet` (a suite or a user's model with its
experts; ``taskset=``), or resolves the config's ``suite:`` name through the registered provider
(:func:`neuromerge.tasks.named.resolve_suite`: the bench trains or loads the suite's per-task experts), builds
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
from ..textfile import load_yaml

if TYPE_CHECKING:
    from ..tasks.contract import TaskSet
    from .merge_problem import MergeProblem

CONFIG_FILE = "search-config.json"
SEARCH_OPERATORS = ("linear", "task_arithmetic", "ties", "breadcrumbs")


class SearchRunConfig(BaseModel):
    """A MERGE search (``neuromerge search CONFIG``) on a named suite (``suite:``, resolved by the registered
    provider), or on the :class:`~neuromerge.tasks.TaskSet` given to :func:`run_merge_search`."""

    model_config = ConfigDict(extra="forbid")

    suite: str = Field(description="bench suite: text, vision, llm")
    tasks: list[str] | None = Field(None, description="in-domain tasks (all of the suite's when unset)")
    quick: bool = Field(False, description="the suite's quick budget (smaller data, fewer steps)")
    mode: str | None = Field(None, description="expert mode (full / lora; the suite's first when unset)")
    seed: int = Field(0, ge=0, description="seed of the experts and of everything the bench draws")
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

        bad = [o for o in self.ops if o not in SEARCH_OPERATORS]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {', '.join(SEARCH_OPERATORS)}; got {self.ops}")
        if not self.coefficients:
            raise ValueError("coefficients needs at least one value")
        try:
            self.settings(SearchSettings)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def settings(self, cls: Any = None) -> Any:
        from . import SearchSettings

        return (cls or SearchSettings)(budget=self.budget, pop_size=self.population, seeds=tuple(self.seeds),
                                       n_trees=self.n_trees, pool_factor=self.pool_factor)


def load_search_config(source: str | Path | dict[str, Any], **overrides: Any) -> SearchRunConfig:
    """A validated :class:`SearchRunConfig` from a YAML file or a mapping, with CLI ``overrides`` (None = keep)."""
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"search config {path} is a folder, expected a YAML file")
        if not path.is_file():
            raise ConfigError(f"search config {path} not found")
        raw = load_yaml(path, "search config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SearchRunConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        raise ConfigError(f"invalid search config: {where}: {first['msg']}") from None


# ------------------------------------------------------------------------------------------------ problem
def make_problem(cfg: SearchRunConfig, *, progress: bool = False, taskset: TaskSet | None = None) -> MergeProblem:
    """The :class:`~.merge_problem.MergeProblem` of ``cfg`` over ``taskset`` — or, when None, over the named suite
    ``cfg.suite`` (:func:`~neuromerge.tasks.named.resolve_suite`: its experts cached, trained on first use)."""
    from ..tasks.named import resolve_suite
    from .merge_problem import MergeProblem

    ts = taskset if taskset is not None else resolve_suite(cfg.suite, tasks=cfg.tasks, quick=cfg.quick,
                                                           seed=cfg.seed, mode=cfg.mode, progress=progress)
    return MergeProblem.from_taskset(ts, ops=cfg.ops, coefficients=cfg.coefficients, op_params=cfg.op_params,
                                     val_limit=cfg.val_limit, quantize=cfg.quantize, percentile=cfg.percentile,
                                     component_overrides=cfg.components)


def fingerprint(cfg: SearchRunConfig, problem: Any) -> str:
    """What the objectives depend on: suite fingerprint, tasks, budget, expert scores, operators, library format."""
    doc = {"suite": problem.suite.fingerprint(), "tasks": problem.task_names, "quick": cfg.quick, "mode": cfg.mode,
           "seed": cfg.seed, "experts": [e.test_score for e in problem.experts], "ops": cfg.ops,
           "coefficients": cfg.coefficients, "op_params": cfg.op_params, "val_limit": cfg.val_limit,
           "quantize": cfg.quantize, "percentile": cfg.percentile, "components": cfg.components}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def study_name(cfg: SearchRunConfig, fp: str) -> str:
    return cfg.study_name or f"neuromerge-merge-{cfg.suite}-{fp}"


# ------------------------------------------------------------------------------------------------ search
def run_merge_search(cfg: SearchRunConfig, out: str | Path, *, resume: bool = False, progress: bool | None = None,
                     problem: Any = None, taskset: TaskSet | None = None) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg`` into ``out``; returns the report (also written as ``report.json``).
    The problem: ``problem`` as given, else :func:`make_problem` over ``taskset`` (any contract object with its
    experts), else over the named suite ``cfg.suite``."""
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
    if resume:
        saved = json.loads((out / CONFIG_FILE).read_text())
        if saved != cfg.model_dump(mode="json"):
            raise ConfigError(f"{out} holds a search with another config; resume it with the same config")
    t0 = time.perf_counter()
    problem = problem or make_problem(cfg, progress=show, taskset=taskset)
    fp = fingerprint(cfg, problem)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, cfg.model_dump(mode="json"))
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
    table = representative_table(problem, archive)
    for row in table:  # the same points on the test split, normalized by the experts' test accuracy (as the bench)
        row["test_score"] = problem.test_score(SearchConfiguration.from_key(row["config"]))
    # the static merges of the space and "all separate" (evaluated once, in the table)
    refs = {r["row"]: (r["score"], r["bytes"]) for r in table if r["row"] not in rep}
    plot_front(archive, out / "pareto.png", marks={**refs, **{f"{k} (front)": (e.f1, e.f2) for k, e in rep.items()}},
               title=f"MERGE on {cfg.suite}: mean normalized val. accuracy vs library bytes")
    plot_hypervolume({s: r.history for s, r in result.seeds.items()}, out / "hypervolume.png",
                     title=f"MERGE on {cfg.suite}: hypervolume per generation")
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
        "suite": cfg.suite, "quick": cfg.quick, "tasks": problem.task_names, "fingerprint": fp,
        "settings": settings.to_dict(), "storage_url": _redacted(cfg.storage_url),
        "evaluations": sum(len(r.evaluations) for r in result.seeds.values()),
        "front_size": len(archive), "hypervolume": {str(s): r.history[-1].hypervolume for s, r in result.seeds.items()},
        "stop_reason": {str(s): r.stop_reason for s, r in result.seeds.items()},
        "representative_table": table, "timings_s": {"search": search_s, "total": time.perf_counter() - t0},
        "dominates_static": _dominates(archive, refs),
    }
    write_json(out / "report.json", report)
    return report


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
    ``taskset``, else the named suite); returns the count."""
    from . import run_worker

    if cfg.storage_url is None:
        raise ConfigError("a search worker needs `storage_url` (the study's database) in the config or --storage")
    problem = make_problem(cfg, taskset=taskset)
    fp = fingerprint(cfg, problem)
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
    object the search ran on (default: the search config's named suite)."""
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
    cfg = load_search_config(json.loads((folder / CONFIG_FILE).read_text()))
    entry = choose_point(json.loads((folder / "pareto.json").read_text()), p.point, p.storage_mb)
    problem = make_problem(cfg, taskset=taskset)
    lib = problem.library(Configuration.from_search(problem.space, SearchConfiguration.from_key(entry["config"])))
    suite = problem.suite
    backbone = suite.module(problem.base)
    fitted = fit_router(suite, backbone, problem.tasks, problem.suite_budget, p, p.seed)
    kwargs = routing_kwargs(suite, fitted.source)
    model = ChainRoutedModel(backbone, lib, fitted.router, **kwargs)
    extra = {"search": str(folder), "point": entry, "suite": cfg.suite, "router": fitted.meta,
             "heads": "per task, from the suite's experts"}
    return save_chain_routed(model, out, embed_base=p.embed_base and hasattr(backbone, "save_pretrained"), extra=extra,
                             force=force, heads={t.name: e.head for t, e in zip(problem.tasks, problem.experts,
                                                                                 strict=True)},
                             router_validation=fitted.validation)


register_builder("merge", build_routed)
