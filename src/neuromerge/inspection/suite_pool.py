"""A suite's experts as an inspection pool: a :class:`~neuromerge.tasks.TaskSet` (any contract object with its
experts; a named suite — ``neuromerge inspect --suite S`` — is resolved by the registered provider, the bench's:
its cached experts, trained once) and, without a merge config, the same experts written as model folders with a
merge config over them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DEFAULT_EXCLUDE
from ..errors import ConfigError

BENCH_MISSING = "mergeability needs the bench suites (neuromerge.bench with its protocol), which are not available"


class BenchUnavailable(ConfigError):
    """``--suite`` was given but no provider of named suites (the bench's) is registered."""


@dataclass
class SuiteExperts:
    """A suite with its budget, in-domain tasks, pre-trained backbone and one cached expert per task."""

    suite: Any  # neuromerge.tasks.Suite
    budget: Any  # neuromerge.tasks.Budget
    tasks: list[Any]  # neuromerge.tasks.TaskData
    base: dict[str, torch.Tensor]
    experts: list[Any]  # neuromerge.tasks.Expert
    mode: str
    seed: int
    quick: bool

    @classmethod
    def from_taskset(cls, ts: Any, *, quick: bool = False) -> SuiteExperts:
        """The pool of a :class:`~neuromerge.tasks.TaskSet`."""
        return cls(ts.suite, ts.budget, list(ts.tasks), ts.base, list(ts.experts), ts.mode, ts.seed,
                   bool(getattr(ts.budget, "quick", quick)))


def _resolver() -> Callable[..., Any]:
    """The library's resolver of named suites; :class:`BenchUnavailable` when no provider is registered."""
    from ..tasks.named import has_suite_provider, resolve_suite

    if not has_suite_provider():
        raise BenchUnavailable(BENCH_MISSING)
    return resolve_suite


def load_suite_experts(suite: Any, *, quick: bool = False, seed: int = 0, mode: str | None = None,
                       progress: Callable[[Iterable, int, str], Iterable] | None = None) -> SuiteExperts:
    """The pool of ``suite``: a :class:`~neuromerge.tasks.TaskSet` as given, or a named suite (its in-domain
    experts from the provider: the bench's cache, trained when absent, exactly as ``neuromerge bench`` trains
    them). ``progress``: shown while a named suite's experts are made when it is enabled."""
    if not isinstance(suite, str):
        return SuiteExperts.from_taskset(suite, quick=quick)
    ts = _resolver()(suite, quick=quick, seed=seed, mode=mode, progress=bool(getattr(progress, "enabled", False)))
    return SuiteExperts.from_taskset(ts, quick=quick)


def _write_model(state: dict[str, torch.Tensor], folder: Path, model_type: str | None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if model_type:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def write_pool(se: SuiteExperts, folder: Path) -> dict[str, Any]:
    """Write the backbone (``folder/base``) and every expert's backbone (``folder/<task>``) as model folders;
    return a merge config over them (Task Arithmetic; the suite's never-merged tensors excluded)."""
    model_type = se.suite.model_type()
    base = _write_model(se.base, folder / "base", model_type)
    models = [_write_model(e.backbone, folder / t.name, model_type) for t, e in zip(se.tasks, se.experts, strict=True)]
    return {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(m)} for m in models],
            "exclude": [*DEFAULT_EXCLUDE, *se.suite.merge_exclude()]}


__all__ = ["BENCH_MISSING", "BenchUnavailable", "SuiteExperts", "load_suite_experts", "write_pool"]
