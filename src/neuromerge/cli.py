"""``neuromerge`` command line: ``merge``, ``methods``, ``bench``, ``evaluate``, ``export-experts``, ``inspect``,
``search`` / ``search-worker`` (MERGE) and ``route`` (routed models: ``build``, ``info``)."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import NeuromergeError

#: default ``--chunk-mb``: ``engine.plan.DEFAULT_CHUNK_ELEMENTS`` fp32 entries (not imported here: it would import torch
#: for ``--help``)
CHUNK_MB = 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-grained model merging, one tensor at a time.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)  # pragma: no cover


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config (mergekit's shape)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (a Hugging Face model folder)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check everything and print the plan; write nothing")]
    = False,
    headers_only: Annotated[bool, typer.Option(
        "--headers-only", help="with --dry-run: check the headers only, skip reading the weights for NaN/Inf")]
    = False,
    threads: Annotated[int | None, typer.Option(help="worker threads (default: CPU cores)", min=1)] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    durable: Annotated[bool, typer.Option("--durable", help="fsync every file before the final rename")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    allow_download: Annotated[bool, typer.Option("--allow-download", help="fetch HF ids missing from the cache")]
    = False,
    chunk_mb: Annotated[int, typer.Option(help="row-chunk budget per model copy, MiB of fp32", min=1)] = CHUNK_MB,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bars")] = None,
    output_format: Annotated[str | None, typer.Option(
        "--output-format", help="full (a model folder) or lora (a PEFT adapter; every model must be a LoRA "
        "adapter); overrides the config's output.format")] = None,
    rank: Annotated[str | None, typer.Option(
        help="rank of a LoRA output: an integer (truncated SVD) or concat (exact, task_arithmetic / linear); "
        "implies --output-format lora")] = None,
) -> None:
    """Merge the models of CONFIG into the folder OUT (a model folder, or a LoRA adapter with --output-format lora)."""
    from .config import load_config, with_output
    from .engine.report import summarize_plan
    from .engine.run import Progress, check_merge_output, prepare, resolve_device
    from .engine.run import merge as run_merge
    from .engine.scan import scan_inputs
    from .io.writer import install_signal_cleanup

    chunk_elements = chunk_mb * 2**20 // 4
    try:
        if output_format not in (None, "full", "lora"):
            raise NeuromergeError(f"--output-format must be full or lora, got {output_format!r}")
        cfg = with_output(load_config(config), output_format, _parse_rank(rank))
        if cfg.data is not None:  # fisher / regmean / adamerging(++) on the user's task data
            _merge_with_data(cfg, config, out, dry_run=dry_run, threads=threads, force=force, durable=durable,
                             device=device, allow_download=allow_download)
            return
        if dry_run:
            resolve_device(device)  # what the run refuses, the dry run refuses
            plan = prepare(cfg, allow_download=allow_download, chunk_elements=chunk_elements)
            try:
                plan.warnings.extend(check_merge_output(plan, out, [config]))
                if out.exists() and not force:
                    raise NeuromergeError(f"output folder {out} exists; pass --force to replace it")
                scanned = None if headers_only else scan_inputs(plan, threads=threads or _cores(),
                                                                 progress=Progress(progress))
                _print_plan(summarize_plan(plan, threads or _cores()), scanned)
            finally:
                plan.pool.close()
            return
        install_signal_cleanup()
        result = run_merge(cfg, out, threads=threads, force=force, durable=durable, device=device,
                           allow_download=allow_download, chunk_elements=chunk_elements, progress=progress,
                           inputs=[config])
    except NeuromergeError as err:
        _fail(str(err))
        return
    rep = result.report
    for warning in rep["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(
        f"merged {rep['summary']['merged_tensors']} tensors with {rep['summary']['method']} into {out} "
        f"in {rep['timings_s']['total']:.1f} s (peak RSS {_human(rep['peak_rss_bytes'])})"
    )
    if "lora" in rep:
        lora = rep["lora"]
        worst = lora["max_discarded_energy"]
        typer.echo(f"LoRA adapter: {lora['modules']} modules, rank {lora['rank']}, discarded energy "
                   f"{100 * lora['discarded_energy']:.3g}% in total, at most {100 * worst['value']:.3g}% "
                   f"({worst['module']})")


def _merge_with_data(cfg: Any, config: Path, out: Path, *, dry_run: bool, threads: int | None, force: bool,
                     durable: bool, device: str, allow_download: bool) -> None:
    """`neuromerge merge` of a config with `data:` (:mod:`neuromerge.data_aware.merge`); errors propagate."""
    from .data_aware.merge import check_data_merge_output, merge_with_data, prepare_data_merge
    from .io.writer import install_signal_cleanup

    if dry_run:
        if device != "cpu":
            raise NeuromergeError(f"a data-aware merge runs on the CPU; --device {device} is not supported with "
                                  "`data:`")
        plan = prepare_data_merge(cfg, source=config, allow_download=allow_download)
        warnings = [*plan.warnings, *check_data_merge_output(plan, out, [config])]
        if out.exists() and not force:
            raise NeuromergeError(f"output folder {out} exists; pass --force to replace it")
        s = plan.summary()
        typer.echo(f"method           {s['method']} (data-aware)")
        typer.echo(f"base             {s['base_model']}")
        for m in s["models"]:
            typer.echo(f"model            {m['model']} (task {m['task']}, "
                       f"{s['examples_available'][m['task']]} {s['split']} examples)")
        typer.echo(f"data             {s['data']} (split {s['split']}"
                   f"{', transductive' if s['transductive'] else ''})")
        typer.echo(f"memory           {s['memory']}")
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
        typer.echo("ok: the config, the task file, every data file, the base and the experts' headers check out "
                   "(no weight read)")
        return
    install_signal_cleanup()
    result = merge_with_data(cfg, out, threads=threads, force=force, durable=durable, device=device,
                             allow_download=allow_download, inputs=[config], source=config)
    rep = result.report
    for warning in rep["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"merged {rep['summary']['merged_tensors']} tensors with {rep['summary']['method']} on "
               f"{len(rep['summary']['models'])} tasks ({rep['summary']['split']} split) into {out} in "
               f"{rep['timings_s']['total']:.1f} s (peak RSS {_human(rep['peak_rss_bytes'])}); heads in {out}/heads")


def _parse_rank(rank: str | None) -> int | str | None:
    """``--rank``: None, ``concat`` or an integer (validated as >= 1 by the config)."""
    if rank is None or rank == "concat":
        return rank
    try:
        return int(rank)
    except ValueError:
        raise NeuromergeError(f"--rank must be an integer or concat, got {rank!r}") from None


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _print_plan(summary: dict[str, Any], scanned: int | None = None) -> None:
    typer.echo(f"method           {summary['method']}")
    typer.echo(f"base             {summary['base_model']}")
    for m in summary["models"]:
        typer.echo(f"model            {m}")
    for sl in summary.get("slices", []):  # mergekit `slices`: output layers ← each source's layer range
        layers = sl["output_layers"]
        where = f"layers {layers[0]}..{layers[1] - 1}" if layers else "final tensors"
        srcs = " + ".join(f"{s['model']} [{s['layer_range'][0]}, {s['layer_range'][1]})" if "layer_range" in s
                          else s["model"] for s in sl["sources"])
        ends = {"pre": "embeddings", "post": "final norm / head"}
        extra = f" (with the {' and '.join(ends[e] for e in sl['with'])})" if sl["with"] and layers else ""
        typer.echo(f"slice {sl['slice']:<10} {where} <- {srcs}{extra}")
    typer.echo(f"tensors          {summary['tensors']} ({summary['merged_tensors']} merged, "
               f"{summary['copied_tensors']} copied from the base; {summary['chunked_tensors']} in row chunks)")
    typer.echo(f"parameters       {summary['merged_parameters']:,} merged")
    typer.echo(f"input size       {_human(summary['input_bytes'])}")
    typer.echo(f"output size      {_human(summary['output_bytes'])}")
    if summary["output"]["format"] == "lora":
        typer.echo(f"output           LoRA adapter, rank {summary['output']['rank']}, "
                   f"{summary['output']['modules']} modules")
    if summary.get("vocabulary"):
        v = summary["vocabulary"]
        typer.echo(f"vocabulary       {v['tokens']} tokens ({v['source']}), {v['rows']} embedding rows; "
                   f"{len(v['remapped_tensors'])} tensors permuted by token")
    typer.echo(f"peak memory      ~{_human(summary['estimated_peak_working_set_bytes'])} tensor working set "
               f"({summary['threads']} threads)")
    for w in summary["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    if scanned is None:
        typer.echo("ok: the config, the files and every tensor name, shape and dtype check out (weights not read: "
                   "--headers-only)")
    else:
        typer.echo("ok: the config, the files, every tensor name, shape and dtype, and every merged weight "
                   f"({scanned:,} entries per model, all finite) check out")


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="show one method's parameters")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List every method (static, data-aware, routed, MERGE) with the command that runs it, or one method's
    parameters with their defaults, ranges and descriptions."""
    from . import catalog

    try:
        chosen = [catalog.get(name)] if name else catalog.entries()
        rows = [catalog.describe(e, details=bool(name) or as_json) for e in chosen]
    except NeuromergeError as err:
        _fail(str(err))
        return
    if as_json:
        typer.echo(json.dumps(rows if name is None else rows[0], indent=2, default=str))
        return
    if name is None:
        width = max(len(r["name"]) for r in rows)
        cmd = max(len(r["command"]) for r in rows)
        for r in rows:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
            typer.echo(f"{r['name']:<{width}}  {r['kind']:<10}  {r['command']:<{cmd}}  {r['summary']}{alias}")
        typer.echo("`neuromerge methods NAME` shows a method's parameters")
        return
    r = rows[0]
    typer.echo(f"{r['name']}: {r['summary']}")
    if r["aliases"]:
        typer.echo(f"aliases: {', '.join(r['aliases'])}")
    typer.echo(f"kind: {r['kind']}; command: neuromerge {r['command']}")
    for other in r["also"]:
        typer.echo(f"also: neuromerge {other}")
    if r["source"]:
        typer.echo(f"source: {r['source']}")
    if r.get("docs"):
        typer.echo(f"docs: {r['docs']}")
    if "models" in r:
        typer.echo(f"models: {r['models']}; row-chunkable: {r['chunkable']}")
    if r.get("variants"):
        typer.echo(f"variants (bench ablations included): {', '.join(r['variants'])}")
    for i, section in enumerate(r["sections"]):
        if r["kind"] in ("static", "data-aware") and i == 0:
            typer.echo("parameters:")
        else:
            typer.echo(f"{section['name']} ({section['where']}):")
        for p in section["parameters"]:
            default = "(required)" if p.get("required") else f"default {p['default']!r:<10}"
            typer.echo(f"  {p['name']:<24} {default:<18} {p['constraints']:<16} {p['description']}")


