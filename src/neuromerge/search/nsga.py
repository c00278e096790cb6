"""Surrogate-assisted NSGA-II over MERGE configurations: pymoo's NSGA2 (ask/tell) + a scikit-learn random forest.

docs/methods/spec.md §2 (MERGE, arXiv 2602.06552), reconstruction step 5: "initial population (random + 'all merged' +
'all separate'), NSGA-II offspring pre-screened by a random-forest surrogate of f1, best-predicted evaluated
exactly, surrogate refit, stop at a budget of exact evaluations; report the non-dominated archive, its hypervolume
per generation".

One generation (the coordinator; evaluation itself is delegated to a backend — in process, or Optuna workers):

1. ``algo.ask()`` — pymoo's NSGA-II (Deb et al. 2002) mates the current population: binary tournament on
   rank/crowding, SBX crossover and polynomial mutation on the integer genotype (rounded, the integer recipe of
   the pymoo docs), then :class:`CanonicalRepair` maps every child to its canonical encoding and pymoo drops
   duplicates. ``pool_factor · pop_size`` children are asked for.
2. Children already evaluated by this seed's search are dropped. A ``RandomForestRegressor`` fitted on every
   exact evaluation so far (features: :meth:`SearchSpace.features`, per-component task co-membership) predicts
   ``f1`` of the others; their ``f2`` is exact (cheap). The ``n = min(pop_size, budget left)`` best-predicted
   are kept — best in the NSGA-II sense: pymoo's rank-and-crowding survival on ``(-f1_pred, f2)``.
3. The kept children are evaluated exactly (through the evaluation cache) and ``algo.tell()`` them: NSGA-II's
   environmental selection picks the next population from parents ∪ kept children.
4. The archive (non-dominated set of all exact evaluations of the seed) and its hypervolume are recorded.

Determinism: every random choice derives from the seed (pymoo's ``random_state = default_rng(seed)``, the initial
population from ``default_rng([seed, 0])``, the forest and tie-breaks of generation g from ``[seed, g]``). Results
are fed back in a fixed order (the order configurations were proposed), never in arrival order, so a distributed
search gives the same archive as a local one. Evaluations served by the cache count against the budget like
fresh ones, so a resumed search is a deterministic replay of the interrupted one: it re-proposes the same
configurations, finds the paid-for ones in the cache, and continues with identical state (tested).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from .archive import Evaluation, EvaluationCache, hypervolume, non_dominated, write_json
from .encoding import Configuration, SearchSpace
from .problem import SearchProblem, SearchSettings

META_FILE = "search.json"
CACHE_FILE = "evaluations.jsonl"
FORMAT = 1


@dataclass(frozen=True)
class GenerationRecord:
    """State after one generation (generation 0 = the initial population)."""

    generation: int
    n_evaluated: int
    n_new: int
    hypervolume: float
    archive_size: int
    best_f1: float
    min_f2: int


@dataclass
class SeedResult:
    """One independent run: its exact evaluations in proposal order, archive, per-generation history."""

    seed: int
    evaluations: list[Evaluation]
    archive: list[Evaluation]
    history: list[GenerationRecord]
    stop_reason: str  # "budget" or "exhausted" (no new configuration for `max_stale` generations)


@dataclass
class SearchResult:
    """All seeds, the archive of their union, and the hypervolume reference used."""

    seeds: dict[int, SeedResult]
    archive: list[Evaluation]
    storage_ref: float
    score_ref: float
    run_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """Evaluates configurations exactly; yields ``(config, f1)`` as results arrive (any order)."""

    def evaluate(self, configs: Sequence[Configuration]) -> Iterator[tuple[Configuration, float]]: ...

    def close(self) -> None: ...


class LocalBackend:
    """In-process evaluation, one configuration after the other (the default; needs no server)."""

    def __init__(self, problem: SearchProblem) -> None:
        self.problem = problem

    def evaluate(self, configs: Sequence[Configuration]) -> Iterator[tuple[Configuration, float]]:
        for cfg in configs:
            yield cfg, self.problem.score(cfg)

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------
# pymoo pieces
# ---------------------------------------------------------------------------------------------------------------


def _pymoo_problem(space: SearchSpace) -> Any:
    from pymoo.core.problem import Problem

    class PartitionProblem(Problem):
        """Integer genotype of :class:`SearchSpace`; objectives ``(-f1, f2)`` are supplied through ``tell``."""

        def __init__(self) -> None:
            super().__init__(n_var=space.n_var, n_obj=2, xl=np.zeros(space.n_var), xu=space.upper.astype(float),
                             vtype=int)

    return PartitionProblem()


def _canonical_repair(space: SearchSpace) -> Any:
    from pymoo.core.repair import Repair

    class CanonicalRepair(Repair):
        """Round, clip and canonicalize each child (partitions → restricted growth strings)."""

        def _do(self, problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
            return np.stack([space.canonical(x) for x in X]) if len(X) else X

    return CanonicalRepair()


def make_algorithm(space: SearchSpace, settings: SearchSettings, seed: int, initial: Sequence[Configuration]) -> Any:
    """pymoo NSGA2 on the integer genotype, set up for ask/tell (no termination: the coordinator stops it)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.termination import NoTermination
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    algo = NSGA2(
        pop_size=settings.pop_size,
        n_offsprings=settings.pool_factor * settings.pop_size,
        sampling=np.stack([space.encode(c) for c in initial]),
        crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        repair=_canonical_repair(space),
        eliminate_duplicates=True,
        seed=seed,
    )
    algo.setup(_pymoo_problem(space), termination=NoTermination(), verbose=False)
    return algo


