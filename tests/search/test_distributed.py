"""Distributed search on a real, throwaway PostgreSQL server: two worker processes share one search.

The workers are ``python -m neuromerge.search.worker`` processes; the coordinator has no evaluate callable at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuromerge.errors import ConfigError
from neuromerge.search import SearchError, SearchProblem, SearchSettings, archive_table, run_search
from tests.search.toy import toy_problem, toy_space, toy_storage

ROOT = Path(__file__).resolve().parents[2]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _worker_cmd(url: str, study: str, fingerprint: str = "toy-v1", evaluate: str = "slow_toy_score") -> list[str]:
    return [sys.executable, "-m", "neuromerge.search.worker", url, study, f"tests.search.toy:{evaluate}",
            "--fingerprint", fingerprint, "--poll", "0.05"]


def _start_worker(url: str, study: str, evaluate: str = "slow_toy_score") -> subprocess.Popen[str]:
    return subprocess.Popen(_worker_cmd(url, study, evaluate=evaluate), cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_workers_give_the_single_process_archive(postgres_url: str, tmp_path: Path) -> None:
    settings = SearchSettings(budget=40, pop_size=8, n_trees=20)
    local = run_search(toy_problem(), tmp_path / "local", settings)
    workers = [_start_worker(postgres_url, "toy") for _ in range(2)]
    try:
        coordinator = SearchProblem(toy_space(), None, toy_storage, fingerprint="toy-v1")  # evaluates nothing
        dist = run_search(coordinator, tmp_path / "dist", settings, storage_url=postgres_url, study_name="toy",
                          poll_s=0.02, batch_timeout_s=60)
        outs = [w.communicate(timeout=30) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    counts = [int(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(counts) == 40 and min(counts) > 0  # both workers evaluated, nothing twice
    assert archive_table(dist.archive) == archive_table(local.archive)
    assert archive_table(dist.seeds[0].evaluations) == archive_table(local.seeds[0].evaluations)
    assert dist.seeds[0].history == local.seeds[0].history

    import optuna

    study = optuna.load_study(study_name="toy", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 40 and len({t.user_attrs["worker"] for t in done}) == 2

    # the study also serves as a cache: a new run folder, no worker at all, the same archive
    again = run_search(coordinator, tmp_path / "again", settings, storage_url=postgres_url, study_name="toy",
                       batch_timeout_s=5)
    assert archive_table(again.archive) == archive_table(local.archive)

    # same study, another task list or another model: refused before any work
    s8 = SearchSettings(budget=8, pop_size=8)
    with pytest.raises(ConfigError, match=r"was created for tasks \['t0', 't1', 't2'\]"):
        run_search(toy_problem(4, 4), settings=s8, storage_url=postgres_url, study_name="toy")
    other = SearchProblem(toy_space(), None, toy_storage, fingerprint="another-model")
    with pytest.raises(ConfigError, match="model fingerprint 'toy-v1'"):
        run_search(other, settings=s8, storage_url=postgres_url, study_name="toy")
    bad = subprocess.run(_worker_cmd(postgres_url, "toy", "another-model"), cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "model fingerprint 'toy-v1'" in bad.stderr and "Traceback" not in bad.stderr


def test_worker_failure_stops_the_coordinator_with_its_message(postgres_url: str) -> None:
    worker = _start_worker(postgres_url, "toy-fail", evaluate="failing_toy_score")
    try:
        coordinator = SearchProblem(toy_space(), None, toy_storage, fingerprint="toy-v1")
        with pytest.raises(SearchError, match=r"worker .+:\d+ failed on .+: toy evaluation failed on purpose"):
            run_search(coordinator, settings=SearchSettings(budget=8, pop_size=8), storage_url=postgres_url,
                       study_name="toy-fail", poll_s=0.02, batch_timeout_s=60)
        worker.communicate(timeout=30)  # the coordinator marked the study finished: the worker exits
        assert worker.returncode == 0
    finally:
        if worker.poll() is None:
            worker.kill()