@app.command()
def bench(
    suite: Annotated[str | None, typer.Argument(
        help="suite: text, vision or llm (none with --base: your own model); `combine RUN… -o OUT` merges runs")]
    = None,
    runs: Annotated[list[Path] | None, typer.Argument(help="with `combine`: the run folders to merge")] = None,
    methods: Annotated[str | None, typer.Option(
        help="comma-separated methods (default: every static one; llm --quick: TA, TIES, NeuroMerging)")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset of the suite's tasks")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="small subsets, short training, capped grids")] = False,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="report folder (default bench-results/SUITE-TIME)")]
    = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="retrain cached experts and probes")] = False,
    model: Annotated[list[Path] | None, typer.Option(
        help="also evaluate this merged or routed folder (with --base: repeatable)")] = None,
    task_file: Annotated[Path | None, typer.Option(help="YAML file of extra tasks (docs/bench.md); with --base: "
                                                   "your tasks")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of expert training and random merges (default 0; one "
                                             "seed of --seeds)")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds, e.g. 0,1,2: experts per seed, intervals "
                                              "over seeds; a rerun with the same -o resumes")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: cores; 1 on a busy machine)", min=1)]
    = None,
    mode: Annotated[str | None, typer.Option(help="expert fine-tuning: full or lora (default: the suite's first; "
                                             "routed LoRA methods need lora); llm: lora (q/k/v/o, default), "
                                             "lora_all (every linear layer) or full")] = None,
    heads: Annotated[str | None, typer.Option(
        help="experts' task heads (text, vision): frozen = fit on the base and fixed while experts train (default, "
             "as in the papers); trained = trained from zero with the backbone")] = None,
    paper_defaults: Annotated[bool | None, typer.Option(
        "--paper-defaults/--no-paper-defaults",
        help="also score each static method at its paper defaults, without validation (default: on, off with "
             "--quick)")] = None,
    base: Annotated[Path | None, typer.Option(help="your own base model folder: score --model folders on "
                                              "--task-file against --experts (neuromerge evaluate)")] = None,
    experts: Annotated[Path | None, typer.Option(help="with --base: YAML mapping each task to its expert (adapter "
                                                 "or checkpoint)")] = None,
    force: Annotated[bool, typer.Option("--force", help="with --base: replace an existing report folder")] = False,
) -> None:
    """Benchmark merge methods on an offline SUITE: experts, tuned merges, in- and out-of-domain tables. With
    --base, --experts and --task-file instead of SUITE: score --model folders on your own tasks. `bench combine
    RUN… -o OUT` merges finished runs of one protocol made with different seeds."""
    if suite == "combine":
        from .bench.cli import combine_command

        given = {"--methods": methods, "--tasks": tasks, "--model": model, "--task-file": task_file, "--seed": seed,
                 "--seeds": seeds, "--mode": mode, "--base": base, "--experts": experts}
        extra = [k for k, v in given.items() if v is not None and v != []] + [
            k for k, v in {"--quick": quick, "--rebuild": rebuild}.items() if v]
        if extra:
            _fail(f"bench combine takes run folders and -o only, not {', '.join(extra)}")
        if out is None:
            _fail("bench combine needs -o OUT, a new folder for the combined report")
        code = combine_command(runs or [], out)
        if code:
            raise typer.Exit(code)
        return
    if runs:
        _fail(f"unexpected argument(s) after the suite: {' '.join(map(str, runs))} (only `bench combine` takes "
              "folders)")
    if seed is not None and seeds is not None:
        _fail("give --seed or --seeds, not both")
    if base is not None or experts is not None:
        if seeds is not None:
            _fail("--seeds is for a suite's bench, not with --base")
        _bench_user_model(suite, base, experts, task_file, model or [], out, tasks=tasks, seed=seed or 0,
                          progress=progress, threads=threads, force=force,
                          refused={"--methods": methods is not None, "--quick": quick, "--rebuild": rebuild,
                                   "--mode": mode is not None, "--heads": heads is not None,
                                   "--paper-defaults": paper_defaults is not None})
        return
    if suite is None:
        _fail("give a SUITE (text, vision, llm), or --base, --experts and --task-file to score your own model")
    if len(model or []) > 1:
        _fail("a suite's bench scores one --model; use --base for several")
    from .bench.cli import bench_command

    code = bench_command(suite, methods=methods, tasks=tasks, quick=quick, out=out, rebuild=rebuild,
                         model=model[0] if model else None, task_file=task_file, seed=seed or 0, progress=progress,
                         threads=threads, mode=mode, seeds=seeds, heads=heads, paper_defaults=paper_defaults)
    if code:
        raise typer.Exit(code)


