"""Exact evaluations of one search done by worker processes, through an Optuna study in RDB storage.

The Optuna study (any SQLAlchemy URL; PostgreSQL for several machines) is used only as a work queue, not as an
optimizer: the coordinator (:func:`~.nsga.run_search` with ``storage_url``) proposes each generation itself and
``study.enqueue_trial``-s the configurations it needs (params ``g0…g{n-1}`` = the canonical genotype, user attribute
``config`` = the canonical key); :func:`run_worker` processes loop on ``study.ask()`` → ``evaluate`` →
``study.tell``. The coordinator reads the values back *by configuration* and feeds them to NSGA-II in proposal
order, so the archive does not depend on which worker finished first (tested: it equals a single-process run).

The study records the search space (tasks, components, operators, coefficients) and the model fingerprint in its
user attributes; a coordinator or worker given another one raises :class:`~neuromerge.errors.ConfigError`. An
unreachable or malformed URL raises :class:`~.problem.SearchError` naming the URL (password hidden).
A worker killed mid-evaluation leaves its trial RUNNING: give the coordinator ``batch_timeout_s`` to notice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import ConfigError
from .encoding import Configuration, SearchSpace
from .problem import SearchError, finite_score

ATTR_SPACE = "neuromerge_space"
ATTR_FINGERPRINT = "neuromerge_fingerprint"
ATTR_STATUS = "neuromerge_status"
ATTR_CONFIG = "config"
ATTR_WORKER = "worker"
ATTR_ERROR = "error"

log = logging.getLogger(__name__)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"search: storage_url needs Optuna and a database driver (extra `search`): {e}") from None
    return optuna


def redact(url: str) -> str:
    """The URL with its password hidden (``postgresql://user:***@host/db``)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def open_storage(url: str) -> Any:
    """Optuna ``RDBStorage`` for ``url``; :class:`SearchError` naming the URL when it cannot be opened."""
    optuna = _optuna()
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, ProgrammingError):
            # processes creating Optuna's schema in a fresh database at the same time collide: try again
            if attempt == 5:
                raise SearchError(f"search: cannot set up Optuna's tables in {redact(url)}") from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as e:
            raise SearchError(f"search: cannot open the search database {redact(url)}: {_one_line(e)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _check_attrs(study: Any, where: str, space: SearchSpace | None, fingerprint: str | None) -> SearchSpace:
    attrs = study.user_attrs
    recorded = SearchSpace.from_dict(attrs[ATTR_SPACE])
    if space is not None:
        mine, theirs = space.to_dict(), recorded.to_dict()
        for name in ("tasks", "components", "operators", "coefficients"):
            if mine[name] != theirs[name]:
                raise ConfigError(f"search: {where} was created for {name} {theirs[name]}; this search has "
                                  f"{mine[name]}")
    if fingerprint is not None and attrs.get(ATTR_FINGERPRINT) != fingerprint:
        raise ConfigError(f"search: {where} was created for model fingerprint {attrs.get(ATTR_FINGERPRINT)!r}; "
                          f"this search has {fingerprint!r}")
    return recorded


def open_study(url: str, study_name: str, space: SearchSpace, fingerprint: str) -> Any:
    """Create or load the coordinator's study; record (new) or check (existing) the space and fingerprint."""
    optuna = _optuna()
    storage = open_storage(url)
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, direction="maximize")
    if ATTR_SPACE in study.user_attrs:
        _check_attrs(study, f"study {study_name!r} at {redact(url)}", space, fingerprint)
    else:
        study.set_user_attr(ATTR_FINGERPRINT, fingerprint)
        study.set_user_attr(ATTR_SPACE, space.to_dict())
    return study


