"""Shared helpers for method tests: build a :class:`MergeInput` from small tensors as the engine would.

Fixtures ``make_input`` and ``run_method`` return the plain functions below, so any test module in this folder can
use them without importing this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from neuromerge.methods import GlobalStats, MergeInput, get
from neuromerge.tensors.rng import key_seed, uniform


def _uniform_fn(
    seed: int, method_name: str, name: str, row_start: int, row_numel: int
) -> Callable[[int, tuple[int, ...]], torch.Tensor]:
    """Counter-based draws keyed by (seed, method, tensor name, model index), at the chunk's flat position."""

    def draw(model_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        stream = key_seed(seed, method_name, name, model_index)
        return uniform(stream, row_start * row_numel, math.prod(shape)).reshape(shape)

    return draw


def make_input(
    method_name: str,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    params: dict[str, Any],
    per_model: list[dict[str, Any]] | None = None,
    stats: GlobalStats | None = None,
    seed: int = 0,
    name: str = "w",
    *,
    rows: tuple[int, int] | None = None,
    kind: str | None = None,
) -> MergeInput:
    """A :class:`MergeInput` for method ``method_name`` (name or alias) as the engine builds it.

    ``params`` are the config's global parameters, ``per_model[i]`` model ``i``'s own parameters (merged over the
    globals, then validated by the method's ``Params``). ``base`` / ``models`` are the *whole* tensors; with
    ``rows=(a, b)`` only that row chunk is passed (``rows`` / ``full_shape`` set accordingly). ``kind`` defaults to
    ``neuronal`` for tensors of 2+ dims and ``point`` otherwise. A ``uniform`` generator is always attached.
    """
    cls = get(method_name)
    if per_model is None:
        per_model = [{} for _ in models]
    if len(per_model) != len(models):
        raise ValueError("per_model must have one entry per model")
    global_params = cls.Params.model_validate(params)
    model_params = [cls.Params.model_validate({**params, **own}) for own in per_model]
    full_shape = tuple(base.shape)
    n_rows = full_shape[0] if full_shape else 1
    row_numel = math.prod(full_shape[1:]) if full_shape else 1
    start, stop = rows if rows is not None else (0, n_rows)

    def chunk(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32)
        return t[start:stop] if rows is not None else t.clone()

    return MergeInput(
        name=name,
        kind=kind or ("neuronal" if base.dim() >= 2 else "point"),  # type: ignore[arg-type]
        base=chunk(base),
        models=[chunk(m) for m in models],
        params=global_params,
        per_model=model_params,
        stats=stats,
        rows=(start, stop),
        full_shape=full_shape,
        uniform=_uniform_fn(seed, cls.name, name, start, row_numel),
    )


def run_method(method_name: str, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, MergeInput]:
    """``make_input(...)`` then the method's ``merge``; returns ``(merged, input)`` (the input holds the report)."""
    x = make_input(method_name, *args, **kwargs)
    return get(method_name)().merge(x), x


def reference_disjoint_merge(
    taus: Sequence[np.ndarray],
    weights: Sequence[float],
    variant: str = "dis-mean",
    sign_method: str = "sum",
    zero_sign: str = "majority",
) -> np.ndarray:
    """Loop-by-coordinate reference of the weighted TIES election + disjoint merge (float64), independent of the
    library: ``v_t = w_t τ_t``; ``γ = sign(Σ v_t)`` (``count``: ``sign(Σ sign v_t)``), a 0 taking the majority of
    the elected signs over the tensor (``zero_sign="majority"``) or +1; ``dis-sum`` = Σ of the agreeing non-zero
    ``v_t``, ``dis-mean`` = that sum / Σ of their weights (1 when 0)."""
    shape = taus[0].shape
    coords = list(np.ndindex(shape))
    values = [[w * float(t[c]) for w, t in zip(weights, taus, strict=True)] for c in coords]
    if sign_method == "sum":
        gammas = [float(np.sign(sum(v))) for v in values]
    else:
        gammas = [float(np.sign(sum(np.sign(x) for x in v))) for v in values]
    fill = (1.0 if sum(gammas) >= 0 else -1.0) if zero_sign == "majority" else 1.0
    out = np.zeros(shape)
    for c, vals, gamma in zip(coords, values, gammas, strict=True):
        g = gamma if gamma != 0 else fill
        agree = [(v, w) for v, w in zip(vals, weights, strict=True) if v != 0 and np.sign(v) == g]
        num = sum(v for v, _ in agree)
        den = sum(w for _, w in agree)
        out[c] = num if variant == "dis-sum" or den == 0 else num / den
    return out


@pytest.fixture(name="reference_disjoint_merge")
def _reference_disjoint_merge_fixture() -> Callable[..., np.ndarray]:
    return reference_disjoint_merge


@pytest.fixture(name="make_input")
def _make_input_fixture() -> Callable[..., MergeInput]:
    return make_input


@pytest.fixture(name="run_method")
def _run_method_fixture() -> Callable[..., tuple[torch.Tensor, MergeInput]]:
    return run_method
