"""The bench's suites as named task sets: the provider the bench registers with
:func:`neuromerge.tasks.named.register_suite_provider`, so a config's ``suite: text`` (a MERGE search,
``neuromerge inspect --suite``) becomes a :class:`~neuromerge.tasks.TaskSet` without the library importing the
bench. The experts are the protocol's (:func:`~.protocol.prepare_suite` + :func:`~.protocol.train_experts`: the
expert cache, trained on first use), exactly as ``neuromerge bench`` makes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tasks.contract import Suite, TaskSet


def suite_taskset(suite: str | Suite, *, tasks: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
                  mode: str | None = None, progress: bool = False, **_: Any) -> TaskSet:
    """The suite ``suite`` (a name or an instance) with the chosen tasks (all when None; in-domain ones get
    experts, in the suite's order) and its cached experts."""
    from .protocol import _bar_factory, prepare_suite, train_experts

    bar = _bar_factory(progress)
    prep = prepare_suite(suite, tasks, quick=quick, seed=seed, mode=mode, bar=bar)
    train_experts(prep, seed, bar=bar)
    return TaskSet(prep.suite, prep.budget, list(prep.in_domain), prep.base,
                   [prep.experts[t.name] for t in prep.in_domain], ood=list(prep.ood), mode=prep.mode, seed=seed)


def register() -> None:
    """Register :func:`suite_taskset` as the library's provider of named suites."""
    from ..tasks.named import register_suite_provider

    register_suite_provider(suite_taskset)


__all__ = ["register", "suite_taskset"]
