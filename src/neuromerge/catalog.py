"""Every method neuromerge runs, with the command that runs it, its parameters and its source (``neuromerge
methods``).

Four kinds:

- **static** — every method of the registry (:mod:`neuromerge.methods`): ``neuromerge merge``;
- **data-aware** — registry entries with ``data_aware = True`` (Fisher, RegMean, AdaMerging, AdaMerging++): they read
  task data, so ``neuromerge merge`` runs them with a ``data:`` section (and the bench with ``--methods``);
- **routed** — MIN-Merging, Twin-Merging, EMR-Merging, WEMoE: ``neuromerge route build NAME --config`` (a base, PEFT
  adapters and a task file);
- **search** — MERGE: ``neuromerge search`` for the Pareto front, then ``neuromerge route build merge``.

Static and data-aware entries are read from the registry at call time (a newly registered method appears by
itself); the routed and search entries are listed here (:data:`ROUTED`). A parameter model is named either as a class
or as a ``"module:attr"`` string resolved when the parameters are asked for: some of them still live in the bench
harness, which the library must not import when this module is imported (layer rule: only ``cli.py`` imports
``neuromerge.bench``). When such a model moves, only its string changes; ``tests/test_methods_catalog.py`` checks that
every string resolves.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError

Kind = Literal["static", "data-aware", "routed", "search"]
KINDS: tuple[Kind, ...] = ("static", "data-aware", "routed", "search")


@dataclass(frozen=True)
class ParamSection:
    """One pydantic model of parameters and where they go (``params:`` of a route config, a search config...)."""

    name: str
    model: Any  # a pydantic model class, or "module:attr"
    where: str = ""
    #: field names left out (e.g. a route config's ``params``, shown as the method's own section)
    skip: tuple[str, ...] = ()

    def resolve(self) -> Any:
        return resolve(self.model)


@dataclass(frozen=True)
class CatalogEntry:
    """A method as ``neuromerge methods`` shows it."""

    name: str
    kind: Kind
    command: str
    summary: str
    source: str
    aliases: tuple[str, ...] = ()
    #: other commands that run it (the bench)
    also: tuple[str, ...] = ()
    sections: tuple[ParamSection, ...] = ()
    #: "module:attr" of a mapping whose keys ``NAME:variant`` are the method's variants (bench ablations included)
    variants: str | None = None
    #: the registry class of static / data-aware methods (its ``Params``, ``min_models``…)
    cls: Any = field(default=None, compare=False)
    docs: str = ""


def resolve(ref: Any) -> Any:
    """``ref`` itself, or the object a ``"package.module:attr"`` string names (imported now)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------- routed / search
#: where a routed method's configuration is defined (``neuromerge route build NAME --config``)
ROUTE_CONFIG = "neuromerge.routing.build_config:RouteBuildConfig"
_ROUTE_CONFIG_SECTION = ParamSection("route build config", ROUTE_CONFIG, "top-level keys of --config", skip=("params",))

