"""Data-aware merges of a user's own models: ``neuromerge merge CONFIG -o OUT`` (and :func:`neuromerge.merge`) when
the config names task data.

```yaml
merge_method: regmean            # fisher, regmean, adamerging, adamerging++
base_model: base/                # a Hugging Face model folder with its tokenizer
models:
  - {model: adapters/sentiment, task: sentiment}   # PEFT LoRA adapter folder or full checkpoint
  - {model: ckpts/topic, task: topic}
data: tasks.yaml                 # task file (docs/bench.md); or {tasks: tasks.yaml, seq_len: 64, train_examples: …}
data_split: train                # optional: the split the method reads (default: its own, see below)
parameters: {examples: 128}      # the method's parameters (`neuromerge methods regmean`)
```

The config is checked before any weight is read (:func:`prepare_data_merge`, also ``--dry-run``): the method
parameters, a ``task:`` per model present in the task file, the task file and every data file parsed, the base
folder and each expert's headers. The run (:func:`merge_with_data`) builds the user's model as the tasks contract
(:class:`~neuromerge.tasks.hf.HFSuite`, one probe head per task fitted on its expert's features of the train split,
as :func:`~neuromerge.tasks.hf.open_user_model` does), runs the method's driver over it and writes, atomically:

- the merged model: the base checkpoint's tensors with the merged backbone's values (tensors not merged —
  non-floating, ``exclude`` — copied as stored), ``config.json`` and the tokenizer files
  (:func:`~neuromerge.io.writer.copy_model_files`), loadable with ``from_pretrained``;
- ``heads/<task>.safetensors``: each task's probe head (``weight`` (C, d), ``bias`` (C,); metadata ``classes``),
  absent for a causal LM task scored by label words;
- ``merge_report.json`` (timings, peak RSS, the method's own statistics), ``provenance.json`` (inputs with hashes,
  the task file and each data file with their SHA-256, per task the split read and how many examples, whether the
  method read test inputs — ``transductive``) and a model card ``README.md``.

Splits: Fisher and RegMean read the *train* split, AdaMerging(++) the unlabelled *test* inputs (its paper's protocol,
``transductive: true``); ``data_split`` overrides it (``val`` keeps AdaMerging off the test inputs). No method reads
labels; the probe heads read the train split's labels.

Memory: the experts are read one at a time when a driver asks for them (:class:`LazyExperts`): RegMean holds one
expert module and the float64 sums of the linear layers of one pass (``gram_mb``), Fisher one expert with its Fisher
and the running sums, AdaMerging the base and ``T`` task vectors (``T + 1`` copies) — docs/data_aware.md.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import torch
from pydantic import ValidationError

from .. import __version__
from ..config import MergeConfig, load_config
from ..engine.plan import OUT_DTYPES, dtype_overrides
from ..engine.report import _versions
from ..engine.run import MergeResult
from ..errors import ConfigError, TaskError, validation_lines
from ..io.output_guard import InputRef, check_output, check_writable
from ..io.writer import AtomicOutput, PlannedTensor, ShardedWriter, copy_model_files
from ..numeric import to_output_dtype
from ..tasks.contract import Budget, StateDict, TaskData
from ..tasks.hf import HFSuite, UserModelConfig, validate_user_model
from .access import DataParams, mergeable_names
from .adamerging import adamerging_merge_models
from .fisher import fisher_merge_models
from .regmean import regmean_merge_models

#: the driver of each method `neuromerge merge` runs with `data:` (registry name → driver)
DRIVERS: dict[str, Callable[..., StateDict]] = {
    "fisher": fisher_merge_models,
    "regmean": regmean_merge_models,
    "adamerging": adamerging_merge_models,
    "adamerging++": adamerging_merge_models,
}

#: what each method holds in memory besides the base (merge_report.json, docs/data_aware.md)
MEMORY = {
    "fisher": "one expert (state + module) at a time, its diagonal Fisher, and the running Σ c_t F_t θ_t, Σ c_t F_t "
              "(float32)",
    "regmean": "one expert module at a time, float32 running sums of the averaged tensors, and the float64 Grams and "
               "running Σ G̃_t, Σ G̃_t W_tᵀ, Σ W_t of the linear layers of one pass (≤ gram_mb)",
    "adamerging": "the base, T float32 task vectors and one module: T + 1 model copies",
    "adamerging++": "the base, T float32 task vectors and one module: T + 1 model copies",
}


@dataclass
class DataMergePlan:
    """A validated data-aware merge (:func:`prepare_data_merge`): nothing but headers and text data read."""

    config: MergeConfig
    method: str
    params: DataParams
    user: UserModelConfig  # absolute paths; ``experts`` maps each task to its model, in the config's model order
    base_ref: str
    tasks: list[TaskData]
    split: str
    transductive: bool  # the method reads the test split's inputs
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def data_files(self) -> dict[str, Path]:
        """Each task's data file (absolute)."""
        from ..tasks.taskfile import data_file, user_entries

        return {e.name: data_file(self.user.tasks, e) for e in user_entries(self.user.tasks, self.task_names)}

    def input_paths(self) -> list[str]:
        """Every file or folder the merge reads (the output must be none of them)."""
        return [self.user.base, *self.user.experts.values(), self.user.tasks, *map(str, self.data_files().values())]

    def summary(self) -> dict[str, Any]:
        """Plain-data description (``--dry-run`` and the report's ``summary``)."""
        return {
            "method": self.method, "kind": "data-aware", "base_model": self.base_ref,
            "models": [{"model": self.user.experts[t], "task": t} for t in self.task_names],
            "data": self.user.tasks, "split": self.split, "transductive": self.transductive,
            "examples_available": {t.name: len(getattr(t, self.split)) for t in self.tasks},
            "params": self.params.model_dump(), "memory": MEMORY[self.method], "warnings": list(self.warnings),
        }


