"""``neuromerge export-experts``: a suite's cached experts as Hugging Face folders or PEFT adapters.

The experts are the bench's own: :func:`~neuromerge.bench.protocol.prepare_suite` and
:func:`~neuromerge.bench.protocol.train_experts` with the same suite, budget, tasks, mode and seed, hence the same
cache keys (after ``neuromerge bench text --quick`` the export is instant; from an empty cache it trains them). The
folder written (atomically, :class:`~neuromerge.io.writer.AtomicOutput`)::

    DIR/base/                 the suite's backbone as a loadable HF folder (config.json, model.safetensors, tokenizer)
    DIR/experts/<task>/       full mode: the fine-tuned backbone, a loadable HF folder like base/;
                              lora mode: a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) for
                              base/, ``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), path)``
    DIR/heads/<task>.safetensors   the expert's linear head (weight (C, d), bias (C,)) over the suite's features
    DIR/data/<task>.jsonl     the task's examples ({"text", "label", "split"}; the bench's train, val, test splits)
    DIR/tasks.yaml            a task file (docs/bench.md) over data/, classes in the heads' order
    DIR/merge.yaml            a ready `neuromerge merge` config: TIES over base/ and experts/
    DIR/route.yaml            lora mode: a ready `neuromerge route build min_merging|twin|emr|wemoe --config`
    DIR/export.json           what was exported: suite, mode, budget, seed, tasks, classes, test accuracies, features

Configs name their folders by absolute path (a relative one would resolve against the working directory first):
move the folder, and re-export or edit them. Suites: ``text`` (MiniLM-L6, ``BertModel``; features = mean over the real
tokens of the last hidden state, logits = ``f Wᵀ + b``). The frozen word embeddings and the unused pooler are the
base's in every expert.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..io.output_guard import check_output
from ..io.writer import LOCK_FILE, AtomicOutput, copy_model_files
from .suites import BenchError

EXPORT_FORMAT = 1
SUITES = ("text",)
MODES = ("full", "lora")
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
FEATURES = {"text": "mean over the real tokens (attention_mask) of the last hidden state of AutoModel; "
                    "logits = features @ weight.T + bias"}


@dataclass
class ExportResult:
    """What :func:`export_experts` wrote."""

    out: Path
    suite: str
    mode: str
    tasks: list[str]
    experts: list[str]
    trained: list[str] = field(default_factory=list)  # experts that were not in the cache
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _text_source() -> tuple[Path, dict[str, torch.Tensor]]:
    """The packaged model folder and its tensors that the suite's backbone leaves out (the pooler)."""
    from safetensors.torch import load_file

    from .text import model_path

    folder = model_path()
    return folder, load_file(str(folder / WEIGHTS))