class OptunaBackend:
    """Coordinator side: enqueue the missing configurations of a batch, wait, yield ``(config, f1)`` as they come."""

    def __init__(self, url: str, study_name: str | None, space: SearchSpace, fingerprint: str, *,
                 poll_s: float = 0.1, batch_timeout_s: float | None = None) -> None:
        if not study_name:
            raise ConfigError("search: storage_url needs a study_name (the workers use the same one)")
        self.url, self.name, self.space = url, study_name, space
        self.poll_s, self.batch_timeout_s = poll_s, batch_timeout_s
        self.study = open_study(url, study_name, space, fingerprint)
        self.study.set_user_attr(ATTR_STATUS, "running")

    def _trials(self, *states: Any) -> list[Any]:
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if ATTR_CONFIG in t.user_attrs]

    def _enqueue(self, cfg: Configuration) -> None:
        params = {f"g{i}": int(v) for i, v in enumerate(self.space.encode(cfg))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna.exceptions.ExperimentalWarning on user_attrs
            self.study.enqueue_trial(params, user_attrs={ATTR_CONFIG: cfg.key})

    def evaluate(self, configs: Sequence[Configuration]) -> Iterator[tuple[Configuration, float]]:
        from optuna.trial import TrialState

        pending = {c.key: c for c in configs}
        watermark = len(self.study.get_trials(deepcopy=False))  # trials numbered from here on are this batch's
        live = {t.user_attrs[ATTR_CONFIG]: t.number for t in self._trials(TrialState.WAITING, TrialState.RUNNING)}
        done = {t.user_attrs[ATTR_CONFIG] for t in self._trials(TrialState.COMPLETE)}
        for key, cfg in pending.items():
            if key not in live and key not in done:
                self._enqueue(cfg)
        start = time.monotonic()
        while pending:
            for t in self._trials(TrialState.COMPLETE, TrialState.FAIL):
                key = t.user_attrs[ATTR_CONFIG]
                if key not in pending:
                    continue
                if t.state == TrialState.COMPLETE:
                    yield pending.pop(key), float(t.values[0])
                elif t.number >= watermark or live.get(key) == t.number:
                    raise SearchError(f"search: worker {t.user_attrs.get(ATTR_WORKER, '?')} failed on {key}: "
                                      f"{t.user_attrs.get(ATTR_ERROR, 'unknown error')}")
            if pending:
                waited = time.monotonic() - start
                if self.batch_timeout_s is not None and waited > self.batch_timeout_s:
                    raise SearchError(f"search: {len(pending)} evaluations still pending after {waited:.0f} s in "
                                      f"study {self.name!r} at {redact(self.url)}; are workers running?")
                time.sleep(self.poll_s)

    def close(self) -> None:
        """Tell the workers the search is over (they exit once the queue is empty)."""
        try:
            self.study.set_user_attr(ATTR_STATUS, "finished")
        except Exception as e:  # the database went away: nothing left to tell
            log.warning("search: could not mark study %r finished: %s", self.name, _one_line(e))


def _load_study(url: str, study_name: str, poll_s: float, wait_s: float) -> Any:
    optuna = _optuna()
    storage = open_storage(url)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            if ATTR_SPACE in study.user_attrs:
                return study
        except KeyError:
            pass
        if time.monotonic() > deadline:
            raise SearchError(f"search: no study {study_name!r} set up at {redact(url)} after {wait_s:.0f} s")
        time.sleep(poll_s)


def run_worker(storage_url: str, study_name: str, evaluate: Callable[[Configuration], float], *,
               fingerprint: str | None = None, poll_s: float = 0.2, wait_s: float = 60.0,
               max_idle_s: float | None = None, max_trials: int | None = None) -> int:
    """Evaluate queued configurations of the study until the coordinator marks it finished; returns the count.

    Waits up to ``wait_s`` for the study to be created. Exits when the study is finished and its queue empty,
    after ``max_idle_s`` without work, or after ``max_trials`` evaluations. An exception in ``evaluate`` fails the
    trial (message in its user attribute ``error``; the coordinator raises it) and the worker goes on. Optuna's
    own logging is set to WARNING (one line per trial otherwise).
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load_study(storage_url, study_name, poll_s, wait_s)
    space = _check_attrs(study, f"study {study_name!r} at {redact(storage_url)}", None, fingerprint)
    me = f"{socket.gethostname()}:{os.getpid()}"
    count, idle_since = 0, time.monotonic()
    while max_trials is None or count < max_trials:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if study.user_attrs.get(ATTR_STATUS) == "finished":
                break
            if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                break
            time.sleep(poll_s)
            continue
        trial = study.ask()
        key = trial.user_attrs.get(ATTR_CONFIG)
        if key is None:  # another worker popped the last waiting trial first: drop the fresh one Optuna made
            study.tell(trial, state=TrialState.FAIL)
            continue
        cfg = Configuration.from_key(key)
        space.check(cfg)
        for i, hi in enumerate(space.upper):
            trial.suggest_int(f"g{i}", 0, int(hi))
        trial.set_user_attr(ATTR_WORKER, me)
        try:
            value = finite_score(evaluate(cfg), cfg)
        except Exception as e:
            trial.set_user_attr(ATTR_ERROR, _one_line(e))
            study.tell(trial, state=TrialState.FAIL)
            log.error("search worker %s: evaluate failed on %s: %s", me, key, _one_line(e))
            continue
        study.tell(trial, value)
        count += 1
        idle_since = time.monotonic()
    return count