def _bench_user_model(suite: str | None, base: Path | None, experts: Path | None, task_file: Path | None,
                      models: list[Path], out: Path | None, *, tasks: str | None, seed: int, progress: bool,
                      threads: int | None, force: bool, refused: dict[str, bool]) -> None:
    """``bench --base B --experts E --task-file T --model X``: :func:`neuromerge.evaluation.evaluate` on the user's
    model (as ``neuromerge evaluate``)."""
    import datetime

    from .evaluation.run import user_model_config

    problems = [] if suite is None else [f"give SUITE ({suite}) or --base, not both"]
    problems += [f"--{name} is needed with --base" for name, v in (("base", base), ("experts", experts),
                                                                   ("task-file", task_file)) if v is None]
    problems += [f"{flag} is for a suite's bench, not with --base" for flag, given in refused.items() if given]
    if problems:
        _fail("; ".join(problems))
    try:
        raw, source = user_model_config(base, experts, task_file)  # type: ignore[arg-type]
    except NeuromergeError as err:
        _fail(str(err))
        return
    raw.setdefault("seed", seed)
    folder = out or Path("bench-results") / f"user-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    _evaluate_and_print(raw, source, models, folder, splits="test", tasks=tasks, force=force, plot=True,
                        threads=threads, progress=progress, allow_download=False)