ROUTED: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="min_merging", kind="routed", command="route build min_merging",
        aliases=("min-merging", "minmerging"),
        summary="routed LoRA experts: pruned experts (core / harmful layers, important neurons), MLP router, top-k "
                "gates with the top expert alone in its core layers",
        source="Liang 2025, arXiv 2510.17890 (no public code; reconstruction in docs/min_merging.md)",
        also=("bench SUITE --mode lora --methods min_merging",),
        sections=(ParamSection("params", "neuromerge.routing.build:MinMergingParams", "params: of --config"),
                  _ROUTE_CONFIG_SECTION),
        variants="neuromerge.routing.build:VARIANTS", docs="docs/min_merging.md"),
    CatalogEntry(
        name="twin", kind="routed", command="route build twin", aliases=("twin_merging", "twin-merging"),
        summary="Twin-Merging: Task Arithmetic shared expert + SVD-compressed exclusive vectors mixed by a soft router",
        source="Lu et al. 2024, arXiv 2406.15479 (LZY-the-boys/Twin-Merging)",
        also=("bench SUITE --methods twin",),
        sections=(ParamSection("params", "neuromerge.routing.build:TwinParams", "params: of --config"),
                  _ROUTE_CONFIG_SECTION),
        variants="neuromerge.routing.build:VARIANTS", docs="docs/min_merging.md"),
    CatalogEntry(
        name="emr", kind="routed", command="route build emr", aliases=("emr_merging", "emr-merging"),
        summary="EMR-Merging: unified task vector + per-task masks and rescalers, the task picked by a router",
        source="Huang et al. 2024, arXiv 2405.17461 (harveyhuang18/EMR_Merging)",
        also=("bench SUITE --methods emr:router",),
        sections=(ParamSection("params", "neuromerge.routing.build:EMRParams", "params: of --config"),
                  _ROUTE_CONFIG_SECTION),
        variants="neuromerge.routing.build:VARIANTS", docs="docs/min_merging.md"),
    CatalogEntry(
        name="wemoe", kind="routed", command="route build wemoe", aliases=("we-moe",),
        summary="WEMoE: Task Arithmetic outside the MLPs; routed MLPs W0 + Σ r_t(x) τ_t, routers trained by "
                "test-time entropy minimization",
        source="Tang et al. 2024, arXiv 2402.00433 (tanganke/weight-ensembling_MoE); fusion-bench we_moe",
        also=("bench SUITE --methods wemoe",),
        sections=(ParamSection("params", "neuromerge.data_aware.wemoe:WEMoEParams", "params: of --config"),
                  _ROUTE_CONFIG_SECTION),
        docs="docs/data_aware.md"),
    CatalogEntry(
        name="merge", kind="search", command="search CONFIG -o RUN, then route build merge",
        aliases=("modular_expert_recombination",),
        summary="MERGE: per-component task partitions searched by surrogate-assisted NSGA-II (accuracy vs storage), "
                "an 8-bit module library and a router that runs each input's chain",
        source="Qiu, Wu, Feng, Tan 2026, arXiv 2602.06552 (no public code; reconstruction in docs/merge_search.md)",
        sections=(ParamSection("search config", "neuromerge.search.merge_run:SearchRunConfig",
                               "neuromerge search CONFIG"),
                  ParamSection("route build merge", "neuromerge.search.merge_run:RoutedMergeParams",
                               "neuromerge route build merge --config")),
        docs="docs/merge_search.md"),
)

_DATA_COMMAND = "merge (with data:)"


# --------------------------------------------------------------------------------------------------- the catalogue
def _registry_entry(cls: Any) -> CatalogEntry:
    data_aware = bool(getattr(cls, "data_aware", False))
    return CatalogEntry(
        name=cls.name, kind="data-aware" if data_aware else "static",
        command=_DATA_COMMAND if data_aware else "merge",
        summary=cls.summary, source=cls.source, aliases=tuple(cls.aliases),
        also=(f"bench SUITE --methods {cls.name}",) if data_aware else (),
        sections=(ParamSection("parameters", cls.Params, "parameters: of the merge config"),), cls=cls)


def entries() -> list[CatalogEntry]:
    """Every method: the registry's (static, then data-aware), then the routed and search ones. A registry entry
    that is also routed (WEMoE) is listed once, as routed, with the registry's summary and source."""
    from .methods import available

    routed = {e.name: e for e in ROUTED}
    out: list[CatalogEntry] = []
    for cls in available().values():
        e = _registry_entry(cls)
        if e.name in routed:
            r = routed[e.name]
            routed[e.name] = CatalogEntry(r.name, r.kind, r.command, cls.summary or r.summary, cls.source or r.source,
                                          tuple(dict.fromkeys((*r.aliases, *cls.aliases))), r.also, r.sections,
                                          r.variants, cls, r.docs)
            continue
        out.append(e)
    out.sort(key=lambda e: (KINDS.index(e.kind), e.name))
    return out + sorted(routed.values(), key=lambda e: (KINDS.index(e.kind), e.name))


def names() -> list[str]:
    """Every method name and alias."""
    return sorted({n for e in entries() for n in (e.name, *e.aliases)}, key=str.lower)


