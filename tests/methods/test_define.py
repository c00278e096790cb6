"""``merge_function``: one typed function becomes a registered method whose ``Params``, class attributes, planning
checks and per-tensor merge are those the function declares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from neuromerge import catalog
from neuromerge.cli import app
from neuromerge.errors import ConfigError
from neuromerge.functional import merge_state_dicts
from neuromerge.methods import MergeInput, MergeMethod, MethodParams, available, get, registry
from neuromerge.methods.base import UnweightedParams
from neuromerge.methods.define import DefinitionError, PerModel, merge_function
from tests.helpers import write_config

runner = CliRunner()


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Definitions made in a test are registered in a copy of the registry, dropped afterwards."""
    available()  # the built-in methods first, so that the copy holds them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def _refuse_negative_shift(name: str, params: Any, per_model: Sequence[Any]) -> None:
    if params.shift < 0 and params.mode == "strict":
        raise ConfigError(f"{name}: shift < 0 in strict mode")


def _define_scaled_sum() -> type[MergeMethod]:
    @merge_function(name="_scaled_sum", aliases=("_ssum",), summary="θ0 + λ Σ s_t w_t τ_t + shift",
                    source="a test", check=_refuse_negative_shift)
    def scaled_sum(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                   lam: Annotated[float, Field(alias="lambda", gt=0, description="scaling λ")] = 0.5,
                   scale: Annotated[PerModel[float], Field(ge=0, description="per-model scale s_t")] = 1.0,
                   shift: float = 0.0,
                   mode: Literal["strict", "loose"] = "loose") -> torch.Tensor:
        """``θ = θ0 + λ Σ_t s_t w_t τ_t + shift`` (a test formula)."""
        out = base.clone()
        for d, w, s in zip(deltas, weights, scale, strict=True):
            out += lam * s * w * d
        return out + shift

    return scaled_sum


def test_generated_class_attributes_and_registration(scratch_registry: None) -> None:
    cls = _define_scaled_sum()
    assert issubclass(cls, MergeMethod)
    assert get("_scaled_sum") is cls and get("_ssum") is cls
    assert cls.__name__ == "ScaledSum" and cls.__module__ == __name__
    assert cls.__doc__ == "``θ = θ0 + λ Σ_t s_t w_t τ_t + shift`` (a test formula)."
    assert (cls.summary, cls.source, cls.aliases) == ("θ0 + λ Σ s_t w_t τ_t + shift", "a test", ("_ssum",))
    assert cls.per_model_params == frozenset({"weight", "scale"})
    assert (cls.chunkable, cls.needs_base, cls.random, cls.min_models, cls.max_models) == (True, True, False, 1, None)
    assert callable(cls.formula)