def initial_population(space: SearchSpace, pop_size: int, rng: np.random.Generator) -> list[Configuration]:
    """"All merged", "all separate", the other static merges of the space (all merged with each further operator
    and coefficient; as many as fit), then distinct random configurations up to ``pop_size``. Seeding every static
    merge makes the archive hold each of them, so the front is compared with them on equal terms."""
    statics = space.static_merges()
    out = {c.key: c for c in (statics[0], space.all_separate(), *statics[1:pop_size - 1])}
    for _ in range(1000 * pop_size):
        if len(out) >= pop_size:
            break
        c = space.random(rng)
        out.setdefault(c.key, c)
    if len(out) < pop_size:
        raise ConfigError(f"search: could not draw {pop_size} distinct configurations (space has {space.size})")
    return list(out.values())


def prescreen(space: SearchSpace, evaluated: Sequence[Evaluation], candidates: Sequence[Configuration],
              f2: Sequence[int], n: int, n_trees: int, rng: np.random.Generator) -> list[int]:
    """Indices (ascending) of the ``n`` candidates kept by the random-forest surrogate of ``f1``.

    The forest is fitted on the exact evaluations; candidates are ranked by pymoo's rank-and-crowding survival on
    ``(-f1_pred, f2)`` (non-dominated fronts first, then crowding distance).
    """
    if len(candidates) <= n:
        return list(range(len(candidates)))
    from pymoo.core.population import Population
    from pymoo.operators.survival.rank_and_crowding import RankAndCrowding
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(n_estimators=n_trees, random_state=int(rng.integers(2**31 - 1)), n_jobs=1)
    forest.fit(space.features([e.config for e in evaluated]), np.array([e.f1 for e in evaluated]))
    pred = forest.predict(space.features(candidates))
    pop = Population.new("X", np.arange(len(candidates))[:, None], "F",
                         np.column_stack([-pred, np.asarray(f2, dtype=np.float64)]))
    idx = RankAndCrowding().do(_pymoo_problem(space), pop, n_survive=n, random_state=rng, return_indices=True)
    return sorted(int(i) for i in idx)


# ---------------------------------------------------------------------------------------------------------------
# the coordinator
# ---------------------------------------------------------------------------------------------------------------


class _Coordinator:
    """Serves exact evaluations through the cache and the backend, and memoizes ``f2``."""

    def __init__(self, problem: SearchProblem, cache: EvaluationCache, backend: Backend) -> None:
        self.problem, self.cache, self.backend = problem, cache, backend
        self._bytes: dict[str, int] = {}

    def bytes(self, config: Configuration) -> int:
        if config.key not in self._bytes:
            self._bytes[config.key] = self.problem.bytes(config)
        return self._bytes[config.key]

    def obtain(self, configs: Sequence[Configuration]) -> list[Evaluation]:
        missing = list({c.key: c for c in configs if c.key not in self.cache}.values())
        if missing:
            for cfg, f1 in self.backend.evaluate(missing):
                self.cache.put(cfg, f1, self.bytes(cfg))
        return [Evaluation(c, self.cache.get(c.key), self.bytes(c)) for c in configs]


