"""Run a merge: plan (headers only) → statistics pass (when the method needs whole-model quantities) → merge
pass (one tensor or row chunk at a time on a thread pool) → atomic output with reports.

Determinism: each job is a pure function of its chunk, torch runs single-threaded inside jobs (parallelism comes
from the pool, so no reduction order depends on the thread count), statistics are summed in a fixed order, and
random draws are counter-based (:mod:`neuromerge.tensors.rng`). The output is bitwise identical for any
``threads``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import kernels
from ..config import MergeConfig, ParamResolver, load_config
from ..errors import ConfigError, NeuromergeError
from ..io.chat_templates import resolve_chat_template
from ..io.lora_output import LoraSink, concat_adapter, delta_coefficients, lora_report, write_adapter
from ..io.output_guard import InputRef, check_output, check_writable
from ..io.tokenizer_merge import load_tokenizer, write_tokenizer
from ..io.writer import AtomicOutput, PlannedTensor, ShardedWriter, copy_model_files
from ..methods import MergeInput
from ..numeric import to_output_dtype
from ..tensors import rng
from . import fused as fused_path
from .layout import from_canonical
from .memory import retain_freed_memory
from .plan import DEFAULT_CHUNK_ELEMENTS, MergePlan, TensorPlan, build_plan, open_pool, split_rows
from .reading import all_finite, chunk_rows, read_all, read_stored_all
from .report import write_reports
from .stats import TrimStatistics, trim_statistics
from .threads import one_torch_thread


@dataclass
class MergeResult:
    """What :func:`merge` returns: the output folder and the content of ``merge_report.json``."""

    out: Path
    report: dict[str, Any]
    plan: MergePlan | None = field(default=None, repr=False)


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(config: MergeConfig | dict[str, Any] | str | Path, *, allow_download: bool = False,
            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> MergePlan:
    """Validate the config, open the pool (headers only) and plan every tensor. Used by ``--dry-run``."""
    cfg = load_config(config)
    if cfg.data is not None:  # the data-aware path lives in layer 3 (neuromerge.data_aware.merge)
        raise ConfigError("a config with `data:` is a data-aware merge: run it with `neuromerge merge`, "
                          "neuromerge.merge or neuromerge.data_aware.merge.merge_with_data")
    if cfg.slices is not None:
        from .slices import plan_slices

        return plan_slices(cfg, allow_download=allow_download, chunk_elements=chunk_elements)
    pool, cfg = open_pool(cfg, allow_download=allow_download)
    try:
        return build_plan(cfg, pool, chunk_elements=chunk_elements)
    except BaseException:
        pool.close()
        raise


def check_merge_output(plan: MergePlan, out: str | Path, inputs: Iterable[InputRef] = ()) -> list[str]:
    """Refuse an output ``out`` that is or contains an input of ``plan`` (every checkpoint's folder or file, the
    files behind their symlinks) or one of ``inputs`` (the config file), or that cannot hold the planned output
    (parent not a folder, not enough free space); return warnings (an output inside an input folder). Runs after
    the plan (headers only), before any tensor is read; ``merge`` and ``merge --dry-run`` both call it."""
    warnings = check_output(out, [*inputs, *(c.path for c in plan.pool.checkpoints)])
    check_writable(out, plan.output_bytes())
    return warnings


def merge(config: MergeConfig | dict[str, Any] | str | Path, out: str | Path, *, threads: int | None = None,
          force: bool = False, durable: bool = False, device: str = "cpu", allow_download: bool = False,
          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, progress: bool | None = None,
          inputs: Iterable[InputRef] = ()) -> MergeResult:
    """Merge the pool described by ``config`` into the HF folder ``out`` (written atomically), or into a PEFT
    LoRA adapter folder when the config says ``output: {format: lora, rank: …}`` (:mod:`neuromerge.io.lora_output`).

    ``threads`` defaults to the number of CPU cores; ``chunk_elements`` bounds the rows processed at once for
    large tensors (peak memory ≈ threads × chunk × (3T+3) × 4 bytes). ``out`` must not be, or contain, a model of
    the pool, the config file (when ``config`` is a path) or one of ``inputs``
    (:class:`~neuromerge.errors.OutputConflictError`, before any tensor is read); a write failure (disk full,
    unwritable folder) is :class:`~neuromerge.errors.OutputWriteError` with nothing left behind.
    """
    t_start = time.perf_counter()
    out = Path(out)
    retain_freed_memory()
    torch_device = resolve_device(device)
    plan = prepare(config, allow_download=allow_download, chunk_elements=chunk_elements)
    try:
        sources = [*inputs, *([config] if isinstance(config, str | Path) else [])]
        warnings = check_merge_output(plan, out, sources)
        atomic = AtomicOutput(out, force=force, durable=durable)  # also cleans what dead runs left next to out
        with atomic as tmp:
            plan.warnings.extend([*warnings, *atomic.notes])
            report = _execute(plan, tmp, threads=threads or os.cpu_count() or 1, device=torch_device,
                              durable=durable, progress=progress, t_start=t_start)
    finally:
        plan.pool.close()
    return MergeResult(out, report, plan)


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, or cuda when torch sees a CUDA device (checked by ``--dry-run`` too)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but torch sees no CUDA device")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)


class Progress:
    """tqdm progress over an iterable, on when stderr is a terminal unless told (shared with `inspect`)."""

    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def __call__(self, items: Iterable, total: int, desc: str) -> Iterable:
        if not self.enabled:
            return items
        return tqdm(items, total=total, desc=desc, unit="chunk", leave=False, dynamic_ncols=True)


def _execute(plan: MergePlan, tmp: Path, *, threads: int, device: torch.device, durable: bool,
             progress: bool | None, t_start: float) -> dict[str, Any]:
    cfg = plan.config
    bar = Progress(progress)
    timings: dict[str, float] = {"plan": time.perf_counter() - t_start}
    if plan.lora is not None and plan.lora.rank == "concat":
        return _execute_concat(plan, tmp, plan.resolver(), timings, threads=threads, t_start=t_start)
    # one part per output slice (``slices``: each with its own pool of renamed views, parameters and global trim),
    # else the plan itself; all parts write into one output
    parts = plan.parts()
    resolvers = [part.resolver() for part in parts]
    part_jobs = [[(tp, chunk) for tp in part.merged for chunk in tp.chunks] for part in parts]

    with single_threaded_torch(), ThreadPoolExecutor(max_workers=threads, initializer=one_torch_thread) as pool:
        t0 = time.perf_counter()
        part_stats = [_statistics(part, jobs, pool, device, bar) for part, jobs in zip(parts, part_jobs, strict=True)]
        stats: TrimStatistics | list[TrimStatistics | None] | None = part_stats if plan.segments else part_stats[0]
        timings["statistics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # a LoRA output receives the merged rows of every merged tensor; copied tensors are the base's, not written
        writer: ShardedWriter | LoraSink = LoraSink(plan.lora, cfg.overflow) if plan.lora is not None else (
            ShardedWriter(tmp, [PlannedTensor(t.name, t.shape, t.out_dtype) for t in plan.tensors],
                          max_shard_bytes=_shard_bytes(plan), metadata={"format": "pt", "merged_by": "neuromerge"})
        )
        work = [("merge", k, tp, chunk) for k, jobs in enumerate(part_jobs) for tp, chunk in jobs]
        if plan.lora is None:
            work += [(kind, k, tp, chunk) for k, part in enumerate(parts) for kind, tp, chunk in _copy_jobs(part)]

        def run(job: tuple[str, int, TensorPlan, tuple[int, int]]) -> tuple[str, int, dict[str, float]]:
            kind, k, tp, chunk = job
            if kind == "merge":
                return _merge_chunk(parts[k], resolvers[k], tp, chunk, part_stats[k], writer, device)
            assert isinstance(writer, ShardedWriter)
            return _copy_chunk(parts[k], tp, chunk, kind, writer)

        per_tensor: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        clamped: dict[str, int] = {}
        for name, numel, rep in bar(pool.map(run, work), len(work), "merge"):
            n_clamped = int(rep.pop(CLAMPED, 0))
            if n_clamped:
                clamped[name] = clamped.get(name, 0) + n_clamped
            acc = per_tensor.setdefault(name, {})
            counts[name] = counts.get(name, 0) + numel
            for key, value in rep.items():
                acc[key] = acc.get(key, 0.0) + value * numel
        for name, acc in per_tensor.items():
            for key in acc:
                acc[key] /= max(1, counts[name])
        lora = None
        if isinstance(writer, LoraSink):
            shards, lora = writer.finish(tmp)
            clamped.update(shards.pop("clamped", {}))
        else:
            shards = writer.close(durable=durable)
        timings["merge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    warnings = list(plan.warnings)
    if plan.lora is None:
        warnings += copy_model_files(plan.pool.base.path, tmp, config_overrides=plan.config_overrides,
                                     tokenizer=cfg.output.copy_tokenizer)
        warnings += write_output_tokenizer(plan, tmp)  # a built tokenizer is always written, as mergekit
    timings["finalize"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    if clamped:
        warnings.append(_clamp_warning(plan, clamped))
    return write_reports(plan, tmp, stats=stats, per_tensor=per_tensor, shards=shards, timings=timings,
                         warnings=warnings, threads=threads, peak_rss=_peak_rss(), lora=lora,
                         overflow=_overflow_report(plan, clamped))


def write_output_tokenizer(plan: MergePlan, out: Path) -> list[str]:
    """The output tokenizer, when the config asks for one: the merged vocabulary of ``tokenizer_source`` /
    ``tokenizer:`` (:mod:`neuromerge.io.tokenizer_merge`), and/or the ``chat_template``
    (:mod:`neuromerge.io.chat_templates`) set on it or on the base's tokenizer; the tokenizer files copied from the
    base are replaced. Without these keys the base's files stay as copied. Returns warnings."""
    cfg = plan.config
    vocabulary = plan.pool.vocabulary
    if vocabulary is None and cfg.chat_template is None:
        return []
    template = None
    if cfg.chat_template is not None:
        template = resolve_chat_template(cfg.chat_template, [Path(c.path) for c in plan.pool.checkpoints])
        if template is None and vocabulary is None:
            return ["chat_template auto: no merged model's tokenizer has a chat template; the base's files stay"]
    if vocabulary is not None:
        tokenizer = vocabulary.tokenizer
    else:
        try:
            tokenizer = load_tokenizer(plan.pool.base.path)
        except Exception as err:
            return [f"chat_template: the base {plan.pool.base.path} has no loadable tokenizer "
                    f"({type(err).__name__}); the chat template is not written"]
    write_tokenizer(out, tokenizer, template)
    return []