def _rename_problem(line: str, order: Sequence[str]) -> str:
    """A :func:`~neuromerge.tasks.hf.validate_user_model` line in the merge config's words."""
    for i, task in enumerate(order):
        line = line.replace(f"experts.{task}: ", f"models[{i}] (task {task}): ")
    for old, new in (("base: ", "base_model: "), ("tasks: ", "data: ")):
        line = line.replace(": " + old, ": " + new, 1) if not line.startswith(old) else new + line[len(old):]
    return line


def prepare_data_merge(config: MergeConfig | dict[str, Any] | str | Path, *, source: str | Path | None = None,
                       allow_download: bool = False) -> DataMergePlan:
    """Validate a data-aware merge config before any weight is read: the config (:func:`~neuromerge.config.
    load_config`), the method's parameters, the base folder, each expert's headers, the task file, every task's data
    file (read and split) and the split the method reads (not empty). ``source``: the config file (messages, paths),
    default ``config`` when it is a path. Raises :class:`~neuromerge.errors.ConfigError` listing the problems."""
    if source is None and isinstance(config, str | Path):
        source = Path(config)
    cfg = load_config(config)
    if cfg.data is None:
        raise ConfigError(f"merge method {cfg.merge_method!r} is not run with task data: the config has no `data:`")
    cls = cfg.method_class()
    if cls.name not in DRIVERS:  # registry entries that are data-aware but write no model folder refuse earlier
        raise ConfigError(cls.refusal())
    try:
        params = cls.Params.model_validate(dict(cfg.parameters))
    except ValidationError as err:
        raise ConfigError("invalid parameters: " + "; ".join(validation_lines(err))) from None
    order = [str(m.task) for m in cfg.models]
    raw = {"base": cfg.base_model, "tasks": cfg.data_file, "experts": {t: m.model for t, m in zip(order, cfg.models,
                                                                                                   strict=True)},
           **cfg.data_budget, "seed": cfg.seed}
    try:
        user, base_ref = validate_user_model(raw, source=source, allow_download=allow_download)
    except TaskError as err:
        raise TaskError("\n".join(_rename_problem(line, order) for line in str(err).splitlines())) from None
    from ..tasks.taskfile import load_user_tasks

    tasks = load_user_tasks(user.tasks, user.budget(), order, split_seed=user.seed)  # reads and splits the text data
    split = cfg.data_split or getattr(cls, "split", "train")
    for t in tasks:
        if len(getattr(t, split)) == 0:
            raise TaskError(f"task {t.name!r}: the {split} split is empty ({len(t.train)} train, {len(t.val)} val, "
                            f"{len(t.test)} test examples); add examples or choose another data_split")
    warnings = []
    if split == "test":
        warnings.append(f"{cls.name} reads the unlabelled inputs of the test split (transductive); scores on that "
                        "split are not held-out scores (set `data_split: val` to keep it out)")
    return DataMergePlan(cfg, cls.name, params, user, base_ref, tasks, split, split == "test",
                         Path(source) if source is not None else None, warnings)