def _objectives(evals: Sequence[Evaluation]) -> np.ndarray:
    return np.array([[-e.f1, float(e.f2)] for e in evals], dtype=np.float64)


def _record(gen: int, evaluated: dict[str, Evaluation], n_new: int, storage_ref: float,
            score_ref: float) -> GenerationRecord:
    front = non_dominated(evaluated.values())
    return GenerationRecord(
        generation=gen, n_evaluated=len(evaluated), n_new=n_new,
        hypervolume=hypervolume(front, storage_ref, score_ref), archive_size=len(front),
        best_f1=max(e.f1 for e in front), min_f2=min(e.f2 for e in front),
    )


def run_seed(coord: _Coordinator, settings: SearchSettings, seed: int, storage_ref: float,
             on_generation: Callable[[SeedResult], None] | None = None) -> SeedResult:
    """One independent surrogate-assisted NSGA-II run (see the module docstring)."""
    space = coord.problem.space
    algo = make_algorithm(space, settings, seed,
                          initial_population(space, settings.pop_size, np.random.default_rng([seed, 0])))
    evaluated: dict[str, Evaluation] = {}
    result = SeedResult(seed, [], [], [], "budget")

    def tell(pop: Any, evals: list[Evaluation], gen: int) -> None:
        pop.set("F", _objectives(evals))
        algo.tell(infills=pop)
        for e in evals:
            evaluated.setdefault(e.config.key, e)
        result.history.append(_record(gen, evaluated, len(evals), storage_ref, settings.score_ref))
        result.evaluations = list(evaluated.values())
        result.archive = non_dominated(result.evaluations)
        if on_generation is not None:
            on_generation(result)

    pop = algo.ask()
    tell(pop, coord.obtain([space.decode(x) for x in pop.get("X")]), 0)
    gen, stale = 0, 0
    while len(evaluated) < settings.budget:
        gen += 1
        off = algo.ask()
        configs = [space.decode(x) for x in off.get("X")] if off is not None else []
        fresh = [i for i, c in enumerate(configs) if c.key not in evaluated]
        if not fresh:
            stale += 1
            if off is None or stale >= settings.max_stale or len(evaluated) >= space.size:
                result.stop_reason = "exhausted"
                break
            continue
        stale = 0
        n = min(settings.pop_size, settings.budget - len(evaluated))
        cands = [configs[i] for i in fresh]
        keep = prescreen(space, list(evaluated.values()), cands, [coord.bytes(c) for c in cands], n,
                         settings.n_trees, np.random.default_rng([seed, gen]))
        chosen = [fresh[i] for i in keep]
        tell(off[chosen], coord.obtain([configs[i] for i in chosen]), gen)
    return result


# ---------------------------------------------------------------------------------------------------------------
# run folder, entry points
# ---------------------------------------------------------------------------------------------------------------


def _meta(problem: SearchProblem, settings: SearchSettings) -> dict[str, Any]:
    return {"format": FORMAT, "space": problem.space.to_dict(), "fingerprint": problem.fingerprint,
            "settings": settings.to_dict()}


def _open_run_dir(run_dir: Path, meta: dict[str, Any], resume: bool) -> None:
    path = run_dir / META_FILE
    if path.exists():
        if not resume:
            raise ConfigError(f"search: {run_dir} already holds a search; resume it (resume=True) or use another "
                              "folder")
        old = json.loads(path.read_text())
        for name in ("format", "space", "fingerprint", "settings"):
            if old.get(name) != meta[name]:
                raise ConfigError(f"search: {run_dir} holds a search with another {name} "
                                  f"({json.dumps(old.get(name))[:200]}); cannot resume with this one")
        return
    if resume:
        raise ConfigError(f"search: nothing to resume in {run_dir} (no {META_FILE})")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, meta)


def _save_seed(run_dir: Path, res: SeedResult) -> None:
    d = run_dir / f"seed_{res.seed}"
    d.mkdir(exist_ok=True)
    write_json(d / "archive.json", [e.to_dict() for e in res.archive])
    write_json(d / "history.json", [asdict(h) for h in res.history])
    write_json(d / "state.json", {"generation": res.history[-1].generation, "n_evaluated": len(res.evaluations),
                                  "stop_reason": res.stop_reason})


