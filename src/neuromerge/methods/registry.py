"""Method registry: ``@method`` registers a :class:`MergeMethod` subclass under its name and aliases."""

from __future__ import annotations

from typing import TypeVar

from ..errors import ConfigError
from .base import MergeMethod

_REGISTRY: dict[str, type[MergeMethod]] = {}
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound=type[MergeMethod])


def method(cls: M) -> M:
    """Class decorator registering a merge method under ``cls.name`` and ``cls.aliases``."""
    for key in (cls.name, *cls.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"merge method name {key!r} registered twice")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


#: modules of the upper layers whose methods join the registry, imported by name with the built-in ones (the
#: data-aware methods: ``neuromerge methods`` lists their parameters; the static engine refuses them). Layer 1 holds
#: no ``import`` of them (DESIGN.md's layer rule, tests/test_layers.py).
EXTENSIONS: tuple[str, ...] = ("neuromerge.data_aware.methods",)


def _load_builtin() -> None:
    import importlib

    from . import builtin  # noqa: F401  (imports every method module, which registers itself)

    for name in EXTENSIONS:
        importlib.import_module(name)


def available() -> dict[str, type[MergeMethod]]:
    """All registered methods by canonical name, sorted."""
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[MergeMethod]:
    """The method class registered as ``name`` (canonical name or alias)."""
    _load_builtin()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise ConfigError(f"unknown merge method {name!r}; known methods: {known}")
    return _REGISTRY[key]
