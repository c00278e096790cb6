"""Gate policies: per-sample router probabilities ``p (B, E)`` → per-module gates ``g (B, E)``.

* :class:`SoftGates` — ``g = p`` (Twin-Merging, Lu et al. 2024, arXiv 2406.15479: the router's softmax weights
  the shared + exclusive knowledge of every expert);
* :class:`TopKGates` — keep each row's ``k`` largest probabilities, optionally renormalized to sum 1 (sparse
  MoE gating, Shazeer et al. 2017; MIN-Merging's router stage);
* :class:`HierarchicalGates` — MIN-Merging (arXiv 2510.17890, docs/methods/spec.md §3 step 4): with ``e1 = argmax p``,
  a module in ``core[e1]`` gets the one-hot gate of ``e1``, any other module the top-k renormalized gates;
* :class:`OneHotGates` — ``g = onehot(argmax p)`` (EMR-Merging with a router-predicted task id).

Ties in ``argmax`` / top-k go to the lower expert index (``torch.topk`` on CPU, ``argmax``: first maximum).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from neuromerge.errors import ConfigError


class GatePolicy:
    """Base policy. ``module_independent`` is True when ``gates`` ignores ``module`` (computed once per batch)."""

    name: ClassVar[str] = "base"
    module_independent: ClassVar[bool] = True

    def gates(self, probs: torch.Tensor, module: str) -> torch.Tensor:
        """``(B, E)`` gates of ``module`` for probabilities ``probs (B, E)``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable description; :func:`policy_from_dict` inverts it."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GatePolicy) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def one_hot_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``onehot(argmax_j p_j)`` per row, in ``probs``' dtype (first maximum on ties)."""
    idx = probs.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, 1.0)


def top_k(probs: torch.Tensor, k: int, renormalize: bool) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of each row; with ``renormalize`` divide by the kept sum.

    ``g_j = p_j · [j ∈ TopK(p)] / Σ_{i ∈ TopK(p)} p_i`` (a zero kept sum leaves zeros). Differentiable in
    the kept entries.
    """
    k = min(k, probs.shape[-1])
    idx = probs.topk(k, dim=-1).indices
    mask = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    kept = probs * mask
    if not renormalize:
        return kept
    total = kept.sum(dim=-1, keepdim=True)
    return kept / torch.where(total > 0, total, torch.ones_like(total))


class SoftGates(GatePolicy):
    """``g = p``."""

    name = "soft"

    def gates(self, probs: torch.Tensor, module: str) -> torch.Tensor:
        return probs


class TopKGates(GatePolicy):
    """Top-``k`` probabilities per row (see :func:`top_k`)."""

    name = "topk"

    def __init__(self, k: int = 2, renormalize: bool = True) -> None:
        if k < 1:
            raise ConfigError(f"TopKGates needs k >= 1, got {k}")
        self.k = int(k)
        self.renormalize = bool(renormalize)

    def gates(self, probs: torch.Tensor, module: str) -> torch.Tensor:
        return top_k(probs, self.k, self.renormalize)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "renormalize": self.renormalize}


class HierarchicalGates(GatePolicy):
    """MIN-Merging's hierarchical merge: ``g_m = onehot(e1)`` if ``m ∈ core[e1]`` else top-k renormalized.

    ``core`` maps an expert index to the set of module names that are core layers of that expert.
    """

    name = "hierarchical"
    module_independent = False

    def __init__(self, k: int, core: dict[int, set[str]]) -> None:
        if k < 1:
            raise ConfigError(f"HierarchicalGates needs k >= 1, got {k}")
        self.k = int(k)
        self.core = {int(e): set(mods) for e, mods in core.items()}

    def gates(self, probs: torch.Tensor, module: str) -> torch.Tensor:
        e1 = probs.argmax(dim=-1)
        owners = torch.tensor([e for e, mods in self.core.items() if module in mods], dtype=e1.dtype,
                              device=e1.device)
        in_core = torch.isin(e1, owners)
        hot = torch.zeros_like(probs).scatter(-1, e1[:, None], 1.0)
        return torch.where(in_core[:, None], hot, top_k(probs, self.k, renormalize=True))

    def to_dict(self) -> dict[str, Any]:
        core = {str(e): sorted(m) for e, m in sorted(self.core.items())}
        return {"name": self.name, "k": self.k, "core": core}


class OneHotGates(GatePolicy):
    """``g = onehot(argmax p)``."""

    name = "onehot"

    def gates(self, probs: torch.Tensor, module: str) -> torch.Tensor:
        return one_hot_argmax(probs)


POLICIES: dict[str, type[GatePolicy]] = {
    cls.name: cls for cls in (SoftGates, TopKGates, HierarchicalGates, OneHotGates)
}


def policy_from_dict(d: dict[str, Any]) -> GatePolicy:
    """Rebuild a policy from :meth:`GatePolicy.to_dict`'s output; :class:`ConfigError` on unknown names."""
    if not isinstance(d, dict) or d.get("name") not in POLICIES:
        known = ", ".join(sorted(POLICIES))
        raise ConfigError(f"unknown gate policy {d.get('name') if isinstance(d, dict) else d!r}; known: {known}")
    args = {k: v for k, v in d.items() if k != "name"}
    if d["name"] == "hierarchical":
        args["core"] = {int(e): set(m) for e, m in args.get("core", {}).items()}
    try:
        return POLICIES[d["name"]](**args)
    except TypeError as e:
        raise ConfigError(f"bad parameters for gate policy {d['name']!r}: {e}") from None
