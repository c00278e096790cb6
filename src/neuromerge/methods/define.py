"""Function-style method definition: :func:`merge_function` turns one typed function into a registered
:class:`~neuromerge.methods.base.MergeMethod` (the idea of mergekit's ``easy_define.merge_method``).

The function is the per-tensor formula::

    @merge_function(name="nearswap", summary="...", source="...", min_models=1, max_models=1)
    def nearswap(base: Tensor, models: Sequence[Tensor], *,
                 t: Annotated[float, Field(gt=0, description="similarity threshold")] = 0.001) -> Tensor:
        '''formula and its source (becomes the class docstring)'''
        ...

* **Positional parameters** are recognised by name and receive, for one tensor (or one row chunk of it), in fp32
  canonical layout (:class:`~neuromerge.methods.base.MergeInput`): ``base`` (``θ0``), ``models`` (``[θ_t]``),
  ``deltas`` (``[τ_t = θ_t − θ0]``), ``weights`` (``[w_t]``, the per-model ``weight``), ``name`` (the tensor's
  name) and ``x`` (the whole ``MergeInput``: ``kind``, ``rows``, ``full_shape``, ``stats``, ``random_uniform``,
  ``report`` …). Any other positional name is a definition-time error.
* **Keyword-only parameters** become the fields of the generated pydantic ``Params`` model, in order, after
  ``weight`` (from :class:`~neuromerge.methods.base.MethodParams`, or from ``params_base``). Each needs a default;
  ranges, descriptions and aliases come from ``Annotated[T, Field(...)]``; a ``float`` becomes
  :data:`~neuromerge.numeric.FiniteFloat` (NaN / ±Inf / beyond float32 refused when the config is validated).
* **Per-model parameters** are annotated :class:`PerModel` (``PerModel[float]``, ``Annotated[PerModel[float],
  Field(gt=0, le=1)]``): the config may set them per model (``models[i].parameters``), they join
  ``per_model_params``, and the function receives a list with one value per model.

The decorator returns the generated class (registered under ``name`` and ``aliases``, so ``neuromerge methods
NAME`` shows it like any other); the undecorated function stays reachable as ``cls.formula`` for float64
reference tests. Methods that need a statistics pass (``global_densities``) or a fused kernel keep the class form
(:mod:`neuromerge.methods.base`).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import torch
from pydantic import create_model

from ..numeric import FiniteFloat
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method

T = TypeVar("T")

#: positional parameter names a formula may take, and how each is read from the :class:`MergeInput`
POSITIONAL: dict[str, Callable[[MergeInput[Any]], Any]] = {
    "base": lambda x: x.base,
    "models": lambda x: x.models,
    "deltas": lambda x: x.deltas,
    "weights": lambda x: x.weights,
    "name": lambda x: x.name,
    "x": lambda x: x,
}

CheckFn = Callable[[str, Any, Sequence[Any]], None]


class PerModel(list[T]):
    """Annotation of a keyword parameter that may differ per model: the formula receives a list of its values, one
    per model, in the order of ``models`` (``PerModel[float]`` declares a float field of the ``Params`` model)."""


class DefinitionError(TypeError):
    """A function that :func:`merge_function` cannot turn into a method (raised at import, never at merge time)."""


def _finite(annotation: Any) -> Any:
    """``annotation`` with every bare ``float`` replaced by :data:`FiniteFloat` (inside ``Annotated``, unions,
    ``list[...]``, ``tuple[...]``)."""
    if annotation is float:
        return FiniteFloat
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        return Annotated[(_finite(inner), *meta)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_finite(a) for a in get_args(annotation))]  # noqa: UP007 (built from a tuple)
    if origin in (list, tuple, Sequence) and get_args(annotation):
        return origin[tuple(_finite(a) for a in get_args(annotation))] if origin is tuple else origin[
            _finite(get_args(annotation)[0])]
    return annotation


def _per_model(annotation: Any) -> tuple[bool, Any]:
    """``(True, field type)`` for ``PerModel[T]`` or ``Annotated[PerModel[T], meta...]``; ``(False, annotation)``
    otherwise."""
    meta: tuple[Any, ...] = ()
    inner = annotation
    if get_origin(inner) is Annotated:
        inner, *rest = get_args(inner)
        meta = tuple(rest)
    if get_origin(inner) is PerModel or inner is PerModel:
        args = get_args(inner)
        if len(args) != 1:
            raise DefinitionError("PerModel needs one type argument, e.g. PerModel[float]")
        item = args[0]
        return True, Annotated[(item, *meta)] if meta else item
    return False, annotation


def class_name_of(name: str) -> str:
    """The class name a method name gets: ``task_arithmetic`` → ``TaskArithmetic``, ``_first-model`` →
    ``FirstModel``."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part)


