"""The task-vector variants are rows of one table (``methods/variants.py``): each registered class is what its row
says, a new row is a working method, and the formula chooses its combine step from the row, not from the type of
its parameters. The fused fast paths live in ``engine/fused.py`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from pydantic import Field

from neuromerge.engine import fused
from neuromerge.methods import MergeInput, available, get
from neuromerge.methods._common import TrimScope
from neuromerge.methods.task_arithmetic import (
    ConsensusCombineParams,
    LinearCombineParams,
    TaskVectorMerge,
    Variant,
    variant_class,
)
from neuromerge.methods.ties import MAGNITUDE
from neuromerge.methods.variants import VARIANTS
from neuromerge.numeric import FiniteFloat

METHODS = Path(__file__).resolve().parents[2] / "src" / "neuromerge" / "methods"


@pytest.mark.parametrize("row", VARIANTS, ids=lambda r: r.name)
def test_each_row_is_the_registered_method(row: Variant) -> None:
    cls = get(row.name)
    assert issubclass(cls, TaskVectorMerge)
    assert (cls.sparsifier, cls.consensus, cls.Params) == (row.sparsify, row.consensus, row.params)
    assert (cls.summary, cls.source, cls.__doc__) == (row.summary, row.source, row.doc)
    expected_per_model = {"weight"} | (set(row.sparsify.per_model) if row.sparsify else set())
    assert cls.per_model_params == expected_per_model
    assert cls.random == (row.sparsify is not None and row.sparsify.random)


def test_the_table_holds_the_mergekit_family() -> None:
    table = {(r.name, r.sparsify is not None, r.consensus, r.combine) for r in VARIANTS}
    assert table == {
        ("task_arithmetic", False, None, "sum"), ("ties", True, "sign_election", "disjoint_merge"),
        ("dare_linear", True, None, "sum"), ("dare_ties", True, "sign_election", "disjoint_merge"),
        ("breadcrumbs", True, None, "sum"), ("breadcrumbs_ties", True, "sign_election", "disjoint_merge"),
        ("della_linear", True, None, "sum"), ("della", True, "sign_election", "disjoint_merge"),
    }


def test_a_row_refuses_an_inconsistent_combine_or_params() -> None:
    with pytest.raises(ValueError, match="disjoint merge goes with the sign election"):
        Variant("_x", None, None, "disjoint_merge", LinearCombineParams, "s", "s", "d")
    with pytest.raises(ValueError, match="must derive from ConsensusCombineParams"):
        Variant("_x", None, "sign_election", "disjoint_merge", LinearCombineParams, "s", "s", "d")


class _MagnitudeSumParams(LinearCombineParams):
    density: FiniteFloat = Field(0.5, gt=0, le=1)
    scope: TrimScope = "tensor"


def test_a_new_row_is_a_working_method() -> None:
    """Magnitude trim + plain sum (a row that is not in the table) equals ``θ0 + λ Σ_t w_t trim(τ_t)`` in float64."""
    cls = variant_class(Variant("_magnitude_sum", MAGNITUDE, None, "sum", _MagnitudeSumParams, "s", "s", "d"))
    assert cls().chunkable_for(_MagnitudeSumParams()) is False  # per-tensor trim: whole tensors
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=g)
    models = [base + torch.randn(4, 6, generator=g) for _ in range(2)]
    params = _MagnitudeSumParams(lam=0.7)
    per_model = [_MagnitudeSumParams(lam=0.7, weight=0.5), _MagnitudeSumParams(lam=0.7, weight=2.0, density=1.0)]
    x = MergeInput(name="w", kind="neuronal", base=base, models=models, params=params, per_model=per_model,
                   rows=(0, 4), full_shape=(4, 6))
    out = cls().merge(x)
    tau0 = (models[0] - base).double()
    kept = tau0.abs() >= tau0.abs().flatten().kthvalue(tau0.numel() - 12 + 1).values  # top 12 of 24
    expected = base.double() + 0.7 * (0.5 * tau0 * kept + 2.0 * (models[1] - base).double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert 0 < x.report["kept_density"] < 1


def test_no_isinstance_dispatch_on_parameter_classes() -> None:
    """The formula reads the row (``consensus``), never ``isinstance(params, ...)``."""
    for path in METHODS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = ast.unparse(node.args[1])
                assert "Params" not in names, f"{path.name}: isinstance(..., {names})"
    assert issubclass(get("ties").Params, ConsensusCombineParams)


def test_fused_paths_live_in_one_table() -> None:
    assert set(fused.FUSED) == {"task_arithmetic", "ties", "neuromerging"}
    assert set(fused.FUSED) <= set(available())
    for path in METHODS.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "merge_fused" not in text and "kernels." not in text, f"{path.name} holds a fast path"
    linear = get("linear")()
    assert not fused.fuses(linear, linear.Params(), [linear.Params()])
