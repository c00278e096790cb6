"""Evaluation speed: one merged backbone per suite scored on the normal test sets, beside the floor.

For each suite (``text``, ``vision``, ``llm``) it times :meth:`Suite.evaluate` of one backbone on every task's
normal ``test`` split (in-domain and out-of-domain, heads where the suite has them), twice:

- ``cold``: the first backbone the suite sees (tokenization of each split, model load and first-call costs);
- ``warm``: a second backbone (the next grid point of a merge: everything that does not change is reused);

and the **floor**: one plain forward pass of the backbone over the same inputs, without any scoring, in batches of
equal lengths (no padding, no attention mask): ``BertModel(input_ids)`` over the test token ids (text, the suite's
autocast), the network over the preprocessed test images (vision), ``LlamaModel(prompt)`` over every whole prompt
and ``LlamaForCausalLM(dialogue)`` over each dialogue (llm). The target is ``warm / floor ≤ 1.5``.

The backbone is a stand-in for a merge: the base plus seeded noise (std 1e-3 relative to each tensor's std) on every
merged tensor, and seeded random heads, so that no expert has to be trained; evaluation cost does not depend on the
weights' values. Wall time and this process's CPU time (``time.process_time``) are both reported: on a shared
machine the CPU time of a one-thread run is the less contended figure. Each figure is the best of ``--repeat``.

    python benchmarks/eval_speed.py --threads 1 -o benchmarks/results-eval-speed.json
    python benchmarks/eval_speed.py --suites llm --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def _clock(out: dict[str, float]) -> Iterator[None]:
    w, c = time.perf_counter(), time.process_time()
    yield
    out["wall_s"] = time.perf_counter() - w
    out["cpu_s"] = time.process_time() - c


def best_of(repeat: int, fn: Callable[[], Any]) -> dict[str, float]:
    """The smallest wall and CPU time of ``repeat`` calls of ``fn``."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        t: dict[str, float] = {}
        with _clock(t):
            fn()
        best = {k: min(v, best.get(k, v)) for k, v in t.items()}
    return best