def merge_function(
    *,
    name: str,
    summary: str,
    source: str,
    aliases: Sequence[str] = (),
    chunkable: bool = True,
    needs_base: bool = True,
    averages_weights: bool = False,
    interpolates_base: bool = False,
    ignored_params: Sequence[str] = (),
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    check: CheckFn | None = None,
    params_base: type[MethodParams] = MethodParams,
    class_name: str | None = None,
    params_name: str | None = None,
) -> Callable[[Callable[..., torch.Tensor]], type[MergeMethod[Any]]]:
    """Decorator: register the decorated per-tensor formula as merge method ``name`` and return the generated
    :class:`MergeMethod` subclass.

    ``summary`` / ``source`` / ``aliases`` / ``chunkable`` / ``needs_base`` / ``averages_weights`` /
    ``interpolates_base`` / ``ignored_params`` (keys mergekit accepts and ignores for this method: a warning, not an
    error) / ``min_models`` / ``max_models`` / ``random`` are the class attributes of :class:`MergeMethod` (same
    meaning). ``check(name, params, per_model)`` refuses resolved parameters of one tensor at planning
    (:meth:`MergeMethod.check`; raise :class:`~neuromerge.errors.ConfigError`). ``params_base`` is the base of the
    generated ``Params`` model (e.g. a model that refuses per-model weights); ``class_name`` / ``params_name`` name
    the generated classes (default: ``name`` in CamelCase, plus ``Params``).
    """

    def decorate(fn: Callable[..., torch.Tensor]) -> type[MergeMethod[Any]]:
        where = f"merge_function {name!r} ({fn.__module__}.{fn.__qualname__})"
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as err:
            raise DefinitionError(f"{where}: cannot resolve its annotations: {err}") from err
        positional: list[str] = []
        fields: dict[str, Any] = {}
        per_model: set[str] = set()
        for pname, p in inspect.signature(fn).parameters.items():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if pname not in POSITIONAL:
                    raise DefinitionError(
                        f"{where}: positional parameter {pname!r} is not one of {', '.join(POSITIONAL)} "
                        "(method parameters must be keyword-only: put them after `*`)")
                if p.default is not p.empty:
                    raise DefinitionError(f"{where}: positional parameter {pname!r} cannot have a default")
                positional.append(pname)
            elif p.kind == p.KEYWORD_ONLY:
                if pname in params_base.model_fields:
                    raise DefinitionError(
                        f"{where}: keyword parameter {pname!r} is already a field of {params_base.__name__} "
                        "(per-model weights arrive through the positional `weights`)")
                if p.default is p.empty:
                    raise DefinitionError(f"{where}: keyword parameter {pname!r} needs a default")
                if pname not in hints:
                    raise DefinitionError(f"{where}: keyword parameter {pname!r} needs a type annotation")
                is_per_model, annotation = _per_model(hints[pname])
                if is_per_model:
                    per_model.add(pname)
                fields[pname] = (_finite(annotation), p.default)
            else:
                raise DefinitionError(f"{where}: *args / **kwargs are not supported ({pname!r})")
        if not positional:
            raise DefinitionError(f"{where}: takes none of the tensors ({', '.join(POSITIONAL)})")
        cls_name = class_name or class_name_of(name)
        params_model = create_model(  # type: ignore[call-overload]
            params_name or f"{cls_name}Params", __base__=params_base, __module__=fn.__module__,
            __doc__=f"Parameters of ``{name}``.", **fields,
        )
        readers = [POSITIONAL[p] for p in positional]
        keywords = tuple(fields)
        listed = frozenset(per_model)

        def merge(self: MergeMethod[Any], x: MergeInput[Any]) -> torch.Tensor:
            kw = {k: [getattr(p, k) for p in x.per_model] if k in listed else getattr(x.params, k) for k in keywords}
            return fn(*(read(x) for read in readers), **kw)

        merge.__doc__ = f"``{fn.__qualname__}`` on the tensors of ``x`` and its parameters."
        namespace: dict[str, Any] = {
            "__module__": fn.__module__,
            "__qualname__": cls_name,
            "__doc__": inspect.getdoc(fn),
            "name": name,
            "aliases": tuple(aliases),
            "Params": params_model,
            "summary": summary,
            "source": source,
            "chunkable": chunkable,
            "min_models": min_models,
            "max_models": max_models,
            "random": random,
            "needs_base": needs_base,
            "averages_weights": averages_weights,
            "interpolates_base": interpolates_base,
            "ignored_params": frozenset(ignored_params),
            "per_model_params": frozenset({"weight"}) | listed,
            "formula": staticmethod(fn),
            "merge": merge,
        }
        if check is not None:
            checker = check

            def check_method(self: MergeMethod[Any], tensor: str, params: Any, per_model: Sequence[Any]) -> None:
                checker(tensor, params, per_model)

            check_method.__doc__ = inspect.getdoc(check) or MergeMethod.check.__doc__
            namespace["check"] = check_method
        cls = types.new_class(cls_name, (MergeMethod,), {}, lambda ns: ns.update(namespace))
        return method(cls)

    return decorate


__all__ = ["POSITIONAL", "DefinitionError", "PerModel", "class_name_of", "merge_function"]
