"""Hypothesis strategies and settings shared by the ``tensors/`` property tests.

Tensors are drawn in two ways: small integers (many exact ties and zeros, which is where trims, sign elections and
disjoint merges have their edge cases) or a seeded Gaussian at a drawn scale (generic values). No ``st.floats``:
the test session flushes denormals (``tests/conftest.py``), which hypothesis' float strategy refuses.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: bounded, derandomized runs (the same examples on every run and machine); the whole folder stays well under 30 s
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=15)


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...], ints: bool | None = None,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A tensor of ``shape``: small integers in [-4, 4] (``ints``) or ``scale · N(0, 1)`` from a drawn seed."""
    n = math.prod(shape)
    if ints is None:
        ints = draw(st.booleans())
    if ints:
        values = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


@st.composite
def stacks(draw: st.DrawFn, max_t: int = 5, max_n: int = 12, ints: bool | None = None,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A stacked ``(T, n)`` tensor, one row per task."""
    t = draw(st.integers(1, max_t))
    n = draw(st.integers(1, max_n))
    return draw(arrays((t, n), ints, dtype))


def densities() -> st.SearchStrategy[float]:
    """Kept fractions, the edge cases 0 and 1 included."""
    return st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), st.integers(0, 1000).map(lambda i: i / 1000))
