"""Named task suites: how a config's ``suite: NAME`` becomes a :class:`~.contract.TaskSet` while the library knows
no suite.

The library's pipelines take a contract object; a config may instead name a built-in suite (``suite: text`` in a
MERGE search config, ``neuromerge inspect --suite text``). Whoever ships suites registers one *provider*
(:func:`register_suite_provider`): ``provider(name, *, tasks, quick, seed, mode, progress) -> TaskSet`` (the suite,
its budget, the chosen in-domain tasks and one expert per task, trained or cached). ``neuromerge.bench`` registers
its suites when imported, and the ``neuromerge`` command registers them (lazily) at start-up, so the library never
imports the bench. Importing this module is cheap (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import TaskError

if TYPE_CHECKING:
    from .contract import TaskSet

SuiteProvider = Callable[..., "TaskSet"]

_PROVIDER: list[SuiteProvider] = []

NO_PROVIDER = ("no provider of named suites is registered: the built-in suites come with neuromerge.bench (the "
               "`neuromerge` command, or `import neuromerge.bench`); or give a model folder, a task file and experts")


class NoSuiteProvider(TaskError):
    """A named suite was asked for but no provider is registered (:data:`NO_PROVIDER`)."""


def register_suite_provider(provider: SuiteProvider) -> SuiteProvider:
    """Make ``provider`` the resolver of suite names (the last registration wins); returns it."""
    _PROVIDER[:] = [provider]
    return provider


def has_suite_provider() -> bool:
    return bool(_PROVIDER)


def resolve_suite(name: str, *, tasks: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
                  mode: str | None = None, progress: bool = False, **extra: Any) -> TaskSet:
    """The :class:`~.contract.TaskSet` of the named suite: ``tasks`` selects tasks by name (all when None),
    ``quick`` its quick budget, ``seed`` / ``mode`` the experts' (trained on first use, then cached);
    :class:`NoSuiteProvider` when nothing is registered."""
    if not _PROVIDER:
        raise NoSuiteProvider(NO_PROVIDER)
    return _PROVIDER[0](name, tasks=tasks, quick=quick, seed=seed, mode=mode, progress=progress, **extra)


__all__ = ["NO_PROVIDER", "NoSuiteProvider", "SuiteProvider", "has_suite_provider", "register_suite_provider",
           "resolve_suite"]
