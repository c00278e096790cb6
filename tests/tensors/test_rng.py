"""``tensors/rng.py``: counter-based draws against a pure-Python SplitMix64 reference, position and chunk invariance,
and a uniformity check."""

from __future__ import annotations

import hashlib
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.rng import draw, key_seed, uniform
from tests.tensors.strategies import FAST

MASK = (1 << 64) - 1


def _splitmix(seed: int, i: int) -> float:
    """Draw ``i`` of stream ``seed``: the SplitMix64 finaliser of ``seed + (i+1)·φ64`` (Steele et al. 2014), top 24
    bits scaled to [0, 1), in Python integers."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 40) / 2.0**24


@FAST
@given(st.integers(0, 2**31), st.text(max_size=8), st.text(max_size=8), st.integers(0, 64))
def test_key_seed_is_blake2b_of_the_key(seed, method, name, index) -> None:
    digest = hashlib.blake2b(repr((seed, method, name, index)).encode(), digest_size=8).digest()
    key = key_seed(seed, method, name, index)
    assert key == int.from_bytes(digest, "little") and 0 <= key < 2**64
    assert key != key_seed(seed, method, name, index + 1)  # a 64-bit collision here would be a hash failure


@FAST
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**40), st.integers(0, 40))
def test_uniform_matches_splitmix64(seed, start, count) -> None:
    out = uniform(seed, start, count)
    assert out.dtype == torch.float32 and out.shape == (count,)
    assert out.tolist() == [_splitmix(seed, start + i) for i in range(count)]
    assert bool(((out >= 0) & (out < 1)).all())


@FAST
@given(st.integers(0, 2**64 - 1), st.integers(0, 1000), st.integers(1, 30), st.integers(0, 29))
def test_uniform_depends_only_on_the_position(seed, start, count, split) -> None:
    """Drawing ``count`` values at once or in two pieces gives the same values."""
    split = min(split, count)
    whole = uniform(seed, start, count)
    assert torch.equal(torch.cat([uniform(seed, start, split), uniform(seed, start + split, count - split)]), whole)


def test_uniform_is_uniform() -> None:
    """Mean and the share below 0.25 within 6 standard deviations of a U[0, 1) sample of 100 000 draws."""
    n = 100_000
    u = uniform(key_seed(0, "dare", "w", 0), 0, n).double()
    assert abs(float(u.mean()) - 0.5) <= 6 * math.sqrt(1 / 12 / n)
    assert abs(float((u < 0.25).double().mean()) - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / n)


@FAST
@given(st.integers(0, 2**31), st.integers(1, 9), st.integers(1, 7), st.integers(0, 8), st.integers(1, 9))
def test_draw_is_keyed_and_chunk_invariant(seed, rows, cols, first, count) -> None:
    """``draw`` = ``uniform`` of the keyed stream, shaped; a row chunk (flat start ``first·cols``) holds the same
    values as those rows of the whole tensor's draw."""
    whole = draw(seed, "dare_ties", "layer.0.w", 2, 0, (rows, cols))
    assert torch.equal(whole.reshape(-1), uniform(key_seed(seed, "dare_ties", "layer.0.w", 2), 0, rows * cols))
    first = min(first, rows - 1)
    count = min(count, rows - first)
    chunk = draw(seed, "dare_ties", "layer.0.w", 2, first * cols, (count, cols))
    assert torch.equal(chunk, whole[first : first + count])
    assert not torch.equal(draw(seed, "dare_ties", "layer.0.w", 3, 0, (rows, cols)), whole) or rows * cols < 2