def _evaluate_and_print(config: Any, source: Path | None, models: list[Path], out: Path, *, splits: str,
                        tasks: str | None, force: bool, plot: bool, threads: int | None, progress: bool,
                        allow_download: bool) -> None:
    """Run :func:`neuromerge.evaluation.evaluate`, print the table and where the report is (``error:`` lines and
    exit 2 on bad input)."""
    import warnings

    from .evaluation import evaluate as run_evaluate

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def say(line: str) -> None:
        if progress:
            typer.echo(line, err=True)

    try:
        split_names = [s.strip() for s in splits.split(",") if s.strip()]
        task_names = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            results = run_evaluate(config, models, out, splits=split_names, tasks=task_names,
                                   source=None if source is None else str(source), force=force, plot=plot,
                                   allow_download=allow_download, progress=say)
    except NeuromergeError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None
    except OSError as err:
        _fail(f"cannot read or write {err.filename or out}: {err.strerror or err}")
        return
    for w in caught:
        if "plot is skipped" in str(w.message):
            typer.echo(f"warning: {w.message}", err=True)
    for split in results.splits:
        if len(results.splits) > 1:
            typer.echo(f"{split} split:")
        typer.echo(results.markdown(split))
    typer.echo(f"\nreport written to {results.out} (results.md, results.json"
               f"{', normalized_accuracy.png' if plot else ''}) in {results.timings['total']:.0f} s")


