"""``tensors/quant.py``: symmetric per-channel int8 after percentile clipping (MERGE's module library,
docs/methods/spec.md §2 step 3), against numpy and float64 formulas, with its error bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.quant import (
    QMAX,
    combine_errors,
    dequantize,
    quant_error,
    quantizable,
    quantize_per_channel,
    row_percentile,
)
from tests.tensors.strategies import FAST, arrays

PERCENTILES = st.sampled_from([0.0, 50.0, 99.0, 99.9, 100.0])


def test_quantizable() -> None:
    assert quantizable(torch.zeros(2, 3)) and quantizable(torch.zeros(2, 3, 1, 1, dtype=torch.bfloat16))
    assert not quantizable(torch.zeros(3))  # 1-D: biases and norms stay float
    assert not quantizable(torch.zeros(0, 3))  # empty
    assert not quantizable(torch.zeros(2, 3, dtype=torch.int8))


@FAST
@given(arrays((3, 7)), st.floats(0.0, 100.0, allow_subnormal=False))
def test_row_percentile_is_numpys_linear_percentile(a, p) -> None:
    ref = np.percentile(a.numpy(), p, axis=1)
    np.testing.assert_allclose(row_percentile(a, p).numpy(), ref, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_row_percentile_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        row_percentile(torch.zeros(2, 2), 101.0)


@FAST
@given(arrays((4, 2, 5), dtype=torch.float32), PERCENTILES, st.booleans())
def test_quantize_per_channel(w, p, zero_row) -> None:
    """``s_o = percentile_p(|w_o|)/127``, ``q = clamp(round(w/s), ±127)`` int8; entries within the clip are off by at
    most ``s/2`` after dequantizing, clipped ones sit at ``±127 s``; an all-zero row has scale and codes 0."""
    if zero_row:
        w[1] = 0.0
    q, scale = quantize_per_channel(w, p)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (4,) and scale.dtype == torch.float32
    assert int(q.abs().max()) <= QMAX
    rows = w.reshape(4, -1).double()
    clip = torch.tensor(np.percentile(rows.abs().numpy(), p, axis=1))
    torch.testing.assert_close(scale.double(), (clip / QMAX).float().double(), rtol=1e-6, atol=0)
    back = dequantize(q, scale).reshape(4, -1).double()
    s = scale.double().unsqueeze(1)
    clip_value = (s * QMAX).expand_as(rows)  # the fp32 scale's rounding moves it by ~1e-7 relative
    inside = rows.abs() <= clip_value * (1 + 1e-6)
    bound = s / 2 + 2.0**-22 * rows.abs()  # half a step, plus the fp32 roundings of w / s and s · q
    assert bool(((back - rows).abs()[inside] <= bound[inside]).all())
    assert bool(((back[~inside].abs() - clip_value[~inside]).abs() <= 1e-6 * clip_value[~inside]).all())
    if zero_row:
        assert float(scale[1]) == 0.0 and not q[1].any()
    if p == 100.0:  # nothing clipped
        assert bool(inside.all())


def test_quantize_per_channel_refuses_1d() -> None:
    with pytest.raises(ValueError, match=">= 2 dims"):
        quantize_per_channel(torch.zeros(4))


@FAST
@given(arrays((3, 4), ints=True), arrays((3,), ints=False), st.sampled_from([torch.float32, torch.float64]))
def test_dequantize(q, scale, dtype) -> None:
    q = q.to(torch.int8)
    out = dequantize(q, scale, dtype)
    assert out.dtype == dtype
    expected = scale.float().unsqueeze(1) * q.float()
    assert torch.equal(out, expected.to(dtype))


@FAST
@given(arrays((3, 6), dtype=torch.float32), PERCENTILES)
def test_quant_error(w, p) -> None:
    q, scale = quantize_per_channel(w, p)
    err = (w.double() - dequantize(q, scale).double())
    stats = quant_error(w, q, scale)
    norm = float(w.double().norm())
    assert stats["numel"] == 18.0
    assert stats["max_abs"] == pytest.approx(float(err.abs().max()), rel=1e-6, abs=1e-12)
    assert stats["rmse"] == pytest.approx(math.sqrt(float((err**2).mean())), rel=1e-5, abs=1e-12)
    assert stats["rel_fro"] == pytest.approx(float(err.norm()) / norm if norm > 0 else 0.0, rel=1e-5, abs=1e-12)
    clip = scale.double().unsqueeze(1) * QMAX
    assert stats["clipped"] == pytest.approx(float((w.double().abs() > clip.float().double()).double().mean()))


@FAST
@given(arrays((6, 5), dtype=torch.float32), st.integers(1, 5), PERCENTILES)
def test_combine_errors_of_row_blocks_is_the_error_of_the_whole(w, cut, p) -> None:
    """Quantization is per row, so splitting a tensor into row blocks and combining their errors gives the whole
    tensor's ``max_abs``, ``rmse``, ``clipped`` and ``numel``; ``rel_fro`` combines as the worst block."""
    q, scale = quantize_per_channel(w, p)
    whole = quant_error(w, q, scale)
    parts = [quant_error(w[:cut], q[:cut], scale[:cut]), quant_error(w[cut:], q[cut:], scale[cut:])]
    got = combine_errors(parts)
    for key in ("max_abs", "rmse", "clipped", "numel"):
        assert got[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-12), key
    assert got["rel_fro"] == max(s["rel_fro"] for s in parts)
    assert combine_errors([]) == {"max_abs": 0.0, "rmse": 0.0, "rel_fro": 0.0, "clipped": 0.0, "numel": 0.0}
    assert combine_errors([whole]) == pytest.approx(whole)
