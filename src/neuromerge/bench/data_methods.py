"""Data-aware methods in the bench: Fisher, RegMean, AdaMerging (++) and WEMoE (:mod:`neuromerge.data_aware`).

Each runs once (no grid: its hyper-parameters are its official defaults) on the suite's forward hooks
(:class:`~neuromerge.data_aware.access.ModelAccess`). What it reads is declared and reported in the row's ``info``:
``split`` (``train`` for Fisher / RegMean; ``test`` *inputs without labels* for AdaMerging / WEMoE, as in their
papers — those rows are ``transductive``), ``examples`` actually read per task, ``steps``, ``wall_s``. ``--quick``
caps the budgets (:data:`QUICK_CAPS`). The suite's ``merge_exclude()`` tensors are kept from the base, as for static
methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..data_aware import adamerging, fisher, regmean, wemoe
from ..data_aware.access import DataParams

if TYPE_CHECKING:
    from .protocol import Context, Produced, Runner
    from .suite import Budget, Expert, StateDict, Suite, TaskData


@dataclass(frozen=True)
class DataMethod:
    """A data-aware method: its parameter model, its driver ``run(access, base, experts, heads, tasks, budget,
    params, exclude=, seed=, info=)``, what data it reads and whether that is unlabelled test data."""

    name: str
    params: type[DataParams]
    run: Callable[..., Any]
    split: str
    transductive: bool


def _static(driver: Callable[..., Any]) -> Callable[..., Any]:
    def run(access: Any, base: Any, experts: Any, heads: Any, tasks: Any, budget: Any, params: Any, *,
            exclude: Sequence[str], seed: int, info: dict[str, Any]) -> Any:
        return driver(access, base, experts, heads, tasks, budget, params, exclude=exclude, info=info)

    return run


DATA_METHODS: dict[str, DataMethod] = {
    "fisher": DataMethod("fisher", fisher.FisherParams, _static(fisher.fisher_merge_models), "train", False),
    "regmean": DataMethod("regmean", regmean.RegMeanParams, _static(regmean.regmean_merge_models), "train", False),
    "adamerging": DataMethod("adamerging", adamerging.AdaMergingParams,
                             _static(adamerging.adamerging_merge_models), "test", True),
    "adamerging++": DataMethod("adamerging++", adamerging.AdaMergingPPParams,
                               _static(adamerging.adamerging_merge_models), "test", True),
    "wemoe": DataMethod("wemoe", wemoe.WEMoEParams, wemoe.wemoe_merge_models, "test", True),
}

#: ``--quick`` caps (examples per task / optimisation steps); a smaller requested value is kept. The transductive
#: methods read the evaluation subset of the test split (``budget.eval_examples``, already capped by ``--quick``)
QUICK_CAPS: dict[str, dict[str, int]] = {
    "fisher": {"examples": 64},
    "regmean": {"examples": 64},
    "adamerging": {"steps": 50},
    "adamerging++": {"steps": 50},
    "wemoe": {"steps": 50},
}


def resolve_params(name: str, params: Mapping[str, Any] | None, quick: bool) -> DataParams:
    """Validated parameters of ``name`` with the ``--quick`` caps applied."""
    spec = DATA_METHODS[name]
    p = spec.params.model_validate(dict(params or {}))
    if quick:
        caps = {k: min(v, getattr(p, k)) if getattr(p, k) is not None else v for k, v in QUICK_CAPS[name].items()}
        p = p.model_copy(update=caps)
    return p


def run_data_method(suite: Suite, base_state: StateDict, experts: Sequence[Expert], tasks: Sequence[TaskData],
                    budget: Budget, name: str, params: Mapping[str, Any] | None = None, seed: int = 0, *,
                    exclude: Sequence[str] | None = None) -> tuple[StateDict | nn.Module, dict[str, Any]]:
    """Run data-aware method ``name`` on the experts (aligned with ``tasks``); returns the merged backbone state
    (WEMoE: a :class:`~neuromerge.data_aware.wemoe.WEMoEModel`) and what it read: ``{"method", "params", "split",
    "unlabelled", "transductive", "examples": {task: n}, "steps", "wall_s", …}``."""
    if name not in DATA_METHODS:
        raise KeyError(f"unknown data-aware method {name!r}; known: {', '.join(DATA_METHODS)}")
    spec = DATA_METHODS[name]
    p = resolve_params(name, params, bool(getattr(budget, "quick", False)))
    info: dict[str, Any] = {"method": name, "params": p.model_dump(), "split": spec.split,
                            "unlabelled": spec.transductive, "transductive": spec.transductive}
    t0 = time.perf_counter()
    result = spec.run(suite, base_state, [e.backbone for e in experts], [e.head for e in experts], list(tasks),
                      budget, p, exclude=list(suite.merge_exclude() if exclude is None else exclude), seed=seed,
                      info=info)
    info["wall_s"] = time.perf_counter() - t0
    return result, info


def bench_runner(ctx: Context, name: str) -> Produced:
    """The protocol's :data:`~.protocol.Runner` for a data-aware method (default parameters, quick caps)."""
    from .protocol import Produced

    experts = [ctx.experts[t.name] for t in ctx.in_domain]
    with ctx.clock("merging"):
        result, info = run_data_method(ctx.suite, ctx.base, experts, ctx.in_domain, ctx.budget, name, None, ctx.seed)
    if isinstance(result, nn.Module):
        storage = result.storage_bytes() if hasattr(result, "storage_bytes") else None
        return Produced(module=result, params=info["params"], info=info, storage_bytes=storage)
    return Produced(backbone=result, params=info["params"], info=info, val_mean=ctx.val_mean(result))


def runners() -> dict[str, tuple[Runner, bool]]:
    """name → (runner, transductive) of every data-aware method, for :func:`.extra_methods.runners`."""
    return {name: (bench_runner, spec.transductive) for name, spec in DATA_METHODS.items()}
