"""``tensors/fusion.py``: Arcee Fusion's importance, quartiles, threshold and merge against numpy."""

from __future__ import annotations

import numpy as np
import torch

from neuromerge.tensors.fusion import arcee_fusion, fusion_importance, fusion_threshold, lower_quantiles


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_arcee_fusion_matches_the_formula() -> None:
    base, model = rand((10, 8), 80), rand((10, 8), 81) * 0.2
    model = base + model
    B, M = base.numpy(), model.numpy()

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(M) + 1e-8, softmax(B) + 1e-8
    imp = np.abs(M - B) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(imp.ravel())
    n = s.size
    q1, q2, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    want = np.where(imp >= q2 + 1.5 * (q3 - q1), M, B)
    got = arcee_fusion(base, model).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert 0 < np.count_nonzero(got != B) < n // 2



def test_lower_quantiles_are_order_statistics_without_interpolation() -> None:
    x = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0])  # sorted 1 2 3 4 5 7 9; ⌊q·6⌋ = 1, 3, 4
    assert [float(v) for v in lower_quantiles(x)] == [2.0, 4.0, 5.0]
    assert [float(v) for v in lower_quantiles(torch.tensor(3.0))] == [3.0, 3.0, 3.0]  # a 0-d tensor


def test_fusion_threshold_is_tukeys_upper_fence() -> None:
    x = torch.arange(1.0, 10.0)  # quartiles by ⌊q·8⌋: 3, 5, 7
    assert float(fusion_threshold(x)) == 5.0 + 1.5 * (7.0 - 3.0)


def test_fusion_importance_is_zero_without_change_and_scales_with_kl() -> None:
    base = rand((3, 5), 90)
    assert bool((fusion_importance(base, base) == 0).all())
    model = base.clone()
    model[1] += rand((5,), 91)  # only row 1 changes: its KL is positive, the others' rows stay 0
    imp = fusion_importance(model, base)
    assert bool((imp[[0, 2]] == 0).all()) and bool((imp[1] > 0).all())
