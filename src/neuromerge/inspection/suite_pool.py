"""A bench suite's experts as an inspection pool: the cached experts of :mod:`neuromerge.bench.protocol`
(``cached_expert``: trained once, then read from the user cache) and, for ``neuromerge inspect --suite S``
without a config, the same experts written as model folders with a merge config over them.
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
    """``--suite`` was given but :mod:`neuromerge.bench` (or its protocol) is not there."""


@dataclass
class SuiteExperts:
    """A suite with its budget, in-domain tasks, pre-trained backbone and one cached expert per task."""

    suite: Any  # neuromerge.bench.suite.Suite
    budget: Any  # neuromerge.bench.suite.Budget
    tasks: list[Any]  # neuromerge.bench.suite.TaskData
    base: dict[str, torch.Tensor]
    experts: list[Any]  # neuromerge.bench.suite.Expert
    mode: str
    seed: int
    quick: bool


def _bench() -> tuple[Any, Any]:
    try:
        from ..bench import protocol, suites
    except ImportError:
        raise BenchUnavailable(BENCH_MISSING) from None
    if not hasattr(protocol, "cached_expert") or not hasattr(suites, "get_suite"):
        raise BenchUnavailable(BENCH_MISSING)
    return protocol, suites


def load_suite_experts(suite: Any, *, quick: bool = False, seed: int = 0, mode: str | None = None,
                       progress: Callable[[Iterable, int, str], Iterable] | None = None) -> SuiteExperts:
    """The suite ``suite`` (a name or a Suite) and its in-domain experts, from the bench cache (trained when
    absent, exactly as ``neuromerge bench`` trains them)."""
    protocol, suites = _bench()
    s = suites.get_suite(suite) if isinstance(suite, str) else suite
    mode = mode or s.modes[0]
    if mode not in s.modes:
        raise ConfigError(f"suite {s.name!r} has no expert mode {mode!r}; modes: {', '.join(s.modes)}")
    budget = s.budget(quick)
    tasks = [t for t in s.tasks(budget) if t.in_domain]
    base = s.backbone_state()
    bar = progress or (lambda items, total, desc: items)
    experts = [protocol.cached_expert(s, t, budget, mode, seed, base)[0] for t in bar(tasks, len(tasks), "experts")]
    return SuiteExperts(s, budget, tasks, base, experts, mode, seed, quick)


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