def test_params_fields_order_defaults_ranges_and_descriptions(scratch_registry: None) -> None:
    cls = _define_scaled_sum()
    assert issubclass(cls.Params, MethodParams)
    assert list(cls.Params.model_fields) == ["weight", "lam", "scale", "shift", "mode"]
    p = cls.Params()
    assert (p.weight, p.lam, p.scale, p.shift, p.mode) == (1.0, 0.5, 1.0, 0.0, "loose")
    assert cls.Params.model_validate({"lambda": 2.0}).lam == 2.0
    rows = {r["name"]: r for r in catalog.describe_params(cls.Params)}
    assert rows["lambda"]["constraints"] == ">0" and rows["lambda"]["description"] == "scaling λ"
    assert rows["scale"]["constraints"] == ">=0" and rows["mode"]["constraints"] == "strict|loose"
    for bad in ({"lambda": 0.0}, {"scale": -1.0}, {"mode": "other"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            cls.Params.model_validate(bad)


@pytest.mark.parametrize("key", ["lambda", "scale", "shift"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e39])
def test_float_parameters_are_finite_floats(scratch_registry: None, key: str, value: float) -> None:
    cls = _define_scaled_sum()
    with pytest.raises(ValidationError, match="finite number"):
        cls.Params.model_validate({key: value})


def test_merge_equals_the_formula_in_float64_with_per_model_values(scratch_registry: None) -> None:
    _define_scaled_sum()
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    out = merge_state_dicts("_scaled_sum", base, models, parameters={"lambda": 0.7, "shift": 0.25},
                            model_parameters=[{"scale": 2.0, "weight": 0.5}, {"scale": 0.0}])
    for k in base:
        b = base[k].double()
        expected = b + 0.7 * (2.0 * 0.5 * (models[0][k].double() - b) + 0.0) + 0.25
        torch.testing.assert_close(out[k].double(), expected, rtol=1e-6, atol=1e-6)


def test_the_function_receives_a_list_for_per_model_and_a_scalar_for_global(scratch_registry: None) -> None:
    seen: dict[str, Any] = {}

    @merge_function(name="_probe", summary="s", source="s")
    def probe(x: MergeInput, models: Sequence[torch.Tensor], *, a: PerModel[float] = 1.0, b: int = 3) -> torch.Tensor:
        seen.update(a=a, b=b, x=x)
        return models[0]

    cls = get("_probe")
    params = cls.Params(b=5)
    per_model = [cls.Params(a=0.5, b=5), cls.Params(a=2.0, b=5)]
    t = torch.zeros(2, 2)
    x = MergeInput(name="w", kind="neuronal", base=t, models=[t + 1, t + 2], params=params, per_model=per_model)
    out = cls().merge(x)
    assert torch.equal(out, t + 1)
    assert seen["a"] == [0.5, 2.0] and seen["b"] == 5 and seen["x"] is x
    assert probe is cls


def test_check_runs_at_planning(scratch_registry: None, make_family: Any, tmp_path: Path) -> None:
    """``check`` refuses at planning: ``merge --dry-run`` refuses what the run would."""
    _define_scaled_sum()
    base, experts = make_family("llama", n_experts=1)
    for mode, code in (("strict", 2), ("loose", 0)):
        cfg = write_config(tmp_path / f"{mode}.yaml", "_scaled_sum", base, experts,
                           parameters={"shift": -1.0, "mode": mode})
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--dry-run"])
        assert res.exit_code == code, res.output
        assert ("shift < 0 in strict mode" in res.output) == (mode == "strict")


def test_config_refuses_a_global_parameter_set_per_model(scratch_registry: None) -> None:
    _define_scaled_sum()
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(ConfigError, match="shift"):
        merge_state_dicts("_scaled_sum", base, [base], model_parameters=[{"shift": 1.0}])


def test_params_base_and_class_names(scratch_registry: None) -> None:
    @merge_function(name="_first-model", summary="s", source="s", params_base=UnweightedParams,
                    needs_base=False, min_models=2, max_models=2, chunkable=False, random=True,
                    params_name="FirstParams")
    def first(models: Sequence[torch.Tensor]) -> torch.Tensor:
        return models[0]

    assert first.__name__ == "FirstModel" and first.Params.__name__ == "FirstParams"
    assert issubclass(first.Params, UnweightedParams)
    with pytest.raises(ValidationError, match="does not use per-model weights"):
        first.Params(weight=2.0)
    assert (first.needs_base, first.min_models, first.max_models, first.chunkable, first.random) == (
        False, 2, 2, False, True)
    doc = catalog.describe(catalog.get("_first-model"))
    assert doc["models"] == "2" and doc["kind"] == "static"


def _identity(base: torch.Tensor) -> torch.Tensor:
    return base


def _bad_positional(foo: torch.Tensor) -> torch.Tensor:
    return foo


def _no_default(base: torch.Tensor, *, t: float) -> torch.Tensor:
    return base


def _weight_twice(base: torch.Tensor, *, weight: float = 1.0) -> torch.Tensor:
    return base


def _var_args(base: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    return base


def _no_tensor(*, t: float = 1.0) -> torch.Tensor:
    return torch.zeros(())


def _untyped(base: torch.Tensor, *, t=1.0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return base


def _positional_default(base: torch.Tensor, models: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    return base


def _bad_per_model(base: torch.Tensor, *, t: PerModel = 1.0) -> torch.Tensor:  # type: ignore[type-arg]
    return base


@pytest.mark.parametrize(("fn", "message"), [
    (_bad_positional, "positional parameter 'foo' is not one of"),
    (_no_default, "'t' needs a default"),
    (_weight_twice, "'weight' is already a field"),
    (_var_args, "not supported"),
    (_no_tensor, "takes none of the tensors"),
    (_untyped, "needs a type annotation"),
    (_positional_default, "cannot have a default"),
    (_bad_per_model, "PerModel needs one type argument"),
])
def test_definition_errors(scratch_registry: None, fn: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        merge_function(name="_bad", summary="s", source="s")(fn)
    assert "_bad" not in registry._REGISTRY


def test_a_name_registered_twice_is_refused(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        merge_function(name="linear", summary="s", source="s")(_identity)


def test_linear_is_function_style_and_unchanged() -> None:
    cls = get("linear")
    assert cls.formula.__name__ == "linear"
    assert list(cls.Params.model_fields) == ["weight", "normalize"]
    assert cls.per_model_params == frozenset({"weight"})
    assert (cls.aliases, cls.needs_base, cls.averages_weights, cls.chunkable) == (
        ("average", "weight_average"), False, True, True)
    g = torch.Generator().manual_seed(1)
    models = [torch.randn(3, 5, generator=g) for _ in range(3)]
    weights = [0.2, 1.5, -0.4]
    out = cls.formula("w", models, weights, normalize=True)
    expected = sum(w * m.double() for w, m in zip(weights, models, strict=True)) / sum(weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="sum to 0"):
        cls().check("w", cls.Params(), [cls.Params(weight=1.0), cls.Params(weight=-1.0)])