def check_data_merge_output(plan: DataMergePlan, out: str | Path, inputs: Iterable[InputRef] = ()) -> list[str]:
    """Refuse an output that is or contains an input (the base, an expert, the task file, a data file, ``inputs``)
    or that cannot hold the merged model (about the base's size); return warnings. Reads headers only."""
    from ..io.checkpoint import open_checkpoint

    warnings = check_output(out, [*inputs, *plan.input_paths()])
    with open_checkpoint(plan.user.base) as base:
        needed = base.total_bytes
    check_writable(out, needed)
    return warnings


# ------------------------------------------------------------------------------------------------ lazy experts
class LazyExperts(Sequence[StateDict]):
    """The experts of a user's merge, read from their adapters / checkpoints each time one is indexed (no state is
    cached), so a driver that visits them in turn holds one at a time. Each expert's probe head is fitted the first
    time it is read (:meth:`HFSuite.fit_probe`, as :func:`~neuromerge.tasks.hf.open_user_model`); :attr:`heads` is
    the sequence of heads (reading an expert whose head is not fitted yet)."""

    def __init__(self, suite: HFSuite, base: StateDict, paths: Sequence[str], tasks: Sequence[TaskData],
                 budget: Budget, seed: int) -> None:
        self.suite, self.base, self.paths, self.tasks, self.budget, self.seed = suite, base, list(paths), tasks, \
            budget, seed
        self.reads = [0] * len(self.paths)
        self.kinds: list[str | None] = [None] * len(self.paths)
        self._heads: list[StateDict | None] = [None] * len(self.paths)
        self._fitted = [False] * len(self.paths)
        self.heads = _Heads(self)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> StateDict: ...

    @overload
    def __getitem__(self, i: slice) -> list[StateDict]: ...

    def __getitem__(self, i: int | slice) -> StateDict | list[StateDict]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        state, rank = self.suite.expert_state(self.base, self.paths[i])
        self.reads[i] += 1
        self.kinds[i] = "full" if rank is None else "lora"
        if not self._fitted[i]:
            self._heads[i] = self.suite.fit_probe(state, self.tasks[i], self.budget, self.seed)
            self._fitted[i] = True
        return state

    def head(self, i: int) -> StateDict | None:
        if not self._fitted[i]:
            self[i]  # reads the expert (fitting its head) and keeps nothing
        return self._heads[i]


class _Heads(Sequence["StateDict | None"]):
    def __init__(self, experts: LazyExperts) -> None:
        self.experts = experts

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, i: int) -> StateDict | None:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("heads are indexed one at a time")
        return self.experts.head(i % len(self.experts))

    def __iter__(self) -> Iterator[StateDict | None]:
        return (self[i] for i in range(len(self)))