def _execute_concat(plan: MergePlan, tmp: Path, resolver: ParamResolver, timings: dict[str, float], *,
                    threads: int, t_start: float) -> dict[str, Any]:
    """LoRA output of rank ``concat``: the exact factors of a linear merge from the adapters' factors, no merge
    pass (:func:`~neuromerge.io.lora_output.concat_adapter`)."""
    assert plan.lora is not None
    t0 = time.perf_counter()

    def coefficients(name: str) -> list[float]:
        params, per_model = resolver.resolve(name)
        return delta_coefficients(plan.method.name, params, per_model)

    factors, per_module = concat_adapter(plan.lora, plan.pool.base, coefficients)
    shards = write_adapter(tmp, plan.lora, factors, per_module, plan.config.overflow)
    clamped = shards.pop("clamped", {})
    timings["merge"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    warnings = list(plan.warnings) + ([_clamp_warning(plan, clamped)] if clamped else [])
    return write_reports(plan, tmp, stats=None, per_tensor={}, shards=shards, timings=timings,
                         warnings=warnings, threads=threads, peak_rss=_peak_rss(),
                         lora=lora_report(plan.lora, per_module), overflow=_overflow_report(plan, clamped))


def _shard_bytes(plan: MergePlan) -> int:
    """The shard budget in bytes: ``shard_size``, or ``output.shard_params`` parameters of the largest element size
    written (mergekit counts parameters)."""
    params = plan.config.output.shard_params
    if params is None:
        return plan.config.shard_bytes
    return params * max((t.out_dtype.itemsize for t in plan.tensors), default=4)


def _statistics(plan: MergePlan, jobs: list[tuple[TensorPlan, tuple[int, int]]],
                pool: ThreadPoolExecutor, device: torch.device, bar: Progress) -> TrimStatistics | None:
    """The global statistics pass planned by :func:`~.plan.plan_statistics` (None when there is none), over the
    chunks of the tensors that take part, one global trim per group; its population leaves out tensors no model
    changes."""
    spec = plan.statistics
    if spec is None:
        return None
    Job = tuple[TensorPlan, tuple[int, int]]

    def read(job: Job) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tp, chunk = job
        return read_all(plan.pool, tp, chunk_rows(tp, chunk), allow_nonfinite=plan.config.allow_nonfinite,
                        device=device)

    def read_stored(job: Job) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tp, chunk = job
        return read_stored_all(plan.pool, tp, chunk_rows(tp, chunk))

    return trim_statistics(
        spec.groups, [job for job in jobs if job[0].name in spec.tensors], lambda job: job[0].name, read,
        len(plan.pool.models), executor=pool, l1=spec.l1,
        progress=lambda n: (lambda it: bar(it, n, "statistics")),
        read_stored=read_stored if device.type == "cpu" and kernels.available() else None,
    )


def _merge_chunk(plan: MergePlan, resolver: ParamResolver, tp: TensorPlan, chunk: tuple[int, int],
                 trim: TrimStatistics | None, writer: ShardedWriter | LoraSink, device: torch.device
                 ) -> tuple[str, int, dict[str, float]]:
    rows = chunk_rows(tp, chunk)
    stats = trim.for_tensor(tp.name) if trim is not None else None
    params, per_model = resolver.resolve(tp.name)
    full_shape = _canonical_shape(tp)
    storage_shape = (chunk[1] - chunk[0], *tp.shape[1:]) if rows is not None else tp.shape
    seed, method_name = plan.config.seed, plan.method.name
    if (isinstance(writer, ShardedWriter) and device.type == "cpu"
            and fused_path.fuses(plan.method, params, per_model)):
        base, models = read_stored_all(plan.pool, tp, rows)
        x = MergeInput(name=tp.name, kind="point" if tp.layout == "point" else "neuronal", base=base, models=models,
                       params=params, per_model=per_model, stats=stats, rows=chunk, full_shape=full_shape,
                       base_given=plan.pool.base_given)
        fused = fused_path.merge_fused(plan.method, x, tp.out_dtype)
        if fused is not None:
            merged, nonfinite = fused
            if nonfinite and not plan.config.allow_nonfinite and merged.dtype == torch.float32:
                raise _nonfinite_output(method_name, tp.name)
            # (a bfloat16 output with NaN/Inf may be a finite fp32 value that rounded to Inf: the torch path, bitwise
            # the same for TA / TIES, tells an overflow of the dtype from a NaN/Inf of the method)
            if not nonfinite or plan.config.allow_nonfinite:
                out, n_clamped = to_output_dtype(from_canonical(merged, tp.layout, storage_shape), tp.out_dtype,
                                                 tensor=tp.name, mode=plan.config.overflow)
                writer.write(tp.name, out, rows)
                return tp.name, int(merged.numel()), _with_clamped(x.report, n_clamped)
    base, models = read_all(plan.pool, tp, rows, allow_nonfinite=plan.config.allow_nonfinite, device=device)
    base_rows = base.clone() if isinstance(writer, LoraSink) else base  # a method may work in place on x.base
    row_numel = int(base[0].numel()) if base.dim() == 2 else 1

    def uniform(model_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        return rng.draw(seed, method_name, tp.name, model_index, chunk[0] * row_numel, shape).to(device)

    x = MergeInput(
        name=tp.name, kind="point" if tp.layout == "point" else "neuronal", base=base, models=models,
        params=params, per_model=per_model, stats=stats, rows=chunk, full_shape=full_shape, uniform=uniform,
        base_given=plan.pool.base_given,
    )
    try:
        merged = plan.method.merge(x)
    except torch.linalg.LinAlgError as err:  # an SVD / eigh that does not converge: NaN/Inf let in by allow_nonfinite
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NeuromergeError(
            f"{method_name} failed on {tp.name!r}: {first} (the tensor's inputs are not finite, or ill-conditioned; "
            "with `allow_nonfinite: true` choose a method without a decomposition)"
        ) from None
    if tuple(merged.shape) != tuple(base.shape):
        raise NeuromergeError(f"{method_name} returned shape {list(merged.shape)} for {tp.name!r}, "
                              f"expected {list(base.shape)}")
    if not plan.config.allow_nonfinite and not all_finite(merged):
        raise _nonfinite_output(method_name, tp.name)
    if isinstance(writer, LoraSink):  # fp32 rows: ΔW = merged − base is formed before any rounding to the dtype
        writer.add(tp.name, from_canonical(merged, tp.layout, storage_shape).to(device="cpu", dtype=torch.float32),
                   from_canonical(base_rows, tp.layout, storage_shape).cpu(), rows)
        return tp.name, int(merged.numel()), dict(x.report)
    out, n_clamped = to_output_dtype(from_canonical(merged, tp.layout, storage_shape), tp.out_dtype, tensor=tp.name,
                                     mode=plan.config.overflow)
    writer.write(tp.name, out.cpu(), rows)
    return tp.name, int(merged.numel()), _with_clamped(x.report, n_clamped)


#: key of a job's report that carries the number of values clamped to the output dtype (summed, not averaged)
CLAMPED = "_clamped"


def _with_clamped(report: dict[str, float], clamped: int) -> dict[str, float]:
    return {**report, CLAMPED: clamped} if clamped else dict(report)


def _overflow_report(plan: MergePlan, clamped: dict[str, int]) -> dict[str, Any]:
    """The ``overflow`` section of ``merge_report.json``: the mode and the values clamped, per tensor and in total."""
    return {"mode": plan.config.overflow, "clamped_values": sum(clamped.values()),
            "tensors": dict(sorted(clamped.items()))}


def _clamp_warning(plan: MergePlan, clamped: dict[str, int]) -> str:
    dtype = plan.config.dtype or "the output dtype"
    return (f"overflow: clamp: {sum(clamped.values())} values of {len(clamped)} tensor(s) beyond {dtype}'s range were "
            "clamped to it (merge_report.json, overflow)")


def _nonfinite_output(method_name: str, tensor: str) -> NeuromergeError:
    return NeuromergeError(f"{method_name} produced NaN/Inf in {tensor!r}; check the method parameters")


def _copy_jobs(plan: MergePlan) -> list[tuple[str, TensorPlan, tuple[int, int]]]:
    jobs: list[tuple[str, TensorPlan, tuple[int, int]]] = []
    for tp in plan.tensors:
        if tp.action == "copy":
            rows = tp.shape[0] if tp.shape else 1
            row = max(1, tp.numel // max(1, rows))
            jobs += [("copy", tp, chunk) for chunk in split_rows(rows, row, plan.chunk_elements)]
        if tp.extra_rows is not None:
            jobs.append(("extra", tp, (tp.extra_rows[0], tp.extra_rows[1])))
    return jobs


def _copy_chunk(plan: MergePlan, tp: TensorPlan, chunk: tuple[int, int], kind: str, writer: ShardedWriter
                ) -> tuple[str, int, dict[str, float]]:
    if kind == "extra":
        assert tp.extra_rows is not None
        owner = tp.extra_rows[2]
        ckpt = plan.pool.base if owner < 0 else plan.pool.models[owner]
        name = tp.name if owner < 0 else tp.sources[owner]
        t, n_clamped = to_output_dtype(ckpt.read(name, chunk), tp.out_dtype, tensor=tp.name,
                                       mode=plan.config.overflow, what="added rows of")
        writer.write(tp.name, t, chunk)
        return tp.name, 0, _with_clamped({}, n_clamped)
    rows = None if (not tp.shape or chunk == (0, tp.shape[0])) else chunk
    t = plan.pool.base.read(tp.name, rows)
    n_clamped = 0
    if t.dtype.is_floating_point and t.dtype != tp.out_dtype:  # the base's value converted: it must fit too
        t, n_clamped = to_output_dtype(t, tp.out_dtype, tensor=tp.name, mode=plan.config.overflow, what="copied")
    writer.write(tp.name, t, rows)
    return tp.name, 0, _with_clamped({}, n_clamped)


def _canonical_shape(tp: TensorPlan) -> tuple[int, ...]:
    rows = tp.extra_rows[0] if tp.extra_rows else (tp.shape[0] if tp.shape else 1)
    if tp.layout == "point":
        return (max(1, tp.numel),)
    if tp.layout == "in_out":
        return (tp.shape[1], tp.shape[0])
    return (rows, max(1, tp.numel // max(1, tp.shape[0])))


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


__all__ = ["MergeResult", "merge", "prepare", "resolve_device"]