def stand_in(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` plus seeded noise of 1e-3 × each floating tensor's std (integer buffers kept)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1:
            out[k] = v + 1e-3 * float(v.float().std()) * torch.randn(v.shape, generator=g).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def random_head(classes: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(classes, dim, generator=g) * 0.05, "bias": torch.zeros(classes)}


def equal_length_groups(seqs: list[list[int]], rows: int = 64) -> list[torch.Tensor]:
    from neuromerge.bench.llm_model import length_buckets

    return [torch.tensor([seqs[i] for i in idx]) for idx in length_buckets([len(s) for s in seqs], rows, 0.0)]


# ------------------------------------------------------------------------------------------------ suites
def run_text(repeat: int) -> dict[str, Any]:
    from neuromerge.bench.text import TextSuite, _config

    suite = TextSuite()
    budget = suite.budget(False)
    tasks = suite.tasks(budget)
    dim = _config().hidden_size
    heads = {t.name: random_head(t.num_classes, dim, i) for i, t in enumerate(tasks)}
    base = suite.backbone_state()
    a, b = stand_in(base, 1), stand_in(base, 2)

    def evaluate(state: dict[str, torch.Tensor]) -> None:
        for t in tasks:
            suite.evaluate(state, heads[t.name], t, "test", budget)

    cold = best_of(1, lambda: evaluate(a))
    warm = best_of(repeat, lambda: (evaluate(b), evaluate(a)))  # two backbones: no state reused between them
    warm = {k: v / 2 for k, v in warm.items()}
    seq_len = int(budget.extra.get("seq_len", 64))
    groups = [g for t in tasks for g in equal_length_groups(suite.tokens(t, "test", seq_len))]
    model = suite._model_with(a)

    @torch.inference_mode()
    def floor() -> None:
        with suite._autocast():
            for g in groups:
                model(input_ids=g)

    return {"tasks": {t.name: len(t.test) for t in tasks}, "tokens": sum(int(g.numel()) for g in groups),
            "bf16_autocast": suite.config.use_bf16(), "cold": cold, "warm": warm, "floor": best_of(repeat, floor)}


def run_vision(repeat: int) -> dict[str, Any]:
    from neuromerge.bench import vision as v

    suite = v.VisionSuite()
    budget = suite.budget(False)
    tasks = suite.tasks(budget)
    heads = {t.name: random_head(t.num_classes, v.FEATURE_DIM, i) for i, t in enumerate(tasks)}
    base = suite.backbone_state()
    a, b = stand_in(base, 1), stand_in(base, 2)

    def evaluate(state: dict[str, torch.Tensor]) -> None:
        for t in tasks:
            suite.evaluate(state, heads[t.name], t, "test", budget)

    cold = best_of(1, lambda: evaluate(a))
    warm = best_of(repeat, lambda: (evaluate(b), evaluate(a)))
    warm = {k: x / 2 for k, x in warm.items()}
    net = suite._network(a).eval()
    images = [v.preprocess(t.test.inputs) for t in tasks]

    @torch.inference_mode()
    def floor() -> None:
        for x in images:
            for i in range(0, x.shape[0], v.EVAL_BATCH):
                net(x[i:i + v.EVAL_BATCH])

    n_bn, bn_batch = v._bn_sample(budget)
    bn_images = [v.subset(t.train, n_bn).inputs for t in tasks]

    def bn() -> None:
        for x in bn_images:
            v.reestimate_bn(net, x, bn_batch)

    return {"tasks": {t.name: len(t.test) for t in tasks}, "images": sum(int(x.shape[0]) for x in images),
            "bn_reestimation_images": sum(int(x.shape[0]) for x in bn_images), "cold": cold, "warm": warm,
            "floor": best_of(repeat, floor), "bn_reestimation": best_of(repeat, bn),
            "note": "evaluate() re-estimates BN statistics on each task's train images before scoring (the "
                    "protocol); the floor is the test forward only, bn_reestimation times that step alone"}


def run_llm(repeat: int) -> dict[str, Any]:
    from neuromerge.bench.llm import LLMSuite

    suite = LLMSuite()
    budget = suite.budget(False)
    tasks = suite.tasks(budget)
    base = suite.backbone_state()
    a, b = stand_in(base, 1), stand_in(base, 2)

    def evaluate(state: dict[str, torch.Tensor]) -> None:
        for t in tasks:
            suite.evaluate(state, None, t, "test", budget)

    cold = best_of(1, lambda: evaluate(a))
    warm = best_of(repeat, lambda: (evaluate(b), evaluate(a)))
    warm = {k: x / 2 for k, x in warm.items()}
    model = suite._load(a)
    prompts, dialogues, prefixes, bodies = [], [], [], []
    for t in tasks:
        if t.metric == "perplexity":
            dialogues += suite.dialogue_tokens(t, "test", budget)
        else:
            enc = suite.encode(t, "test", budget)
            prompts += [enc.prompt(i) for i in range(len(enc.bodies))]
            prefixes.append(torch.tensor([enc.prefix]))
            bodies += enc.bodies
    p_groups, d_groups = equal_length_groups(prompts), equal_length_groups(dialogues, 16)
    b_groups = equal_length_groups(bodies)

    @torch.inference_mode()
    def floor() -> None:
        for g in p_groups:
            model.model(input_ids=g)
        for g in d_groups:
            model(input_ids=g)

    @torch.inference_mode()
    def floor_distinct() -> None:
        for g in prefixes + b_groups:
            model.model(input_ids=g)
        for g in d_groups:
            model(input_ids=g)

    return {"tasks": {t.name: len(t.test) for t in tasks}, "prompt_tokens": sum(len(p) for p in prompts),
            "dialogue_tokens": sum(len(d) for d in dialogues), "cold": cold, "warm": warm,
            "floor": best_of(repeat, floor), "floor_distinct": best_of(repeat, floor_distinct),
            "note": "floor: LlamaModel over every whole prompt (prefix included) + LlamaForCausalLM over each "
                    "dialogue; the scoring runs each task's shared prefix once, so it can beat this floor. "
                    "floor_distinct: the same forward over the distinct tokens only (each task's prefix once, "
                    "then each prompt's own part alone, attending to nothing before it): a lower bound of any "
                    "scoring that reads every prompt"}


RUNNERS = {"text": run_text, "vision": run_vision, "llm": run_llm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="text,vision,llm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("-o", "--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "load_average_start": list(os.getloadavg()), "repeat": args.repeat, "suites": {}}
    for name in args.suites.split(","):
        print(f"{name} …", file=sys.stderr, flush=True)
        r = RUNNERS[name](args.repeat)
        r["warm_over_floor"] = {k: r["warm"][k] / r["floor"][k] for k in ("wall_s", "cpu_s")}
        if "floor_distinct" in r:
            r["warm_over_floor_distinct"] = {k: r["warm"][k] / r["floor_distinct"][k] for k in ("wall_s", "cpu_s")}
        r["load_average_after"] = list(os.getloadavg())
        results["suites"][name] = r
        print(json.dumps({name: r["warm_over_floor"]}), file=sys.stderr, flush=True)
    results["load_average_end"] = list(os.getloadavg())
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
