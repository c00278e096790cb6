"""``neuromerge route``: ``info FOLDER`` (manifest summary) and ``build METHOD`` (registered builders).

Builders are registered by the routed methods' modules (``BUILDERS["min_merging"] = build_fn``); a builder is
called as ``build_fn(params: dict, out: Path, *, force: bool) -> Path`` with ``params`` the parsed YAML of
``--config`` (empty without one), plus ``source=`` (the config file: relative paths resolve against its folder) and
``allow_download=`` when its signature takes them. Modules named in :data:`BUILDER_MODULES` are imported on demand.
An error's message may hold several lines (one problem each): the CLI prints each as ``error: …``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from neuromerge.errors import NeuromergeError
from neuromerge.io.output_guard import check_output

#: method name → builder ``(params, out, *, force) -> Path``
BUILDERS: dict[str, Callable[..., Path]] = {}
#: method name → module that registers its builder when imported
BUILDER_MODULES = {
    "min_merging": "neuromerge.routing.min_merging",
    "twin": "neuromerge.routing.twin",
    "emr": "neuromerge.routing.emr",
    "merge": "neuromerge.search.merge_run",
    "wemoe": "neuromerge.routing.wemoe",
}

route_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Routed models: inspect and build.")


def register_builder(name: str, fn: Callable[..., Path]) -> Callable[..., Path]:
    """``BUILDERS[name] = fn``; returns ``fn`` (usable as a decorator through ``functools.partial``)."""
    BUILDERS[name] = fn
    return fn


def _import_builder(method: str) -> None:
    """Import the module that registers ``method``'s builder (a module that is not installed is skipped)."""
    try:
        importlib.import_module(BUILDER_MODULES[method])
    except ModuleNotFoundError as e:
        if e.name != BUILDER_MODULES[method]:
            raise


def available_builders() -> list[str]:
    """Every routed method with a builder, after importing the modules that register them (they do so lazily)."""
    for method in BUILDER_MODULES:
        if method not in BUILDERS:
            _import_builder(method)
    return sorted(BUILDERS)


def find_builder(method: str) -> Callable[..., Path]:
    """The registered builder of ``method`` (importing its module first if needed); NeuromergeError if none."""
    if method not in BUILDERS and method in BUILDER_MODULES:
        _import_builder(method)
    if method not in BUILDERS:
        known = ", ".join(available_builders()) or "none registered"
        raise NeuromergeError(f"no routed-model builder for {method!r} (available: {known})")
    return BUILDERS[method]


def call_builder(method: str, params: dict[str, Any], out: Path, *, force: bool = False,
                 source: Path | None = None, allow_download: bool = False) -> Path:
    """Run ``method``'s builder; ``source`` and ``allow_download`` go to builders whose signature takes them
    (``--allow-download`` is refused for one that does not: it would be ignored)."""
    fn = find_builder(method)
    sig = inspect.signature(fn).parameters
    takes = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    kwargs: dict[str, Any] = {"force": force}
    if takes or "source" in sig:
        kwargs["source"] = source
    if takes or "allow_download" in sig:
        kwargs["allow_download"] = allow_download
    elif allow_download:
        raise NeuromergeError(f"--allow-download does not apply to `route build {method}` (it reads no hub model)")
    return fn(params, out, **kwargs)