@app.command("evaluate")
def evaluate_command(
    config: Annotated[Path, typer.Argument(help="YAML of your model: base, tasks (task file), experts (task -> "
                                           "adapter or checkpoint); or suite: NAME")],
    out: Annotated[Path, typer.Option("-o", "--out", help="report folder (results.json, results.md, PNG)")],
    model: Annotated[list[Path] | None, typer.Option(
        help="a merged folder, merged LoRA adapter or routed folder to score (repeatable)")] = None,
    splits: Annotated[str, typer.Option(help="comma-separated splits to score: test, val")] = "test",
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset of the experts' tasks")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing report folder")] = False,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="write normalized_accuracy.png")] = True,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: cores)", min=1)] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="fetch a base given as an HF id "
                                                 "missing from the cache")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress lines on stderr")] = True,
) -> None:
    """Score merged and routed folders (and the base) on your tasks, normalised against your experts."""
    _evaluate_and_print(config, None, model or [], out, splits=splits, tasks=tasks, force=force, plot=plot,
                        threads=threads, progress=progress, allow_download=allow_download)


@app.command("export-experts")
def export_experts(
    suite: Annotated[str, typer.Argument(help="bench suite whose experts to export: text")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder to write (base/, experts/, heads/, data/, "
                                      "tasks.yaml, merge.yaml, route.yaml)")],
    mode: Annotated[str, typer.Option(help="full (HF model folders) or lora (PEFT adapters)")] = "full",
    quick: Annotated[bool, typer.Option("--quick", help="the suite's quick budget (as `bench --quick`)")] = False,
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset of the suite's tasks")] = None,
    task_file: Annotated[Path | None, typer.Option(help="YAML file of extra tasks (docs/bench.md)")] = None,
    seed: Annotated[int, typer.Option(help="seed of expert training (as `bench --seed`)")] = 0,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="retrain cached experts")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: cores; 1 on a busy machine)", min=1)]
    = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bars")] = None,
) -> None:
    """Write a suite's experts (trained, or from the bench's cache) as HF folders or PEFT adapters, with its base,
    heads, task data and ready merge / route configs."""
    from .bench.cli import split_list
    from .bench.export import export_experts as run_export
    from .io.writer import install_signal_cleanup

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    install_signal_cleanup()
    try:
        res = run_export(out, suite, mode=mode, quick=quick, tasks=split_list(tasks, "tasks"), seed=seed,
                         task_file=task_file, rebuild=rebuild, force=force, progress=progress,
                         log=lambda msg: typer.echo(msg, err=True))
    except NeuromergeError as err:
        _fail(str(err))
        return
    except OSError as err:
        _fail(f"cannot write {out}: {err.strerror or err}")
        return
    for warning in res.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"exported {len(res.experts)} {res.mode} experts of the {res.suite} suite "
               f"({', '.join(res.experts)}) and {len(res.tasks)} tasks to {res.out}")
    typer.echo(f"  neuromerge merge {res.out / 'merge.yaml'} -o merged/")
    if res.mode == "lora":
        typer.echo(f"  neuromerge route build min_merging --config {res.out / 'route.yaml'} -o routed/")


