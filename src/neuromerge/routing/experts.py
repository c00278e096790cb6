"""Expert libraries of a routed model: per-module low-rank factors or dense deltas.

A low-rank expert changes linear module ``m`` by ``ΔW_m = B_m A_m`` (LoRA, Hu et al. 2021, arXiv 2106.09685:
``h = W0 x + B A x``; any scaling ``α / r`` is folded into ``B``); a dense expert stores ``ΔW_m`` itself
(EMR-Merging, WEMoE, Twin-Merging's non-low-rank tensors). Module names are the names of the ``nn.Linear``
modules inside the base module (a tensor name without ``.weight``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from neuromerge.errors import ConfigError


@dataclass
class LowRankExpert:
    """``ΔW_m = B @ A`` for each module ``m``: ``factors[m] = (A (r, in), B (out, r))`` (a conv: ``in`` =
    ``in_channels · kh · kw``, groups 1)."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    kind = "lowrank"

    def modules(self) -> list[str]:
        """Module names this expert changes, in insertion order."""
        return list(self.factors)

    def rank(self, module: str) -> int:
        """``r`` of the factors of ``module``."""
        return int(self.factors[module][0].shape[0])

    def delta(self, module: str) -> torch.Tensor:
        """The dense ``ΔW = B A`` of ``module`` (for tests and materialized merges)."""
        a, b = self.factors[module]
        return b @ a

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<module>.A": A, "<module>.B": B}``."""
        out = {}
        for m, (a, b) in self.factors.items():
            out[f"{m}.A"], out[f"{m}.B"] = a, b
        return out


@dataclass
class DenseExpert:
    """``ΔW_m`` stored dense: ``deltas[m]`` of shape ``(out, in)`` (a conv kernel: its own shape or
    ``(out, in/groups · kh · kw)``)."""

    name: str
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    kind = "dense"

    def modules(self) -> list[str]:
        """Module names this expert changes, in insertion order."""
        return list(self.deltas)

    def delta(self, module: str) -> torch.Tensor:
        """``ΔW`` of ``module``."""
        return self.deltas[module]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<module>.delta": ΔW}``."""
        return {f"{m}.delta": d for m, d in self.deltas.items()}


Expert = LowRankExpert | DenseExpert


def validate_experts(experts: Sequence[Expert]) -> None:
    """Check names are unique, factor shapes agree (``A (r, in)``, ``B (out, r)``), deltas are 2-D.

    Raises :class:`ConfigError` naming the expert and module at fault.
    """
    if not experts:
        raise ConfigError("a routed model needs at least one expert")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ConfigError(f"expert names must be unique, got {names}")
    for e in experts:
        if isinstance(e, LowRankExpert):
            for m, (a, b) in e.factors.items():
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                    raise ConfigError(
                        f"expert {e.name!r} module {m!r}: factors must be A (r, in) and B (out, r), got "
                        f"A {tuple(a.shape)} and B {tuple(b.shape)}"
                    )
        elif isinstance(e, DenseExpert):
            for m, d in e.deltas.items():
                if d.dim() < 2:
                    raise ConfigError(f"expert {e.name!r} module {m!r}: ΔW must be 2-D (a conv kernel: 4-D), got "
                                      f"{tuple(d.shape)}")
        else:
            raise ConfigError(f"unknown expert type {type(e).__name__}; use LowRankExpert or DenseExpert")


def routed_modules(experts: Iterable[Expert]) -> list[str]:
    """Union of the module names of ``experts``, in first-seen order."""
    seen: dict[str, None] = {}
    for e in experts:
        seen.update(dict.fromkeys(e.modules()))
    return list(seen)


def content_key(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: equal keys ⇔ identical stored tensors."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dedupe(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each distinct tensor once.

    Returns ``(stored, mapping)``: ``stored`` maps a short key (``t0``, ``t1``…) to a tensor, ``mapping`` maps
    each given name to its key. Identical tensors (same dtype, shape and bytes) share a key.
    """
    stored: dict[str, torch.Tensor] = {}
    by_hash: dict[str, str] = {}
    mapping: dict[str, str] = {}
    for name, t in tensors:
        h = content_key(t)
        key = by_hash.get(h)
        if key is None:
            key = by_hash[h] = f"t{len(stored)}"
            stored[key] = t.detach().cpu().contiguous()
        mapping[name] = key
    return stored, mapping


def stored_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` after deduplication by content."""
    stored, _ = dedupe((str(i), t) for i, t in enumerate(tensors))
    return sum(t.numel() * t.element_size() for t in stored.values())
