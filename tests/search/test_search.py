"""Search engine: encoding, archive, hypervolume, toy searches (front, determinism, resume), bad input, plots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from neuromerge.errors import ConfigError
from neuromerge.search import (
    Configuration,
    Evaluation,
    SearchError,
    SearchProblem,
    SearchSettings,
    SearchSpace,
    archive_table,
    bell,
    canonicalize,
    groups,
    hypervolume,
    non_dominated,
    plot_front,
    plot_hypervolume,
    resume_search,
    run_search,
    set_partitions,
)
from tests.search.toy import all_configurations, toy_problem, toy_score, toy_storage

FAST = {"n_trees": 20}


def _partition_of(labels: tuple[int, ...]) -> frozenset[frozenset[int]]:
    blocks: dict[int, set[int]] = {}
    for task, g in enumerate(labels):
        blocks.setdefault(g, set()).add(task)
    return frozenset(frozenset(b) for b in blocks.values())


# ---- encoding ----


def test_canonical_encoding_is_unique_per_partition() -> None:
    # every label vector over 4 tasks (4^4 = 256), grouped by the partition it describes (sets of sets)
    by_partition: dict[frozenset[frozenset[int]], set[tuple[int, ...]]] = {}
    for labels in itertools.product(range(4), repeat=4):
        by_partition.setdefault(_partition_of(labels), set()).add(canonicalize(labels))
    assert len(by_partition) == 15 == bell(4)
    assert all(len(v) == 1 for v in by_partition.values())  # one canonical vector per partition
    canon = [next(iter(v)) for v in by_partition.values()]
    assert len(set(canon)) == 15  # distinct partitions -> distinct vectors
    assert sorted(canon) == list(set_partitions(4))
    for c in canon:
        assert canonicalize(c) == c  # idempotent
        assert c[0] == 0 and all(c[t] <= max(c[:t]) + 1 for t in range(1, 4))  # restricted growth
    assert [bell(n) for n in range(1, 8)] == [1, 2, 5, 15, 52, 203, 877]
    assert [sum(1 for _ in set_partitions(n)) for n in range(1, 7)] == [bell(n) for n in range(1, 7)]
    assert groups((2, 2, 0, 2, 1)) == [[0, 1, 3], [2], [4]]


def test_genotype_round_trip_and_features() -> None:
    space = SearchSpace(("a", "b", "c"), ("x", "y"), operators=("ta", "ties"), coefficients=(0.3, 0.5, 1.0))
    assert space.n_var == 2 * 3 + 2 + 2
    assert space.size == (5 * 2 * 3) ** 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        cfg = space.random(rng)
        assert space.decode(space.encode(cfg)) == cfg
        assert Configuration.from_key(cfg.key) == cfg
    raw = [2, 2, 1, 1, 0, 1, 1, 0, 2, 0]  # labels not canonical
    cfg = space.decode(raw)
    assert cfg.partitions == ((0, 0, 1), (0, 1, 0)) and cfg.operators == (1, 0) and cfg.coefficients == (2, 0)
    relabelled = space.decode([0, 0, 2, 2, 1, 2, 1, 0, 2, 0])
    assert relabelled == cfg
    feats = space.features([cfg])[0]
    # co-membership of pairs (0,1), (0,2), (1,2) per component, then one-hot operators, one-hot coefficients
    expected = [*[1, 0, 0, 0, 1, 0], *[0, 1, 1, 0], *[0, 0, 1, 1, 0, 0]]
    assert feats.tolist() == expected


# ---- archive and hypervolume ----


def _evals(points: list[tuple[float, int]]) -> list[Evaluation]:
    return [Evaluation(Configuration(((0, i),), (0,), (0,)), f1, f2) for i, (f1, f2) in enumerate(points)]


def test_archive_is_exactly_the_non_dominated_set() -> None:
    rng = np.random.default_rng(3)
    pts = [(float(rng.integers(0, 6)) / 5, int(rng.integers(1, 8))) for _ in range(60)]
    evals = _evals(pts)
    kept = {e.config.key for e in non_dominated(evals)}

    def dominates(a: Evaluation, b: Evaluation) -> bool:
        return a.f1 >= b.f1 and a.f2 <= b.f2 and (a.f1 > b.f1 or a.f2 < b.f2)

    for e in evals:
        dominated = any(dominates(o, e) for o in evals)
        assert (e.config.key in kept) == (not dominated)
    front = non_dominated(evals)
    assert [e.f2 for e in front] == sorted(e.f2 for e in front)


def test_hypervolume_is_the_dominated_area() -> None:
    # points (f1, f2 / ref): (0.5, 0.2), (0.8, 0.6), (0.3, 0.1); ref (0, 1) -> staircase area by hand
    ref = 1000
    evals = _evals([(0.5, 200), (0.8, 600), (0.3, 100), (0.1, 900)])
    area = 0.3 * (1 - 0.1) + (0.5 - 0.3) * (1 - 0.2) + (0.8 - 0.5) * (1 - 0.6)
    assert hypervolume(evals, ref) == pytest.approx(area)
    assert hypervolume(_evals([(0.5, 1200)]), ref) == 0.0  # beyond the reference storage: no contribution


# ---- search on toy problems ----


def _true_front(problem: SearchProblem) -> list[Evaluation]:
    return non_dominated(Evaluation(c, toy_score(c), toy_storage(c)) for c in all_configurations(problem.space))


def test_search_finds_the_true_front_of_a_small_problem() -> None:
    problem = toy_problem(3, 4)  # 5^4 = 625 configurations; budget 120
    res = run_search(problem, settings=SearchSettings(budget=120, pop_size=10, **FAST))
    truth = _true_front(problem)
    assert {(e.f1, e.f2) for e in res.archive} == {(e.f1, e.f2) for e in truth}
    assert len(res.seeds[0].evaluations) == 120
    hv = [h.hypervolume for h in res.seeds[0].history]
    assert hv == sorted(hv)  # the archive only improves
    assert hv[-1] == pytest.approx(hypervolume(truth, res.storage_ref))


def test_surrogate_search_beats_random_sampling() -> None:
    problem = toy_problem(4, 4)  # 15^4 = 50625 configurations; budget 150
    res = run_search(problem, settings=SearchSettings(budget=150, pop_size=10, **FAST))
    every = all_configurations(problem.space)
    rng = np.random.default_rng(0)
    sample = [every[i] for i in rng.choice(len(every), 150, replace=False)]
    random_hv = hypervolume(non_dominated(Evaluation(c, toy_score(c), toy_storage(c)) for c in sample),
                            res.storage_ref)
    best_hv = hypervolume(_true_front(problem), res.storage_ref)
    found = res.seeds[0].history[-1].hypervolume
    assert found >= 0.97 * best_hv
    assert found > random_hv + 0.05


def test_initial_population_holds_the_extremes_and_budget_is_exact() -> None:
    problem = toy_problem(3, 4)
    res = run_search(problem, settings=SearchSettings(budget=37, pop_size=8, **FAST))
    first = [e.config for e in res.seeds[0].evaluations[:8]]
    assert first[0] == problem.space.all_merged() and first[1] == problem.space.all_separate()
    assert len(res.seeds[0].evaluations) == 37  # 8 + 8 + 8 + 8 + 5
    assert [h.n_new for h in res.seeds[0].history] == [8, 8, 8, 8, 5]


def test_initial_population_seeds_every_static_merge() -> None:
    space = SearchSpace(("a", "b", "c"), ("c0", "c1", "c2"), ("task_arithmetic", "ties"), (0.3, 0.7))
    problem = SearchProblem(space, toy_score, toy_storage, fingerprint="toy-statics")
    res = run_search(problem, settings=SearchSettings(budget=16, pop_size=8, **FAST))
    first = [e.config for e in res.seeds[0].evaluations[:8]]
    statics = space.static_merges()
    assert len(statics) == 4 and len({c.key for c in statics}) == 4
    assert first[0] == space.all_merged() == statics[0] and first[1] == space.all_separate()
    assert first[2:5] == statics[1:]
    for c in statics:  # one group per component, one operator and one λ for all of them
        assert all(p == (0, 0, 0) for p in c.partitions)
        assert len(set(c.operators)) == 1 and len(set(c.coefficients)) == 1


def test_same_seed_same_archive() -> None:
    s = SearchSettings(budget=40, pop_size=8, seeds=(0, 1), **FAST)
    a, b = run_search(toy_problem(), settings=s), run_search(toy_problem(), settings=s)
    assert archive_table(a.archive) == archive_table(b.archive)
    for seed in (0, 1):
        assert archive_table(a.seeds[seed].evaluations) == archive_table(b.seeds[seed].evaluations)
        assert a.seeds[seed].history == b.seeds[seed].history
    assert archive_table(a.seeds[0].evaluations) != archive_table(a.seeds[1].evaluations)


class Boom(RuntimeError):
    pass


def test_resume_after_interruption_gives_the_uninterrupted_archive(tmp_path: Path) -> None:
    s = SearchSettings(budget=40, pop_size=8, seeds=(0, 1), **FAST)
    full = run_search(toy_problem(), tmp_path / "full", s)
    calls: list[Configuration] = []

    def flaky(cfg: Configuration) -> float:
        if len(calls) == 53:  # seed 0 done (40), seed 1 in its second generation
            raise Boom("interrupted")
        calls.append(cfg)
        return toy_score(cfg)

    with pytest.raises(Boom):
        run_search(toy_problem(evaluate=flaky), tmp_path / "run", s)
    cache = (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()
    assert len(cache) == 53
    calls.clear()

    def counted(cfg: Configuration) -> float:
        calls.append(cfg)
        return toy_score(cfg)

    resumed = resume_search(tmp_path / "run", counted, toy_storage, fingerprint="toy-v1")
    assert archive_table(resumed.archive) == archive_table(full.archive)
    for seed in (0, 1):
        assert archive_table(resumed.seeds[seed].evaluations) == archive_table(full.seeds[seed].evaluations)
        assert resumed.seeds[seed].history == full.seeds[seed].history
    n_distinct = len({e.config.key for r in full.seeds.values() for e in r.evaluations})
    assert len(calls) == n_distinct - 53  # nothing paid for twice
    saved = json.loads((tmp_path / "run" / "archive.json").read_text())
    assert [(d["config"], d["f1"], d["f2"]) for d in saved] == archive_table(full.archive)
    history = json.loads((tmp_path / "run" / "seed_1" / "history.json").read_text())
    assert [h["hypervolume"] for h in history] == [h.hypervolume for h in full.seeds[1].history]


def test_torn_cache_line_is_dropped(tmp_path: Path) -> None:
    s = SearchSettings(budget=16, pop_size=8, **FAST)
    run_search(toy_problem(), tmp_path, s)
    cache = tmp_path / "evaluations.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed mid-write
    res = resume_search(tmp_path, toy_score, toy_storage, fingerprint="toy-v1")
    assert len(res.seeds[0].evaluations) == 16
    assert len(cache.read_text().splitlines()) == 16


# ---- bad input ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 10, "pop_size": 20}, "`budget` = 10 is out of range"),
        ({"pop_size": 3, "budget": 10}, "`pop_size` = 3 is out of range"),
        ({"pop_size": 1001, "budget": 5000}, "`pop_size` = 1001 is out of range"),
        ({"budget": 2.5}, "`budget` must be an integer"),
        ({"seeds": ()}, "at least one seed"),
        ({"seeds": (1, 1)}, "duplicate seeds"),
        ({"seeds": (-1,)}, "`seed` = -1"),
        ({"pool_factor": 0}, "`pool_factor` = 0"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSettings(**kwargs)


def test_bad_space_and_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        SearchSpace(("a",), ("c",))
    with pytest.raises(ConfigError, match="duplicate tasks"):
        SearchSpace(("a", "a"), ("c",))
    with pytest.raises(ConfigError, match="only 2 configurations"):
        run_search(SearchProblem(SearchSpace(("a", "b"), ("c",)), toy_score, toy_storage),
                   settings=SearchSettings(budget=4, pop_size=4))
    with pytest.raises(SearchError, match="expected a finite number"):
        run_search(toy_problem(evaluate=lambda c: float("nan")), settings=SearchSettings(budget=8, pop_size=8))
    with pytest.raises(ConfigError, match="`evaluate` is required"):
        run_search(toy_problem(evaluate=None), settings=SearchSettings(budget=8, pop_size=8))


def test_run_dir_of_another_search_is_refused(tmp_path: Path) -> None:
    s = SearchSettings(budget=8, pop_size=8, **FAST)
    run_search(toy_problem(), tmp_path, s)
    with pytest.raises(ConfigError, match="already holds a search"):
        run_search(toy_problem(), tmp_path, s)
    with pytest.raises(ConfigError, match="another space"):
        run_search(toy_problem(4, 4), tmp_path, s, resume=True)
    other = SearchProblem(toy_problem().space, toy_score, toy_storage, fingerprint="other-model")
    with pytest.raises(ConfigError, match="another fingerprint"):
        run_search(other, tmp_path, s, resume=True)
    with pytest.raises(ConfigError, match="another settings"):
        run_search(toy_problem(), tmp_path, SearchSettings(budget=16, pop_size=8, **FAST), resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_search(tmp_path / "empty", toy_score, toy_storage)


def test_unreachable_database_is_named_and_local_run_unaffected() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"postgresql://someone:secret@127.0.0.1:{port}/nowhere"
    s = SearchSettings(budget=8, pop_size=8, **FAST)
    with pytest.raises(SearchError) as info:
        run_search(toy_problem(), settings=s, storage_url=url, study_name="x")
    msg = str(info.value)
    assert f"127.0.0.1:{port}/nowhere" in msg and "secret" not in msg and "\n" not in msg
    assert "Connection refused" in msg
    assert len(run_search(toy_problem(), settings=s).seeds[0].evaluations) == 8


# ---- plots ----


def test_plots_are_written(tmp_path: Path) -> None:
    problem = toy_problem()
    res = run_search(problem, settings=SearchSettings(budget=24, pop_size=8, seeds=(0, 1), **FAST))
    sep, merged = problem.space.all_separate(), problem.space.all_merged()
    marks = {"all separate": (toy_score(sep), toy_storage(sep)), "all merged": (toy_score(merged), toy_storage(merged))}
    front = plot_front(res.archive, tmp_path / "front.png", marks=marks)
    hv = plot_hypervolume({s: r.history for s, r in res.seeds.items()}, tmp_path / "hv.png")
    for p in (front, hv):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