@app.command()
def inspect(
    config: Annotated[Path | None, typer.Argument(help="YAML merge config naming the pool (needs base_model)")]
    = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="folder for inspect.json and the PNG figures "
                                             "(default inspect-<config name>)")] = None,
    density: Annotated[float, typer.Option(help="kept fraction of the global trim used for sign conflicts")] = 0.2,
    suite: Annotated[str | None, typer.Option(help="bench suite for per-component mergeability; without CONFIG "
                                              "its experts are the pool")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="the suite's quick budget (with --suite)")] = False,
    seed: Annotated[int, typer.Option(help="the suite's expert seed (with --suite)")] = 0,
    threads: Annotated[int | None, typer.Option(help="worker threads (default: CPU cores)", min=1)] = None,
    chunk_mb: Annotated[int, typer.Option(help="row-chunk budget per model copy, MiB of fp32", min=1)] = CHUNK_MB,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="fetch HF ids missing from the cache")]
    = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bars")] = None,
) -> None:
    """Show where the experts of CONFIG interfere: cosines, sign conflicts, parallel/orthogonal energy, norms."""
    from .inspection import inspect as run_inspect

    if out is None:
        out = Path(f"inspect-{config.stem if config is not None else suite}")
    try:
        report = run_inspect(config, out, density=density, threads=threads, suite=suite, quick=quick, seed=seed,
                             chunk_elements=chunk_mb * 2**20 // 4, allow_download=allow_download, progress=progress)
    except NeuromergeError as err:
        _fail(str(err))
        return
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(report.summary.text)
    if report.mergeability is not None and report.mergeability.rows:
        rows = sorted(report.mergeability.rows, key=lambda r: r.mean_loss)
        typer.echo("most mergeable components: " + ", ".join(
            f"{r.component} ({100 * r.mean_loss:+.1f} pts)" for r in rows[:3]))
        typer.echo("least mergeable components: " + ", ".join(
            f"{r.component} ({100 * r.mean_loss:+.1f} pts)" for r in rows[::-1][:3]))
    typer.echo(f"wrote inspect.json and {len(report.figures)} figures to {out}")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="search config YAML (suite or base/tasks/experts, operators, "
                                                "budget…)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="search folder (resumable)")],
    budget: Annotated[int | None, typer.Option(help="exact evaluations per seed (default 300)")] = None,
    seeds: Annotated[int | None, typer.Option(help="number of search seeds 0..K-1 (default 1)")] = None,
    population: Annotated[int | None, typer.Option(help="NSGA-II population (default 20)")] = None,
    quick: Annotated[bool | None, typer.Option("--quick/--full", help="the suite's quick budget")] = None,
    storage: Annotated[str | None, typer.Option(help="database URL of a distributed search (workers evaluate)")]
    = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the search recorded in OUT")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bars")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: cores; 1 on a busy machine)", min=1)]
    = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="your model: fetch a base given as a "
                                                                          "Hugging Face id missing from the cache")]
    = False,
) -> None:
    """MERGE: surrogate-assisted NSGA-II over per-component task partitions of a named suite (`suite:`) or of your
    own model (`base:`, `tasks:` task file, `experts:`); writes the Pareto set (pareto.json), pareto.png,
    hypervolume.png and the representative points against the static merges."""
    from .io.output_guard import check_output
    from .search.merge_run import load_search_config, run_merge_search

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    try:
        # a search only adds files to its folder, so a config kept inside it (resumed with --resume) is fine; the
        # folder must not be the config itself, nor a file
        if not resume or out.resolve() == config.resolve():
            check_output(out, [config])
        if out.exists() and not out.is_dir():
            raise NeuromergeError(f"search folder {out} is a file, expected a folder")
        cfg = load_search_config(config, budget=budget, seeds=None if seeds is None else list(range(seeds)),
                                 population=population, quick=quick, storage_url=storage,
                                 allow_download=allow_download)
        rep = run_merge_search(cfg, out, resume=resume, progress=progress)
    except NeuromergeError as err:
        _fail_lines(str(err))
        return
    except OSError as err:  # disk full, read-only file system… while writing the search folder
        _fail(f"cannot write {out}: {err.strerror or err}")
        return
    typer.echo((out / "representative.md").read_text(encoding="utf-8").rstrip())
    typer.echo(f"{rep['evaluations']} exact evaluations, front of {rep['front_size']} points, "
               f"{rep['timings_s']['search']:.0f} s; wrote pareto.json, pareto.png, hypervolume.png to {out}")


