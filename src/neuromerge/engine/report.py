"""The files every merge writes next to the weights: ``merge_report.json``, ``provenance.json``, ``README.md``."""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import __version__, kernels
from ..io.lora import LoraCheckpoint
from ..methods import GlobalStats
from .plan import MergePlan
from .stats import TrimStatistics


def _versions() -> dict[str, str]:
    out = {"neuromerge": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("safetensors", "numpy", "pydantic", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def summarize_plan(plan: MergePlan, threads: int) -> dict[str, Any]:
    """Plain-data description of a plan (the ``--dry-run`` output and part of the report)."""
    merged = plan.merged
    return {
        "method": plan.method.name,
        "base_model": str(plan.pool.base.path),
        "models": [str(m.path) for m in plan.pool.models],
        "tensors": len(plan.tensors),
        "merged_tensors": len(merged),
        "copied_tensors": len(plan.tensors) - len(merged),
        "merged_parameters": sum(t.numel for t in merged),
        "chunked_tensors": sum(1 for t in merged if len(t.chunks) > 1),
        "input_bytes": plan.input_bytes(),
        "output_bytes": plan.output_bytes(),
        "estimated_peak_working_set_bytes": plan.peak_memory_estimate(threads),
        "threads": threads,
        "fused_kernels": kernels.available(),  # the compiled kernels were there for the methods that have them
        "layout_fallback_tensors": [t.name for t in plan.tensors if t.fallback_layout],
        "output": plan.lora.summary() if plan.lora is not None else {"format": "full"},
        "vocabulary": None if (v := plan.pool.vocabulary) is None else {
            "source": v.source, "tokens": v.tokens, "rows": v.size,
            "remapped_tensors": [t.name for t in plan.tensors if t.remapped]},
        "warnings": plan.warnings,
        **({"slices": plan.slice_table} if plan.slice_table else {}),
    }


def _stats_dict(stats: GlobalStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "thresholds": list(stats.thresholds),
        "kept": list(stats.kept),
        "total": list(stats.total),
        # the kept fraction of the trim's population: the entries of the tensors some model changes
        "kept_density": [k / n if n else 0.0 for k, n in zip(stats.kept, stats.total, strict=True)],
        "population": "entries of the merged tensors that some model changes",
        "unchanged_tensors": stats.unchanged_tensors,
        "unchanged_entries": stats.unchanged_entries,
        "removed_l1_fraction": list(stats.removed_fraction) if stats.total_l1 else None,
    }


def _trim_dict(trim: TrimStatistics | None) -> dict[str, Any] | None:
    """``global_statistics``: one group of every model as before (a dict of per-model lists); several groups (a
    density varying by layer or filter) as ``{"groups": [...]}``, each with its models, densities and tensor count."""
    if trim is None:
        return None
    if len(trim.groups) == 1 and len(trim.groups[0][0].models) == trim.n_models:
        return _stats_dict(trim.groups[0][1])
    return {"groups": [{"models": list(g.models), "densities": list(g.densities), "tensors": len(g.tensors),
                        **(_stats_dict(s) or {})} for g, s in trim.groups]}


def write_reports(plan: MergePlan, out: Path, *, stats: TrimStatistics | list[TrimStatistics | None] | None,
                  per_tensor: dict[str, dict[str, float]],
                  shards: dict[str, Any], timings: dict[str, float], warnings: list[str], threads: int,
                  peak_rss: int, lora: dict[str, Any] | None = None, overflow: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Write ``merge_report.json`` (``lora``: the LoRA output's ranks and discarded energies, when there is one;
    ``overflow``: the values clamped to the output dtype, ``overflow: clamp``), ``provenance.json`` and the model
    card ``README.md``; return the report."""
    bytes_read = sum(c.bytes_read for c in plan.pool.checkpoints)
    keys = sorted({k for rep in per_tensor.values() for k in rep})
    sizes = {t.name: t.numel for t in plan.merged}
    overall = {}
    for key in keys:
        num = sum(rep[key] * sizes.get(n, 0) for n, rep in per_tensor.items() if key in rep)
        den = sum(sizes.get(n, 0) for n, rep in per_tensor.items() if key in rep)
        overall[key] = num / den if den else 0.0
    report = {
        "summary": summarize_plan(plan, threads),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "peak_rss_bytes": peak_rss,
        "bytes_read": bytes_read,
        "bytes_written": shards.get("bytes_written", shards.get("total_size")),
        "shards": shards.get("files", []),
        # ``slices``: one entry per output slice (each slice has its own global trim)
        "global_statistics": [_trim_dict(s) for s in stats] if isinstance(stats, list) else _trim_dict(stats),
        "overall": overall,
        "tensors": per_tensor,
        "warnings": warnings,
    }
    if lora is not None:
        report["lora"] = lora
    if overflow is not None:
        report["overflow"] = overflow
    (out / "merge_report.json").write_text(json.dumps(report, indent=2, default=str))
    provenance = {
        "inputs": [_input_record(c, plan) for c in plan.pool.checkpoints],
        "versions": _versions(),
        "seed": plan.config.seed,
        "config": plan.config.model_dump(mode="json", exclude_none=True),
        "command": " ".join(sys.argv),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    (out / "README.md").write_text(_model_card(plan))
    return report


def _input_record(ckpt: Any, plan: MergePlan) -> dict[str, Any]:
    """One input of ``provenance.json``; a LoRA adapter also names the base it was trained on
    (``base_model_name_or_path``), the local base it was read over, and whether the two were verified to match."""
    record = {"role": "base" if ckpt is plan.pool.base else "model", "path": str(ckpt.path),
              "bytes": ckpt.total_bytes, "header_sha256": ckpt.header_hash()}
    if isinstance(ckpt, LoraCheckpoint):
        record["lora_adapter"] = {"base_model_name_or_path": ckpt.base_reference, "local_base": str(ckpt.base.path),
                                  "base_verified": ckpt.base_match is True}
    return record


def _model_card(plan: MergePlan) -> str:
    cfg = plan.config
    # parameters as plain JSON data: a value may be a list of {filter, value} conditions (pydantic models)
    dumped = cfg.model_dump(mode="json", include={"parameters", "models"}, exclude_none=True)
    models = "\n".join(f"- `{m['model']}` {json.dumps(m['parameters']) if m['parameters'] else ''}"
                       for m in dumped["models"])
    params = json.dumps(dumped["parameters"]) if dumped["parameters"] else "defaults"
    lora = plan.lora is not None
    kind = f"LoRA adapter (rank {plan.lora.rank})" if plan.lora is not None else "model"
    return f"""---
library_name: {"peft" if lora else "transformers"}
tags: [merge, neuromerge, {plan.method.name}{", lora" if lora else ""}]
---
# Merged {kind}

Made with [neuromerge](https://github.com/neuromerge/neuromerge) {__version__} using **{plan.method.name}**
({plan.method.summary}).

- Base model: `{cfg.base_model}`
- Parameters: `{params}`; seed {cfg.seed}; output dtype {cfg.dtype or "the base's"}

Models merged:
{models}

`provenance.json` lists the exact inputs (with header hashes), versions and the resolved config;
`merge_report.json` gives per-tensor statistics, timings and memory.
"""