def run_search(problem: SearchProblem, run_dir: str | Path | None = None,
               settings: SearchSettings | None = None, *, resume: bool = False,
               storage_url: str | None = None, study_name: str | None = None, poll_s: float = 0.1,
               batch_timeout_s: float | None = None,
               on_generation: Callable[[SeedResult], None] | None = None) -> SearchResult:
    """Run (or with ``resume=True`` continue) a surrogate-assisted NSGA-II search, one run per seed.

    ``run_dir`` (optional) receives ``search.json`` (space, fingerprint, settings), ``evaluations.jsonl`` (the
    evaluation cache, shared by the seeds), ``seed_<s>/{archive,history,state}.json`` after every generation and,
    at the end, ``archive.json`` (union of the seeds) and ``result.json``. Without ``storage_url`` evaluation runs
    in process; with ``storage_url`` (an SQLAlchemy URL such as ``postgresql://user@host:5432/db``) and
    ``study_name`` the exact evaluations are queued in an Optuna study and done by :func:`run_worker` processes.
    """
    settings = settings or SearchSettings()
    space = problem.space
    if space.size < settings.pop_size:
        raise ConfigError(f"search: the space has only {space.size} configurations, fewer than pop_size = "
                          f"{settings.pop_size}")
    meta = _meta(problem, settings)
    path = Path(run_dir) if run_dir is not None else None
    if path is not None:
        _open_run_dir(path, meta, resume)
    elif resume:
        raise ConfigError("search: resume=True needs a run_dir")
    backend: Backend = LocalBackend(problem)
    if storage_url is not None:
        from .distributed import OptunaBackend

        backend = OptunaBackend(storage_url, study_name, space, problem.fingerprint, poll_s=poll_s,
                                batch_timeout_s=batch_timeout_s)
    elif problem.evaluate is None:
        raise ConfigError("search: `evaluate` is required for a local search (no storage_url given)")
    coord = _Coordinator(problem, EvaluationCache(path / CACHE_FILE if path else None), backend)
    storage_ref = float(settings.storage_ref or 1.05 * coord.bytes(space.all_separate()))
    if storage_ref <= 0:
        raise ConfigError("search: the storage reference is 0 bytes; give settings.storage_ref")

    def save(res: SeedResult) -> None:
        if path is not None:
            _save_seed(path, res)
        if on_generation is not None:
            on_generation(res)

    try:
        seeds = {s: run_seed(coord, settings, s, storage_ref, save) for s in settings.seeds}
    finally:
        backend.close()
    archive = non_dominated(e for r in seeds.values() for e in r.evaluations)
    result = SearchResult(seeds, archive, storage_ref, settings.score_ref, path, meta)
    if path is not None:
        write_json(path / "archive.json", [e.to_dict() for e in archive])
        write_json(path / "result.json", {
            "storage_ref": storage_ref, "score_ref": settings.score_ref,
            "seeds": {str(s): {"stop_reason": r.stop_reason, "n_evaluated": len(r.evaluations),
                               "generations": r.history[-1].generation, "hypervolume": r.history[-1].hypervolume}
                      for s, r in seeds.items()},
            "hypervolume": hypervolume(archive, storage_ref, settings.score_ref),
        })
    return result


def resume_search(run_dir: str | Path, evaluate: Callable[[Configuration], float] | None,
                  storage: Callable[[Configuration], int], *, fingerprint: str = "", **kwargs: Any) -> SearchResult:
    """Continue the search recorded in ``run_dir`` (space and settings read from its ``search.json``).

    The result equals the one an uninterrupted run would have given (deterministic replay through the cache).
    """
    path = Path(run_dir) / META_FILE
    if not path.exists():
        raise ConfigError(f"search: nothing to resume in {run_dir} (no {META_FILE})")
    meta = json.loads(path.read_text())
    problem = SearchProblem(SearchSpace.from_dict(meta["space"]), evaluate, storage, fingerprint)
    return run_search(problem, run_dir, SearchSettings.from_dict(meta["settings"]), resume=True, **kwargs)


def archive_table(archive: Sequence[Evaluation]) -> list[tuple[str, float, int]]:
    """``(key, f1, f2)`` rows: a plain, comparable view of an archive."""
    return [(e.config.key, e.f1, e.f2) for e in archive]