@app.command("search-worker")
def search_worker(
    config: Annotated[Path, typer.Argument(help="the coordinator's search config")],
    storage: Annotated[str | None, typer.Option(help="database URL (overrides the config's storage_url)")] = None,
    max_idle: Annotated[float | None, typer.Option(help="exit after this many seconds without work")] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="your model: fetch a base given as a "
                                                                          "Hugging Face id missing from the cache")]
    = False,
) -> None:
    """Evaluate configurations of a distributed `neuromerge search` (same config, same storage URL); a user's
    model is rebuilt from the config's paths, and refused when its files differ from the coordinator's."""
    from .search.merge_run import load_search_config, run_search_worker

    try:
        n = run_search_worker(load_search_config(config, storage_url=storage, allow_download=allow_download),
                              max_idle_s=max_idle)
    except NeuromergeError as err:
        _fail_lines(str(err))
        return
    typer.echo(f"evaluated {n} configurations")


def _fail_lines(message: str, code: int = 2) -> None:
    """:func:`_fail` for a message of several problems: one ``error:`` line each."""
    lines = message.splitlines() or [message]
    for line in lines[:-1]:
        typer.echo(f"error: {line}", err=True)
    _fail(lines[-1], code)


def _add_mergekit_yaml() -> None:
    from .mergekit_cli import CONTEXT_SETTINGS, mergekit_yaml

    app.command("mergekit-yaml", context_settings=CONTEXT_SETTINGS)(mergekit_yaml)


_add_mergekit_yaml()


def _add_route() -> None:
    from .routing.cli import route_app

    app.add_typer(route_app, name="route")


def _register_bench_suites() -> None:
    """A config's ``suite: NAME`` (``search``, ``search-worker``, ``route build merge``, ``inspect --suite``) names
    one of the bench's suites. The library resolves names through a registered provider and never imports the
    bench: the command registers the bench's here, importing it only when a name is resolved."""
    from .tasks.named import register_suite_provider

    def provider(name: str, **kwargs: Any) -> Any:
        from .bench.tasksets import suite_taskset

        return suite_taskset(name, **kwargs)

    register_suite_provider(provider)


_add_route()
_register_bench_suites()


#: commands whose process ends without the interpreter's teardown (see :func:`main`)
FAST_EXIT_COMMANDS = ("merge",)


def main() -> None:
    """The console entry point. ``merge`` runs without the cyclic garbage collector: a merge is bounded work whose
    objects are freed by reference counting, and the collector's passes over torch's many objects (from its import
    on) cost ~0.1 s. After ``merge`` has returned — its output folder renamed into place, its files closed, its
    thread pool joined — the process ends with ``os._exit`` once stdout / stderr are flushed: the interpreter's
    teardown (torch's module finalizers) adds ~0.5 s to a merge that takes 3–4 s."""
    fast_exit = len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS
    if fast_exit:
        gc.disable()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as done:
        if fast_exit:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, int | None):
                print(done.code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


if __name__ == "__main__":
    main()