# ------------------------------------------------------------------------------------------------ the run
@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_with_data(config: MergeConfig | dict[str, Any] | str | Path, out: str | Path, *, force: bool = False,
                    durable: bool = False, allow_download: bool = False, threads: int | None = None,
                    device: str = "cpu", inputs: Iterable[InputRef] = (), source: str | Path | None = None,
                    progress: bool | None = None, chunk_elements: int | None = None) -> MergeResult:
    """Run a data-aware merge (module docstring) into the Hugging Face folder ``out`` (atomic: complete or absent).

    ``threads``: torch's intra-op threads during the run (default: torch's); ``device``: ``cpu`` only (the forward
    passes run on the CPU); ``inputs``: more paths ``out`` must not be (the config file is added when ``config`` is a
    path); ``progress`` and ``chunk_elements`` are accepted for the static merge's signature and unused."""
    t_start = time.perf_counter()
    if device != "cpu":
        raise ConfigError(f"a data-aware merge runs on the CPU; --device {device} is not supported with `data:`")
    plan = prepare_data_merge(config, source=source, allow_download=allow_download)
    sources = [*inputs, *([config] if isinstance(config, str | Path) else [])]
    warnings = [*plan.warnings, *check_data_merge_output(plan, out, sources)]
    atomic = AtomicOutput(Path(out), force=force, durable=durable)
    timings = {"validate": time.perf_counter() - t_start}
    with atomic as tmp, _torch_threads(threads):
        warnings += atomic.notes
        t0 = time.perf_counter()
        user = plan.user
        suite = HFSuite(user.base, user.seq_len, user.batch_size)
        budget = user.budget()
        base = suite.backbone_state()
        experts = LazyExperts(suite, base, [user.experts[t] for t in plan.task_names], plan.tasks, budget, user.seed)
        timings["load_base"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        exclude = [*plan.config.exclude, *suite.merge_exclude()]
        info: dict[str, Any] = {}
        torch.manual_seed(plan.config.seed)
        merged = DRIVERS[plan.method](suite, base, experts, experts.heads, plan.tasks, budget, plan.params,
                                      exclude=exclude, info=info, split=plan.split)
        heads = [experts.head(i) for i in range(len(experts))]
        timings["merge"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        names = set(mergeable_names(base, exclude))
        written = _write_model(plan, tmp, base, merged, names, durable=durable)
        warnings += written.pop("warnings")
        warnings += copy_model_files(Path(user.base), tmp, config_overrides=written.pop("config_overrides"))
        head_files = _write_heads(tmp, plan.tasks, heads)
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        report = _write_reports(plan, tmp, info=info, written=written, heads=head_files, experts=experts,
                                timings=timings, warnings=warnings)
    return MergeResult(Path(out), report)


def _name_map(ckpt_names: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """checkpoint name → backbone key: the checkpoint may prefix the module's keys (``bert.``)."""
    names = set(ckpt_names)
    prefix = ""
    for k in keys:
        if k in names:
            break
        hit = next((n for n in ckpt_names if n.endswith("." + k)), None)
        if hit is not None:
            prefix = hit[: -len(k)]
            break
    return {n: n[len(prefix):] for n in ckpt_names if n.startswith(prefix)}


def _write_model(plan: DataMergePlan, tmp: Path, base: StateDict, merged: StateDict, names: set[str], *,
                 durable: bool) -> dict[str, Any]:
    """The base checkpoint's tensors, merged ones replaced, through :class:`ShardedWriter`; returns the shards,
    counts, the clamped values, ``config_overrides`` (dtype) and warnings."""
    from ..io.checkpoint import open_checkpoint

    cfg = plan.config
    override = OUT_DTYPES[cfg.dtype] if cfg.dtype else None
    with open_checkpoint(plan.user.base) as ckpt:
        ckpt_names = ckpt.names()
        keys = _name_map(ckpt_names, list(base))
        planned: list[PlannedTensor] = []
        outs = []
        for name in ckpt_names:
            info = ckpt.info(name)
            floating = info.dtype.is_floating_point
            dtype = (override or info.dtype) if floating else info.dtype
            planned.append(PlannedTensor(name, tuple(info.shape), dtype))
            outs.append(SimpleNamespace(out_dtype=dtype, numel=int(torch.Size(info.shape).numel())))
        writer = ShardedWriter(tmp, planned, max_shard_bytes=cfg.shard_bytes,
                               metadata={"format": "pt", "merged_by": "neuromerge", "method": plan.method})
        merged_count = merged_params = 0
        clamped: dict[str, int] = {}
        with writer:
            for t in planned:
                key = keys.get(t.name)
                if key is not None and key in names:
                    value = merged[key]
                    if tuple(value.shape) != t.shape:
                        raise ConfigError(f"{t.name}: the merged tensor has shape {tuple(value.shape)}, the base "
                                          f"checkpoint {t.shape}")
                    out, n = to_output_dtype(value.detach().contiguous(), t.dtype, tensor=t.name, mode=cfg.overflow)
                    merged_count += 1
                    merged_params += value.numel()
                else:
                    out, n = ckpt.read(t.name), 0
                    if out.dtype != t.dtype:
                        out, n = to_output_dtype(out, t.dtype, tensor=t.name, mode=cfg.overflow, what="copied")
                if n:
                    clamped[t.name] = n
                writer.write(t.name, out)
            shards = writer.close(durable=durable)
    missing = sorted(names - set(keys.values()))
    warnings = []
    if missing:
        warnings.append(f"{len(missing)} merged tensor(s) are not in the base checkpoint and are not written (tied "
                        f"or generated by the model class): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if clamped:
        warnings.append(f"overflow: clamp: {sum(clamped.values())} values of {len(clamped)} tensor(s) were clamped "
                        "to the output dtype's range (merge_report.json, overflow)")
    return {"shards": shards, "tensors": len(planned), "merged_tensors": merged_count,
            "merged_parameters": merged_params, "clamped": clamped, "not_written": missing,
            "config_overrides": dtype_overrides(outs), "warnings": warnings}  # type: ignore[arg-type]


def _write_heads(tmp: Path, tasks: Sequence[TaskData], heads: Sequence[StateDict | None]) -> dict[str, str | None]:
    """``heads/<task>.safetensors`` (``weight`` (C, d), ``bias`` (C,), float32; metadata ``task``, ``classes``) for
    every task with a probe head; task → file (relative) or None (scored by label words)."""
    from safetensors.torch import save_file

    files: dict[str, str | None] = {}
    folder = tmp / "heads"
    for task, head in zip(tasks, heads, strict=True):
        if head is None:
            files[task.name] = None
            continue
        folder.mkdir(exist_ok=True)
        tensors = {k: head[k].detach().float().contiguous() for k in ("weight", "bias")}
        save_file(tensors, str(folder / f"{task.name}.safetensors"),
                  metadata={"task": task.name, "classes": json.dumps(list(task.classes))})
        files[task.name] = f"heads/{task.name}.safetensors"
    return files


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _input_record(role: str, path: str, task: str | None = None) -> dict[str, Any]:
    """One input of ``provenance.json``: a checkpoint's header hash (its weight files' headers and sizes), or for a
    PEFT adapter folder the SHA-256 of its files."""
    from ..io.checkpoint import open_checkpoint
    from ..io.lora import is_adapter_folder

    record: dict[str, Any] = {"role": role, "path": path}
    if task is not None:
        record["task"] = task
    p = Path(path)
    if role == "model" and is_adapter_folder(p):
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.startswith("adapter_"))
        record.update({"kind": "lora", "bytes": sum(f.stat().st_size for f in files),
                       "sha256": {f.name: _sha256(f) for f in files}})
        return record
    with open_checkpoint(p) as ckpt:
        record.update({"kind": "full", "bytes": ckpt.total_bytes, "header_sha256": ckpt.header_hash()})
    return record


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _write_reports(plan: DataMergePlan, tmp: Path, *, info: dict[str, Any], written: dict[str, Any],
                   heads: dict[str, str | None], experts: LazyExperts, timings: dict[str, float],
                   warnings: list[str]) -> dict[str, Any]:
    """``merge_report.json``, ``provenance.json`` and ``README.md``; returns the report."""
    shards = written["shards"]
    examples = info.get("examples", {})
    summary = {**plan.summary(), "tensors": written["tensors"], "merged_tensors": written["merged_tensors"],
               "copied_tensors": written["tensors"] - written["merged_tensors"],
               "merged_parameters": written["merged_parameters"], "heads": heads}
    report = {
        "summary": summary,
        "method": {k: v for k, v in info.items()},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "peak_rss_bytes": _peak_rss(),
        "expert_reads": dict(zip(plan.task_names, experts.reads, strict=True)),
        "bytes_written": shards.get("bytes_written", shards.get("total_size")),
        "shards": shards.get("files", []),
        "not_written": written["not_written"],
        "overflow": {"mode": plan.config.overflow, "clamped_values": sum(written["clamped"].values()),
                     "tensors": dict(sorted(written["clamped"].items()))},
        "warnings": warnings,
    }
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=2, default=str))
    files = plan.data_files()
    data = {
        "task_file": plan.user.tasks, "sha256": _sha256(plan.user.tasks), "split": plan.split,
        "transductive": plan.transductive, "labels_read_by_method": False,
        "split_seed": plan.user.seed, "budget": plan.user.model_dump(include={"seq_len", "batch_size",
                                                                               "train_examples", "val_examples",
                                                                               "probe_steps", "probe_l2"}),
        "tasks": {t.name: {"file": str(files[t.name]), "sha256": _sha256(files[t.name]), "fingerprint": t.fingerprint,
                           "split": plan.split, "examples": examples.get(t.name),
                           "split_sizes": {"train": len(t.train), "val": len(t.val), "test": len(t.test)},
                           "head": None if heads[t.name] is None else
                           {"file": heads[t.name], "split": "train", "examples": len(t.train), "labels": True}}
                  for t in plan.tasks},
    }
    provenance = {
        "inputs": [_input_record("base", plan.user.base),
                   *[_input_record("model", plan.user.experts[t], t) for t in plan.task_names]],
        "data": data,
        "method": plan.method,
        "params": plan.params.model_dump(),
        "versions": _versions(),
        "seed": plan.config.seed,
        "config": plan.config.model_dump(mode="json", exclude_none=True),
        "command": " ".join(sys.argv),
    }
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2))
    (tmp / "README.md").write_text(_model_card(plan, heads))
    return report