def _fail(err: NeuromergeError) -> None:
    """Print every line of the error as ``error: …`` on stderr."""
    for line in str(err).splitlines() or [type(err).__name__]:
        typer.echo(f"error: {line}", err=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest's summary: method, tasks, experts (kind, modules, ranks), storage, policy, router, base."""
    method = doc.get("method")
    if method == "merge":  # a MERGE library: groups of merged modules, one chain per task
        lib = doc["library"]
        experts: list[dict[str, Any]] = []
        policy = {"kind": "chain per predicted task", "modules": lib["modules"], "quantized": lib["quantized"]}
    elif method == "wemoe":  # WEMoE: per-MLP routers mixing every task's vector of the MLP's linears
        spec = doc["wemoe"]
        linears = sum(len(g["linears"]) for g in spec["groups"])
        experts = [{"name": t, "kind": "task_vector", "modules": linears, "ranks": []} for t in doc["tasks"]]
        policy = {"kind": "per-MLP weight ensembling", "gate": spec["gate"], "routed_mlps": len(spec["groups"]),
                  "backbone_tensors": len(spec.get("backbone_tensors", []))}
    else:
        experts = []
        for e in doc["experts"]:
            ranks = sorted({v["rank"] for v in e["modules"].values() if "rank" in v})
            experts.append({"name": e["name"], "kind": e["kind"], "modules": len(e["modules"]), "ranks": ranks})
        policy = doc["policy"]
    base = doc["base"]
    return {
        "method": method,
        "tasks": doc["tasks"],
        "experts": experts,
        "storage_bytes": doc.get("storage_bytes", {}),
        "policy": policy,
        "router": doc["router"],
        "base": {"ref": base.get("ref"), "embedded": base.get("embedded", False), "class": base.get("class")},
        **trust_summary(doc),
    }


def trust_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """What a user checks before trusting a routed folder: ``router_validation`` (per task ``accuracy``, ``n``,
    ``chance``, ``train_n``), ``router_pooled`` (accuracy over all validation inputs against the majority share),
    ``router_warnings`` (near or below chance: :func:`~neuromerge.routing.router_fit.near_chance`), ``heads`` (the
    tasks with a stored head) and ``inputs`` (per task and split: ``n``, ``used``, ``router``; the rows are in
    manifest.json). None / empty for folders written before these were recorded."""
    from neuromerge.routing.router_fit import near_chance, pooled_validation

    rv = doc.get("router_validation")
    inputs = doc.get("inputs") or {}
    splits = ("train", "val", "test")
    return {
        "router_validation": rv,
        "router_pooled": pooled_validation(rv) if rv else None,
        "router_warnings": near_chance(rv),
        "heads": sorted(doc.get("heads") or {}),
        "inputs": {t: {"seed": e.get("seed"), "file": e.get("file"),
                       **{k: {f: e[k].get(f) for f in ("n", "used", "router")} for k in splits if k in e}}
                   for t, e in inputs.items()},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def trust_lines(s: dict[str, Any]) -> list[str]:
    """Text lines of :func:`trust_summary`: router validation per task against chance, then the inputs."""
    lines = []
    rv = s.get("router_validation")
    if rv:
        pooled = s["router_pooled"]
        lines.append(f"router validation: {_pct(pooled['accuracy'])} on {pooled['n']} inputs (majority share "
                     f"{_pct(pooled['chance'])})")
        for t, v in rv.items():
            train = f", trained on {v['train_n']}" if "train_n" in v else ""
            lines.append(f"  {t}: {_pct(v['accuracy'])} on {v['n']} validation inputs (chance {_pct(v['chance'])})"
                         f"{train}")
    elif s.get("method") == "wemoe":
        lines.append("router validation: - (WEMoE's per-MLP routers weight experts; they are not task classifiers)")
    if s.get("heads") is not None:
        lines.append(f"heads: {', '.join(s['heads']) or '-'}")
    for t, e in (s.get("inputs") or {}).items():
        parts = [f"{k} {e[k]['used']}/{e[k]['n']}" + (f" (router {e[k]['router']})" if e[k].get("router") else "")
                 for k in ("train", "val", "test") if k in e]
        lines.append(f"inputs {t}: read {', '.join(parts)}; split seed {e['seed']}" +
                     (f", {e['file']}" if e.get("file") else ""))
    return lines


def _text(s: dict[str, Any]) -> str:
    lines = [f"method: {s['method']}", f"tasks: {', '.join(s['tasks'])}", f"experts ({len(s['experts'])}):"]
    for e in s["experts"]:
        ranks = f", rank {'/'.join(map(str, e['ranks']))}" if e["ranks"] else ""
        lines.append(f"  {e['name']}: {e['kind']}, {e['modules']} modules{ranks}")
    sb = s["storage_bytes"]
    lines.append("storage: " + ", ".join(f"{k} {_human(v)}" for k, v in sb.items()))
    lines.append(f"policy: {json.dumps(s['policy'])}")
    r = s["router"]
    lines.append(f"router: {json.dumps(r['config'])}, features {json.dumps(r['feature'])}")
    b = s["base"]
    lines.append(f"base: {b['ref'] or '-'}{' (embedded)' if b['embedded'] else ''} [{b['class']}]")
    lines += trust_lines(s)
    lines += [f"warning: {w}" for w in s.get("router_warnings") or []]
    return "\n".join(lines)


@route_app.command()
def info(
    folder: Annotated[Path, typer.Argument(help="routed-model folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Summarize the routed model in FOLDER: method, tasks, experts, storage, policy, router, base, the router's
    validation accuracy per task against chance, the stored heads and the inputs the build read."""
    from neuromerge.routing.folder import read_manifest

    try:
        s = summarize(read_manifest(folder))
    except NeuromergeError as err:
        _fail(err)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(s, indent=2) if as_json else _text(s))


@route_app.command()
def build(
    target: Annotated[str, typer.Argument(help="a routed method (min_merging, twin, emr, wemoe, merge) or a YAML "
                                                 "config whose `method:` key names it")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output routed-model folder")],
    config: Annotated[Path | None, typer.Option(help="YAML file of the builder's parameters")] = None,
    embed_base: Annotated[bool, typer.Option("--embed-base", help="store the base weights in the folder "
                                                                  "(self-contained)")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="fetch a base given as a Hugging Face id "
                                                                          "that is not in the local cache")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: cores; 1 on a busy machine)", min=1)]
    = None,
) -> None:
    """Build a routed model into OUT: `route build CONFIG.yaml -o OUT` (the config names its `method`) or
    `route build METHOD --config CONFIG.yaml -o OUT`. Relative paths in the config resolve against its folder;
    every problem of the config is reported (one `error:` line each) before anything is loaded. Prints the
    router's validation accuracy per task against chance (a `warning:` when near or below it)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        method, params, source = _method_and_params(target, config)
        if embed_base:
            params["embed_base"] = True
        for warning in check_output(out, route_inputs(target, source, params)):
            typer.echo(f"warning: {warning}", err=True)
        path = call_builder(method, params, out, force=force, source=source, allow_download=allow_download)
    except NeuromergeError as err:
        _fail(err)
        raise typer.Exit(2) from None
    typer.echo(f"wrote routed model {method} to {path}")
    from neuromerge.routing.folder import read_manifest

    try:
        trust = trust_summary(read_manifest(path))
    except NeuromergeError:  # a registered builder that writes no routed-model manifest: nothing to summarize
        return
    for line in trust_lines(trust):
        typer.echo(line)
    for w in trust["router_warnings"]:
        typer.echo(f"warning: {w}", err=True)


#: builder parameters that name an input path (RouteBuildConfig's base / tasks / experts, MERGE's search folder)
INPUT_KEYS = ("base", "tasks", "experts", "search", "task_file")


def route_inputs(target: str, config: Path | None, params: dict[str, Any]) -> list[str | Path]:
    """What ``route build`` reads, for :func:`~neuromerge.io.output_guard.check_output`: the config file, the paths
    its parameters name (base, tasks file, every expert adapter, a search folder) and the data files the tasks file
    lists (``file:`` entries, relative to its folder). Paths are taken as written; missing ones are skipped."""
    found: list[str | Path] = [p for p in (config, Path(target)) if p is not None and p.is_file()]
    here = config.parent if config is not None else Path(".")

    def located(raw: str) -> list[str | Path]:  # as written and relative to the config file (the builders' rule)
        return [raw] if Path(raw).is_absolute() else [raw, here / raw]

    for key in INPUT_KEYS:
        value = params.get(key)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str):
                found += located(v)
    tasks = params.get("tasks")
    task_file = next((Path(p) for p in located(tasks) if Path(p).is_file()), None) if isinstance(tasks, str) else None
    if task_file is not None:
        try:
            doc = _read_yaml(task_file)
        except Exception:  # a bad tasks file is reported by the builder that loads it
            doc = {}
        entries = doc.get("tasks") if isinstance(doc.get("tasks"), list) else []
        found += [task_file.parent / e["file"] for e in entries
                  if isinstance(e, dict) and isinstance(e.get("file"), str)]
    return found


def _read_yaml(path: Path) -> dict[str, Any]:
    from neuromerge.textfile import existing_file, load_yaml

    params = load_yaml(existing_file(path, "route config", missing="not found"), "route config") or {}
    if not isinstance(params, dict):
        raise NeuromergeError(f"{path} must hold a mapping of parameters")
    return params


def _method_and_params(target: str, config: Path | None) -> tuple[str, dict[str, Any], Path | None]:
    """``(method, builder parameters, config file)`` from ``route build TARGET [--config C]``."""
    looks_like_file = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    if looks_like_file:
        if config is not None:
            raise NeuromergeError("give the config once: `route build CONFIG.yaml` or `route build METHOD --config`")
        params = _read_yaml(Path(target))
        method = params.pop("method", None)
        if not isinstance(method, str):
            known = ", ".join(available_builders())
            raise NeuromergeError(f"{target} needs a `method:` key naming the routed method ({known})")
        return method, params, Path(target)
    params = _read_yaml(config) if config is not None else {}
    if params.get("method", target) != target:
        raise NeuromergeError(f"the config's method {params['method']!r} differs from {target!r}")
    params.pop("method", None)
    return target, params, config
