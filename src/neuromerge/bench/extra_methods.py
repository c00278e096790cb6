"""Non-static methods in the bench: data-aware merges (:mod:`.data_methods`) and routed models
(:mod:`.routed_methods`), adapted to the protocol's :data:`~.protocol.Runner` contract."""

from __future__ import annotations

from .protocol import Runner


def runners() -> dict[str, tuple[Runner, bool]]:
    """name → (runner, transductive) for every non-static method the bench can run."""
    from . import data_methods, routed_methods

    return {**data_methods.runners(), **routed_methods.runners()}
