"""Routed methods in the bench: the protocol's runners for MIN-Merging (and its ablations), Twin-Merging and EMR.

The builders, their parameters, the variants and the router fitting are the library's (:mod:`neuromerge.routing.build`,
:mod:`neuromerge.routing.router_fit`); ``route build`` on a user's model is :mod:`neuromerge.routing.build_config`
over :class:`neuromerge.tasks.hf.HFSuite`. This module adds the bench glue: :func:`bench_runner` builds a variant on
the run's suite and experts (shared work memoised per run), measures latency, and hands the routed module to the
protocol, which scores it like any other row; :func:`runners` lists them for :mod:`.extra_methods`. The library's
names are re-exported here for older imports.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import validation_lines
from ..routing.build import (
    QUICK_CAPS,
    VARIANTS,
    EMRParams,
    FactorParams,
    Memo,
    MinMergingParams,
    RoutedBuild,
    TwinParams,
    Variant,
    averaged_rest,
    build_emr,
    build_min_merging,
    build_twin,
    build_variant,
    changed_modules,
    expert_factors,
    harmful_threshold,
    head_subset,
    measure_latency,
    min_analysis,
    resolve_params,
    routable_modules,
    score_routed,
    static_state,
)
from ..routing.build_config import (
    RouteBuildConfig,
    build_from_config,
    build_inputs,
    build_wemoe_from_config,
    validate_route_build,
)
from ..routing.router_fit import (
    CONTROL_KWARGS,
    FittedRouter,
    RouterParams,
    SuiteFinalFeatures,
    fit_router,
    pooled_features,
    routing_kwargs,
    uniform_router,
)
from ..tasks.hf import TOKENIZER_VOCAB, HFSuite

if TYPE_CHECKING:
    from .protocol import Context, Produced, Runner


def _memo_for(ctx: Any) -> Memo:
    """The run's :class:`Memo`, kept on the protocol context (it lives exactly as long as the run)."""
    memo = getattr(ctx, "_routed_memo", None)
    if memo is None:
        memo = Memo()
        ctx._routed_memo = memo
    return memo


def bench_runner(ctx: Context, name: str) -> Produced:
    """The protocol's :data:`~.protocol.Runner` for a routed variant: build (shared work memoised per run),
    then latency at batch 1 and 32 on the first in-domain task (the static backbone's latency in ``info``)."""
    from .protocol import Produced

    memo = _memo_for(ctx)
    experts = [ctx.experts[t.name] for t in ctx.in_domain]
    t0 = time.perf_counter()
    with ctx.clock("merging"):
        built = build_variant(name, ctx.suite, ctx.base, experts, ctx.in_domain, ctx.budget, None, ctx.seed,
                              memo=memo)
    info = {"method": name, "build_s": time.perf_counter() - t0, **built.meta}
    task, head = ctx.in_domain[0], experts[0].head
    latency = measure_latency(ctx.suite, built.model, head, task, ctx.budget)
    info["latency_static_ms"] = memo.get(("latency-static",), lambda: measure_latency(
        ctx.suite, ctx.suite.module(ctx.base), head, task, ctx.budget))
    resolved = resolve_params(name, None, bool(ctx.budget.quick))
    info["params_all"] = resolved.model_dump()
    params = resolved.model_dump(exclude_defaults=True)  # the table shows what differs from the documented defaults
    return Produced(module=built.model, params=params, info=info, storage_bytes=built.storage_bytes,
                    latency_ms=latency, oracle=built.oracle)


def runners() -> dict[str, tuple[Runner, bool]]:
    """name → (runner, transductive) of every routed variant, for :func:`.extra_methods.runners`."""
    return {name: (bench_runner, False) for name in VARIANTS}


__all__ = [
    "CONTROL_KWARGS",
    "QUICK_CAPS",
    "TOKENIZER_VOCAB",
    "VARIANTS",
    "EMRParams",
    "FactorParams",
    "FittedRouter",
    "HFSuite",
    "Memo",
    "MinMergingParams",
    "RouteBuildConfig",
    "RoutedBuild",
    "RouterParams",
    "SuiteFinalFeatures",
    "TwinParams",
    "Variant",
    "averaged_rest",
    "bench_runner",
    "build_emr",
    "build_from_config",
    "build_inputs",
    "build_min_merging",
    "build_twin",
    "build_variant",
    "build_wemoe_from_config",
    "changed_modules",
    "expert_factors",
    "fit_router",
    "harmful_threshold",
    "head_subset",
    "measure_latency",
    "min_analysis",
    "pooled_features",
    "resolve_params",
    "routable_modules",
    "routing_kwargs",
    "runners",
    "score_routed",
    "static_state",
    "uniform_router",
    "validate_route_build",
    "validation_lines",
]