def _model_card(plan: DataMergePlan, heads: dict[str, str | None]) -> str:
    models = "\n".join(f"- `{plan.user.experts[t]}` (task `{t}`{', head `' + h + '`' if h else ''})"
                       for t, h in heads.items())
    read = (f"the unlabelled inputs of the **{plan.split}** split (transductive)" if plan.transductive
            else f"the inputs of the **{plan.split}** split")
    return f"""---
library_name: transformers
tags: [merge, neuromerge, {plan.method}, data-aware]
---
# Merged model

Made with [neuromerge](https://github.com/neuromerge/neuromerge) {__version__} using **{plan.method}**, which read
{read} of each task in `{Path(plan.user.tasks).name}`.

- Base model: `{plan.base_ref}`
- Parameters: `{json.dumps(plan.params.model_dump())}`; seed {plan.config.seed}

Models merged:
{models}

`provenance.json` lists the inputs (with hashes), the data read per task and the versions; `merge_report.json` gives
the method's statistics, timings and peak memory; `heads/` holds each task's linear head (`weight`, `bias`).
"""


def wants_data(config: MergeConfig | dict[str, Any] | str | Path) -> bool:
    """Whether ``config`` is a data-aware merge (it names ``data:``): validated like any config first."""
    return load_config(config).data is not None


__all__ = ["DRIVERS", "MEMORY", "DataMergePlan", "LazyExperts", "check_data_merge_output", "merge_with_data",
           "prepare_data_merge", "wants_data"]