def _hf_folder(out: Path, source: Path, state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> list[str]:
    """``out`` = a loadable HF folder: ``state`` + the ``extra`` tensors it lacks, the source's config + tokenizer."""
    out.mkdir(parents=True)
    tensors = {**{k: v for k, v in extra.items() if k not in state}, **state}
    _save(dict(sorted(tensors.items())), out / WEIGHTS)
    return copy_model_files(source, out)


def _adapter_folder(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, base_ref: str
                    ) -> None:
    """A PEFT LoRA adapter whose ``B A`` is each module's update (scaling ``lora_alpha / r`` = 1)."""
    out.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in sorted(factors.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
    pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_ref, "r": rank, "lora_alpha": rank,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    _save(tensors, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _split_rows(task: Any) -> list[dict[str, Any]]:
    rows = []
    for split in ("train", "val", "test"):
        s = getattr(task, split)
        for text, label in zip(s.inputs, s.labels.tolist(), strict=True):
            rows.append({"text": text, "label": task.classes[int(label)], "split": split})
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _yaml(path: Path, header: str, doc: dict[str, Any]) -> None:
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + body, encoding="utf-8")


def export_experts(out: str | os.PathLike[str], suite: str = "text", *, mode: str = "full", quick: bool = False,
                   tasks: Sequence[str] | None = None, seed: int = 0, task_file: str | os.PathLike[str] | None = None,
                   rebuild: bool = False, force: bool = False, progress: bool | None = None,
                   log: Callable[[str], None] | None = None) -> ExportResult:
    """Export the experts of ``suite`` (trained or loaded from the expert cache exactly as ``neuromerge bench``
    does) into ``out`` (module docstring). ``tasks``: a subset of the suite's tasks (out-of-domain ones give data
    only); ``task_file``: extra user tasks, as for the bench. :class:`BenchError` for an unknown suite or mode;
    the output is checked (an existing folder without ``force``; a folder that is or holds an input: the packaged
    model, the cache, the task file) before any expert is trained."""
    import sys

    from .cache import cache_root
    from .protocol import _bar_factory, prepare_suite, train_experts

    if suite not in SUITES:
        raise BenchError(f"export-experts supports the suite(s) {', '.join(SUITES)}, not {suite!r}")
    if mode not in MODES:
        raise BenchError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    out = Path(out)
    source, packaged = _text_source()
    inputs = [source, cache_root(), task_file]
    check_output(out, inputs)
    if out.exists() and not force:
        raise BenchError(f"output folder {out} exists; pass --force to replace it")
    say = log or (lambda _msg: None)
    prep = prepare_suite(suite, tasks, quick=quick, rebuild=rebuild, task_file=task_file, seed=seed, mode=mode)
    bar = _bar_factory(sys.stderr.isatty() if progress is None else progress)
    train_experts(prep, seed, rebuild=rebuild, bar=bar)
    trained = [n for n, info in prep.expert_info.items() if not info["cached"]]
    say(f"experts: {len(prep.experts)} ({len(trained)} trained, {len(prep.experts) - len(trained)} from the cache)")

    final = out.absolute()
    base_state = prep.base
    result = ExportResult(final, suite, mode, [t.name for t in prep.chosen], list(prep.experts), trained)
    writer = AtomicOutput(out, force=force, inputs=inputs)
    result.warnings += writer.warnings
    rank = prep.suite.expert_rank() or 8
    with writer as tmp:
        result.warnings += _hf_folder(tmp / "base", source, base_state, packaged)
        (tmp / "experts").mkdir()
        (tmp / "heads").mkdir()
        (tmp / "data").mkdir()
        for name, expert in prep.experts.items():
            if mode == "full":
                _hf_folder(tmp / "experts" / name, source, expert.backbone, packaged)
            else:
                from .lora_experts import lora_factors

                factors = lora_factors(base_state, expert.backbone, rank, exclude=prep.suite.merge_exclude())
                _adapter_folder(tmp / "experts" / name, factors, rank, str(final / "base"))
            if expert.head is not None:
                _save(expert.head, tmp / "heads" / f"{name}.safetensors")
        entries = []
        for t in prep.chosen:
            _write_jsonl(tmp / "data" / f"{t.name}.jsonl", _split_rows(t))
            entries.append({"name": t.name, "suite": suite, "file": f"data/{t.name}.jsonl", "text_column": "text",
                            "label_column": "label", "in_domain": t.in_domain, "classes": list(t.classes)})
        _yaml(tmp / "tasks.yaml", "task file written by `neuromerge export-experts` (docs/bench.md): one entry per "
              "task,\nthe bench's train / val / test examples of each (the `split` field is informative: a task "
              "file is re-split 60/20/20)", {"tasks": entries})
        experts = {n: str(final / "experts" / n) for n in prep.experts}
        _yaml(tmp / "merge.yaml", f"neuromerge merge {final / 'merge.yaml'} -o merged/\n"
              f"TIES over the exported {suite} experts ({mode} mode); any static method works "
              "(`neuromerge methods`)",
              {"merge_method": "ties", "base_model": str(final / "base"),
               "models": [{"model": p} for p in experts.values()], "parameters": {"density": 0.2}})
        seq_len = int(prep.budget.extra.get("seq_len", 64))
        if mode == "lora":
            _yaml(tmp / "route.yaml", f"neuromerge route build min_merging --config {final / 'route.yaml'} -o routed/"
                  "\n(also: twin, emr, wemoe; `neuromerge methods min_merging` lists params:)",
                  {"base": str(final / "base"), "tasks": str(final / "tasks.yaml"), "experts": experts,
                   "params": {}, "seq_len": seq_len, "seed": seed})
        info = {
            "format": EXPORT_FORMAT, "suite": suite, "mode": mode, "quick": quick, "seed": seed,
            "seq_len": seq_len, "features": FEATURES[suite], "base": "base",
            "lora": {"r": rank, "lora_alpha": rank, "note": "B already holds the scaling"} if mode == "lora" else None,
            "tasks": [{"name": t.name, "in_domain": t.in_domain, "classes": list(t.classes),
                       "expert": f"experts/{t.name}" if t.name in prep.experts else None,
                       "head": f"heads/{t.name}.safetensors" if t.name in prep.experts else None,
                       "expert_test_accuracy": prep.experts[t.name].test_score if t.name in prep.experts else None,
                       "data": f"data/{t.name}.jsonl",
                       "examples": {s: len(getattr(t, s)) for s in ("train", "val", "test")}}
                      for t in prep.chosen],
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        result.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()
                              and p.name != LOCK_FILE)
    return result


__all__ = ["ExportResult", "export_experts"]
