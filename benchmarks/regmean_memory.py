"""Peak memory of RegMean on a user's models: experts held in memory vs read one at a time (``neuromerge merge``
with ``data:``), on a small synthetic BERT family.

Prints ONE JSON object to stdout (progress to stderr). Each run is a child process; its peak RSS is ``ru_maxrss``
from ``os.wait4``. The family (a BERT base with a word-level tokenizer, ``--experts`` full-checkpoint experts =
base + seeded noise, one task file with a JSONL file per task) is written under ``--workdir`` once.

Runs:

- ``baseline``: the libraries imported and the base model loaded (what every run pays);
- ``held``: the experts as a :class:`~neuromerge.tasks.TaskSet` (:func:`~neuromerge.tasks.hf.load_user_model`:
  every expert's state in memory) and :func:`~neuromerge.data_aware.regmean.regmean_merge_models` over it — what a
  caller holding all experts pays (the bench's way);
- ``streamed``: ``neuromerge.merge(config with data:)`` — one expert module at a time, one pass (default
  ``gram_mb``);
- ``streamed-groups``: the same with ``gram_mb`` small (several passes, each expert read once per pass).

    python benchmarks/regmean_memory.py --hidden 256 --layers 4 --gram-mb 2   # results-regmean-memory.json
    python benchmarks/regmean_memory.py                                       # hidden 512, 6 layers, 4 experts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = [f"w{i}" for i in range(200)]


def build_family(work: Path, hidden: int, layers: int, experts: int) -> None:
    """Base folder, experts, task file, data (skipped when ``work/done`` exists)."""
    if (work / "done").is_file():
        return
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    (work / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                     max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    base.save_pretrained(work / "base")
    BertTokenizerFast(vocab_file=str(work / "vocab.txt"), do_lower_case=False).save_pretrained(work / "base")
    g = torch.Generator().manual_seed(1)
    entries = []
    for t in range(experts):
        expert = BertModel(cfg).eval()
        expert.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                for k, v in base.state_dict().items()})
        expert.save_pretrained(work / f"expert{t}")
        rows = [json.dumps({"text": " ".join(WORDS[(13 * i + 7 * j + 31 * t) % 200] for j in range(24)),
                            "label": i % 2}) for i in range(200)]
        (work / f"t{t}.jsonl").write_text("\n".join(rows) + "\n")
        entries.append(f"  - {{name: t{t}, file: t{t}.jsonl}}")
    (work / "tasks.yaml").write_text("tasks:\n" + "\n".join(entries) + "\n")
    (work / "done").write_text("ok\n")


def config(work: Path, experts: int, examples: int, gram_mb: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {"examples": examples, "batch_size": 16}
    if gram_mb is not None:
        params["gram_mb"] = gram_mb
    return {"merge_method": "regmean", "base_model": str(work / "base"),
            "models": [{"model": str(work / f"expert{t}"), "task": f"t{t}"} for t in range(experts)],
            "data": {"tasks": str(work / "tasks.yaml"), "seq_len": 32, "train_examples": examples,
                     "val_examples": 8, "probe_steps": 5}}


def child(kind: str, work: Path, experts: int, examples: int, gram_mb: float | None) -> dict[str, Any]:
    """One measured run in this (child) process; returns its figures."""
    import shutil

    t0 = time.perf_counter()
    cfg = config(work, experts, examples, gram_mb)
    if kind == "baseline":  # the libraries and the base model alone
        import neuromerge.data_aware.merge
        from neuromerge.tasks.hf import HFSuite

        HFSuite(cfg["base_model"]).backbone_state()
        return {"wall_s": time.perf_counter() - t0}
    if kind == "held":
        from neuromerge.data_aware.regmean import RegMeanParams, regmean_merge_models
        from neuromerge.tasks.hf import load_user_model

        ts = load_user_model({"base": cfg["base_model"], "tasks": cfg["data"]["tasks"],
                              "experts": {m["task"]: m["model"] for m in cfg["models"]},
                              **{k: v for k, v in cfg["data"].items() if k != "tasks"}})
        info: dict[str, Any] = {}
        regmean_merge_models(ts.suite, ts.base, [e.backbone for e in ts.experts], [e.head for e in ts.experts],
                             ts.tasks, ts.budget, RegMeanParams(examples=examples, batch_size=16),
                             exclude=ts.suite.merge_exclude(), info=info)
        return {"wall_s": time.perf_counter() - t0, "passes": info["passes"]}
    import neuromerge

    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    cfg["parameters"] = {"examples": examples, "batch_size": 16, **({"gram_mb": gram_mb} if gram_mb else {})}
    rep = neuromerge.merge(cfg, out).report
    return {"wall_s": time.perf_counter() - t0, "passes": rep["method"]["passes"],
            "expert_reads": rep["expert_reads"], "report_peak_rss_bytes": rep["peak_rss_bytes"],
            "pass_float64_bytes": rep["method"]["pass_float64_bytes"]}


def measure(args: argparse.Namespace, kind: str, gram_mb: float | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(args.workdir), "--experts", str(args.experts),
           "--examples", str(args.examples)] + (["--gram-mb", str(gram_mb)] if gram_mb else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} failed (status {status})")
    return {**json.loads(out), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/neuromerge-regmean-memory"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--gram-mb", type=float, default=None)
    ap.add_argument("--runs", default="baseline,held,streamed,streamed-groups", help="comma-separated runs")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.experts, args.examples, args.gram_mb)))
        return
    args.workdir = args.workdir / f"h{args.hidden}-l{args.layers}-e{args.experts}"
    print(f"building the family in {args.workdir}", file=sys.stderr)
    build_family(args.workdir, args.hidden, args.layers, args.experts)
    weights = (args.workdir / "base" / "model.safetensors").stat().st_size
    results = {}
    runs = (("baseline", None), ("held", None), ("streamed", None), ("streamed-groups", args.gram_mb or 16.0))
    for kind, gram_mb in [r for r in runs if r[0] in args.runs.split(",")]:
        print(f"run {kind}", file=sys.stderr)
        results[kind] = measure(args, kind, gram_mb)
    print(json.dumps({"hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                      "examples": args.examples, "model_bytes": weights, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
