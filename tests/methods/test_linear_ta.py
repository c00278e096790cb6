"""Linear averaging and Task Arithmetic against loop references, plus mergekit equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neuromerge.errors import ConfigError
from neuromerge.methods import get


def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


BASE = rand((4, 6), 0)
MODELS = [BASE + rand((4, 6), 1 + i) for i in range(3)]
WEIGHTS = [1.0, 0.5, 2.0]


def loop_weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> np.ndarray:
    arrays = [t.double().numpy() for t in tensors]
    out = np.zeros(arrays[0].shape)
    for idx in np.ndindex(out.shape):
        out[idx] = sum(w * a[idx] for w, a in zip(weights, arrays, strict=True))
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_mean(run_method, normalize):
    per_model = [{"weight": w} for w in WEIGHTS]
    out, _ = run_method("linear", BASE, MODELS, {"normalize": normalize}, per_model)
    expected = loop_weighted_sum(MODELS, WEIGHTS) / (sum(WEIGHTS) if normalize else 1.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_linear_default_is_the_uniform_soup_and_ignores_the_base(run_method):
    out, _ = run_method("linear", torch.zeros(4, 6), MODELS, {})
    torch.testing.assert_close(out, torch.stack(MODELS).mean(dim=0))


def test_linear_aliases_resolve_to_the_same_method():
    assert get("average") is get("linear") is get("weight_average")
    assert get("linear").needs_base is False


def test_linear_zero_weight_sum_is_a_config_error(run_method):
    with pytest.raises(ConfigError, match="sum to 0"):
        run_method("linear", BASE, MODELS[:2], {}, [{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_default_lambda_is_0_3(run_method):
    out, _ = run_method("task_arithmetic", BASE, MODELS, {}, [{"weight": w} for w in WEIGHTS])
    deltas = [m - BASE for m in MODELS]
    expected = BASE.double().numpy() + 0.3 * loop_weighted_sum(deltas, WEIGHTS)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("lam", "normalize"), [(0.7, False), (1.3, True)])
def test_task_arithmetic_lambda_and_normalize(run_method, lam, normalize):
    per_model = [{"weight": w} for w in WEIGHTS]
    out, _ = run_method("task_arithmetic", BASE, MODELS, {"lambda": lam, "normalize": normalize}, per_model)
    deltas = [m - BASE for m in MODELS]
    scale = lam / (sum(WEIGHTS) if normalize else 1.0)
    expected = BASE.double().numpy() + scale * loop_weighted_sum(deltas, WEIGHTS)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_lambda_is_accepted_by_alias_and_by_python_name():
    params = get("task_arithmetic").Params
    assert params.model_validate({"lambda": 0.5}).lam == 0.5
    assert params.model_validate({"lam": 0.5}).lam == 0.5
    with pytest.raises(ValidationError):
        params.model_validate({"density": 0.5})  # unknown keys are errors


def test_task_arithmetic_on_point_tensors(run_method):
    base = rand((7,), 10)
    models = [base + rand((7,), 11), base + rand((7,), 12)]
    out, x = run_method("task_arithmetic", base, models, {"lambda": 1.0})
    assert x.kind == "point"
    torch.testing.assert_close(out, models[0] + models[1] - base)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_row_chunks_merge_like_the_whole_tensor(run_method, name):
    per_model = [{"weight": w} for w in WEIGHTS]
    whole, _ = run_method(name, BASE, MODELS, {}, per_model)
    parts = [run_method(name, BASE, MODELS, {}, per_model, rows=r)[0] for r in [(0, 1), (1, 4)]]
    assert get(name).chunkable
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_task_arithmetic_reports_the_sign_conflict_rate(run_method):
    _, x = run_method("task_arithmetic", BASE, MODELS, {}, [{"weight": w} for w in WEIGHTS])
    deltas = [(w * (m - BASE)).numpy() for w, m in zip(WEIGHTS, MODELS, strict=True)]
    conflicts = sum(
        1
        for idx in np.ndindex(BASE.shape)
        if any(d[idx] > 0 for d in deltas) and any(d[idx] < 0 for d in deltas)
    )
    assert 0 < conflicts < BASE.numel()
    assert x.report["sign_conflict"] == pytest.approx(conflicts / BASE.numel())
    assert "kept_density" not in x.report


@pytest.mark.peers
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(run_method, normalize):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    group = TensorGroup.from_tensors(MODELS)
    params = {"weight": dict(enumerate(WEIGHTS)), "normalize": normalize}
    (theirs,) = mk_get("linear")([group], parameters=params)
    ours, _ = run_method("linear", BASE, MODELS, {"normalize": normalize}, [{"weight": w} for w in WEIGHTS])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.peers
@pytest.mark.parametrize(("lam", "normalize"), [(1.0, False), (0.4, True)])
def test_task_arithmetic_matches_mergekit(run_method, lam, normalize):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get as mk_get

    group = TensorGroup.from_tensors([BASE, *MODELS], base_index=0)
    params = {"weight": {i + 1: w for i, w in enumerate(WEIGHTS)}, "normalize": normalize, "lambda": lam}
    (theirs,) = mk_get("task_arithmetic")([group], parameters=params)
    per_model = [{"weight": w} for w in WEIGHTS]
    ours, _ = run_method("task_arithmetic", BASE, MODELS, {"lambda": lam, "normalize": normalize}, per_model)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_estimates_sign_conflicts_on_every_16th_row_whatever_the_chunking(run_method):
    base = rand((80, 7), 10)
    models = [base + rand((80, 7), 11 + i) for i in range(3)]
    deltas = [(m - base).numpy() for m in models]

    def conflicts(rows: list[int]) -> int:
        return sum(1 for r in rows for c in range(7)
                   if any(d[r, c] > 0 for d in deltas) and any(d[r, c] < 0 for d in deltas))

    _, whole = run_method("task_arithmetic", base, models, {}, [{}] * 3)
    assert whole.report["sign_conflict"] == pytest.approx(conflicts([0, 16, 32, 48, 64]) / (5 * 7))
    # a row chunk samples the same global rows: (13, 80) holds 16, 32, 48, 64 (its local rows 3, 19, 35, 51)
    _, second = run_method("task_arithmetic", base, models, {}, [{}] * 3, rows=(13, 80))
    assert second.report["sign_conflict"] == pytest.approx(conflicts([16, 32, 48, 64]) / (4 * 7))
    # a chunk without a sampled row is counted whole
    _, third = run_method("task_arithmetic", base, models, {}, [{}] * 3, rows=(1, 13))
    assert third.report["sign_conflict"] == pytest.approx(conflicts(list(range(1, 13))) / (12 * 7))
