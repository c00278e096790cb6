"""NearSwap against its formula in float64 and its defining properties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from neuromerge.functional import merge_state_dicts
from neuromerge.methods import get


def _reference(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """``w θ_1 + (1 − w) θ0``, ``w = min(1, t / max(|θ0 − θ_1|, 1e-6))`` in float64, one entry at a time."""
    out = torch.empty_like(base, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(base.double().flatten().tolist(), model.double().flatten().tolist(), strict=True)):
        w = min(1.0, t / max(abs(a - b), 1e-6))
        out.view(-1)[i] = w * b + (1 - w) * a
    return out


@pytest.mark.parametrize("t", [1e-4, 0.01, 0.3])
def test_nearswap_equals_the_formula_in_float64(t: float) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    model = {k: v + torch.randn(v.shape, generator=g) * torch.logspace(-5, 0, v.numel()).reshape(v.shape)
             for k, v in base.items()}
    out = merge_state_dicts("nearswap", base, [model], parameters={"t": t})
    for k in base:
        torch.testing.assert_close(out[k].double(), _reference(base[k], model[k], t), rtol=1e-6, atol=1e-6)


def test_near_entries_are_swapped_and_far_ones_kept() -> None:
    base = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    model = base + torch.tensor([[5e-5, -5.0, 0.0, 0.02]])
    out = get("nearswap").formula(base, [model], t=0.01)
    assert out[0, 0] == model[0, 0] and out[0, 2] == base[0, 2]  # within t: the model's value
    torch.testing.assert_close(out[0, 1], torch.tensor(1.0 - 5.0 * 0.01 / 5.0))  # far: w = t / |Δ| = 0.002
    torch.testing.assert_close(out[0, 3], torch.tensor(3.0 + 0.02 * 0.5))  # w = 0.01 / 0.02


def test_parameters_and_model_count_are_checked() -> None:
    cls = get("nearswap")
    for bad in ({"t": 0.0}, {"t": -1.0}, {"t": float("nan")}, {"weight": 2.0}):
        with pytest.raises(ValidationError):
            cls.Params.model_validate(bad)
    assert (cls.min_models, cls.max_models, cls.needs_base, cls.chunkable) == (1, 1, True, True)


def test_the_guide_shows_the_method_as_it_is() -> None:
    """docs/writing_a_method.md's worked example is the module itself, and its line count is the one it states."""
    root = Path(__file__).resolve().parents[2]
    source = (root / "src/neuromerge/methods/nearswap.py").read_text(encoding="utf-8")
    guide = (root / "docs/writing_a_method.md").read_text(encoding="utf-8")
    block = guide.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == source
    assert f"{len(source.splitlines())} lines" in guide