def get(name: str) -> CatalogEntry:
    """The entry named ``name`` (name or alias; case-insensitive for the routed spellings such as ``MERGE``);
    :class:`ConfigError` listing every method when none is."""
    all_entries = entries()
    for e in all_entries:
        if name == e.name or name in e.aliases:
            return e
    folded = name.lower().replace("-", "_")
    for e in all_entries:
        if folded in {n.lower().replace("-", "_") for n in (e.name, *e.aliases)}:
            return e
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(e.name for e in all_entries)}")


# --------------------------------------------------------------------------------------------------- description
def _constraints(info: Any) -> str:
    """``>0 <=1`` from the field's bounds, ``a|b`` for a ``Literal``, ``len>=1`` for a minimum length."""
    if get_origin(info.annotation) is Literal:
        return "|".join(str(a) for a in get_args(info.annotation))
    bounds = ((">", "gt"), (">=", "ge"), ("<", "lt"), ("<=", "le"))
    parts = [f"{k}{getattr(m, attr)}" for m in info.metadata for k, attr in bounds
             if getattr(m, attr, None) is not None]
    parts += [f"len>={m.min_length}" for m in info.metadata if getattr(m, "min_length", None) is not None]
    return " ".join(parts)


def describe_params(model: Any, skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``[{name, default, constraints, description}]`` of a pydantic model's fields; a field without a default has
    ``default: None`` and ``required: true``."""
    rows = []
    for fname, info in model.model_fields.items():
        if fname in skip:
            continue
        row = {"name": info.alias or fname, "default": None, "constraints": _constraints(info),
               "description": info.description or ""}
        if info.is_required():
            row["required"] = True
        else:
            row["default"] = info.get_default(call_default_factory=True)
        rows.append(row)
    return rows


def describe_method(cls: Any) -> dict[str, Any]:
    """A registry class as ``neuromerge methods --json`` has always shown it: name, aliases, summary, source,
    models, chunkable, parameters."""
    maxm = cls.max_models
    models = f"{cls.min_models}" if maxm == cls.min_models else f">= {cls.min_models}" + (
        f", <= {maxm}" if maxm else "")
    return {"name": cls.name, "aliases": list(cls.aliases), "summary": cls.summary, "source": cls.source,
            "models": models, "chunkable": cls.chunkable, "parameters": describe_params(cls.Params)}


def variants_of(entry: CatalogEntry) -> list[str]:
    """The entry's variants (``NAME:…`` keys of its variants mapping), resolved now."""
    if entry.variants is None:
        return []
    return [v for v in resolve(entry.variants) if v.split(":")[0] == entry.name and ":" in v]


def describe(entry: CatalogEntry, *, details: bool = True) -> dict[str, Any]:
    """The entry as a JSON-able dict: ``name, aliases, kind, command, also, summary, source, parameters`` (the first
    section's rows), ``sections`` (every section: ``name, where, parameters``) and ``docs`` / ``variants`` where
    known; static and data-aware entries also keep ``models`` and ``chunkable``. ``details=False`` leaves the
    parameters out (nothing is imported beyond the registry)."""
    doc: dict[str, Any] = describe_method(entry.cls) if entry.cls is not None and entry.kind != "routed" else {
        "name": entry.name, "aliases": list(entry.aliases), "summary": entry.summary, "source": entry.source}
    doc["aliases"] = list(entry.aliases)
    doc.update(kind=entry.kind, command=entry.command, also=list(entry.also))
    if entry.docs:
        doc["docs"] = entry.docs
    if not details:
        doc.pop("parameters", None)
        return doc
    sections = [{"name": s.name, "where": s.where, "parameters": describe_params(s.resolve(), s.skip)}
                for s in entry.sections]
    doc["parameters"] = sections[0]["parameters"] if sections else []
    doc["sections"] = sections
    variants = variants_of(entry)
    if variants:
        doc["variants"] = variants
    return doc


__all__ = ["KINDS", "ROUTED", "CatalogEntry", "ParamSection", "describe", "describe_method", "describe_params",
           "entries", "get", "names", "resolve", "variants_of"]
