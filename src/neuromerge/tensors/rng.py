"""Counter-based random numbers: a draw depends only on its key and its position, never on threads or chunks.

``key_seed(seed, method, tensor_name, model_index)`` hashes the key with BLAKE2b; the draw for entry ``i`` of a
tensor is the SplitMix64 finaliser (Steele et al. 2014) of ``key + (i+1)·φ64``, mapped to ``[0, 1)`` with 24
bits. Processing a tensor whole or in row chunks, on one thread or eight, gives the same mask.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def key_seed(*parts: object) -> int:
    """64-bit seed from a key such as ``(seed, method, tensor_name, model_index)``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(seed: int, start: int, count: int) -> torch.Tensor:
    """``count`` float32 draws in ``[0, 1)`` for positions ``start .. start+count-1`` of stream ``seed``."""
    with np.errstate(over="ignore"):
        z = np.arange(start + 1, start + count + 1, dtype=np.uint64) * _GOLDEN + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    out = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy(out)


def draw(seed: int, method: str, tensor_name: str, model_index: int, start: int, shape: tuple[int, ...]
         ) -> torch.Tensor:
    """Uniform draws shaped ``shape`` for entries ``start ..`` (flat, in canonical layout) of a tensor, keyed by
    (seed, method, tensor name, model index)."""
    n = 1
    for s in shape:
        n *= s
    return uniform(key_seed(seed, method, tensor_name, model_index), start, n).reshape(shape)
