"""Routed models: a frozen base + an expert library (low-rank factors or dense deltas) + a router.

Names are imported lazily (``import neuromerge.routing`` does not import torch):

- :class:`RoutedModel`, :class:`RoutedLinear`, :class:`RoutingError` (:mod:`.runtime`);
- :class:`LowRankExpert`, :class:`DenseExpert` (:mod:`.experts`);
- :class:`Router`, :func:`train_router` (:mod:`.router`);
- :class:`SoftGates`, :class:`TopKGates`, :class:`HierarchicalGates`, :class:`OneHotGates`,
  :func:`policy_from_dict` (:mod:`.policy`);
- :func:`save_routed`, :func:`load_routed`, :func:`read_manifest` (:mod:`.folder`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RoutedModel": "runtime",
    "RoutedLinear": "runtime",
    "RoutingError": "runtime",
    "FEATURE_FNS": "runtime",
    "final_hidden_mean": "runtime",
    "pool_features": "runtime",
    "LowRankExpert": "experts",
    "DenseExpert": "experts",
    "Router": "router",
    "train_router": "router",
    "GatePolicy": "policy",
    "SoftGates": "policy",
    "TopKGates": "policy",
    "HierarchicalGates": "policy",
    "OneHotGates": "policy",
    "policy_from_dict": "policy",
    "save_routed": "folder",
    "load_routed": "folder",
    "read_manifest": "folder",
    "ChainRoutedModel": "recombination",
    "Library": "recombination",
    "build_library": "recombination",
    "save_chain_routed": "recombination",
    "load_chain_routed": "recombination",
    "component_map": "components",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neuromerge.routing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuromerge.routing.{module}"), name)
