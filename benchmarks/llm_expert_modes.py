"""Cost of the llm suite's expert modes (issue #18 §7): one expert per mode on one task, then two merges of four
experts of that mode's size, and the time to score the base on one normal-budget test split.

    PYTHONPATH=src .venv/bin/python benchmarks/llm_expert_modes.py --steps 8 > llm-modes.json

Prints one JSON object to stdout: per mode the training time, trained / merged parameter counts, the expert's
quick val / test accuracy and the merge times (Task Arithmetic and TIES of the real expert and three synthetic
experts ``base + 1e-3·N(0, 1)``, seeded); and ``eval_test_s`` for the normal test split of ``--task``. Experts are
cached as by the bench (``$NEUROMERGE_CACHE``): point it at an empty folder to time training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per expert (batch 8)")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--modes", default="lora,lora_all,full")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from neuromerge.bench.llm import LLMSuite
    from neuromerge.functional import merge_state_dicts

    suite = LLMSuite()
    budget = dataclasses.replace(suite.budget(quick=True), train_steps=args.steps)
    task = next(t for t in suite.tasks(budget) if t.name == args.task)
    out: dict[str, object] = {"steps": args.steps, "batch_size": budget.batch_size, "threads": args.threads}
    for mode in args.modes.split(","):
        suite.prepare_mode(mode)
        t0 = time.perf_counter()
        expert = suite.train_expert(task, budget, mode, seed=0)
        row = {"wall_s": time.perf_counter() - t0, "train_s": expert.meta["train_seconds"],
               "trained_params": expert.meta.get("trained_params"),
               "merged_params": sum(v.numel() for v in expert.backbone.values()),
               "val": expert.meta.get("val_score"), "test": expert.test_score}
        base = suite.backbone_state()
        g = torch.Generator().manual_seed(0)
        experts = [expert.backbone] + [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                                       for _ in range(3)]
        for method in ("task_arithmetic", "ties"):
            t0 = time.perf_counter()
            merge_state_dicts(method, base, experts, parameters={}, seed=0)
            row[f"merge_{method}_s"] = time.perf_counter() - t0
        out[mode] = row
        print(mode, json.dumps(row), file=sys.stderr, flush=True)
        del experts, expert
    suite.prepare_mode("lora")
    normal = suite.budget(quick=False)
    task = next(t for t in suite.tasks(normal) if t.name == args.task)
    t0 = time.perf_counter()
    out["eval_base_test"] = {"examples": len(task.test),
                             "accuracy": suite.evaluate(suite.backbone_state(), None, task, "test", normal),
                             "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
