"""Routed-model runtime speed and memory: a routed model vs one merged model vs an ensemble of T expert models.

Prints ONE JSON object to stdout (progress goes to stderr); ``--out FILE`` also writes it to FILE.

Setup (no download, everything from seeded generators): a BERT-like encoder built locally from a
``transformers.BertConfig`` (default hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522: the shape of
MiniLM-L6) and T LoRA-style low-rank experts (default T = 5, rank 8) on ``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` of every layer (A ~ N(0, 1/in),
B ~ N(0, 0.02²/r)). The router is a :class:`neuromerge.routing.Router` (3-layer MLP, seeded init) whose input
standardization is set from a calibration batch, so that different inputs pick different experts.

Measured (fp32, eval mode, ``torch.no_grad()``, ``torch.set_num_threads(--threads)``, inputs of ``--seq`` random
token ids with an all-ones attention mask):

1. latency (ms, median over ``--repeats`` timed calls after ``--warmup`` untimed ones; batch 1 gets 4× the repeats;
   the models take turns within each repeat, so background load hits all of them alike) at each ``--batch-sizes``
   (default 1 and 32), and throughput (inputs/s = batch / median latency), for
   a. ``routed_embeddings`` — :class:`RoutedModel` with ``TopKGates(k=2)``, router features = the mean-pooled
      output of the ``embeddings`` module (a forward hook: no extra pass);
   b. ``routed_final`` — the same with ``feature_fn=final_hidden_mean`` (one full extra pass of the base);
   c. ``merged`` — a plain BertModel whose weights are ``W0 + mean_j B_j A_j``;
   d. ``ensemble`` — T plain BertModels (``W0 + B_j A_j`` each); every input goes through all T, the last hidden
      states are averaged.
2. memory, each in a fresh child process (so the numbers do not add up across builds): RSS after the imports and
   one forward of a throw-away tiny BERT (``baseline``), after building, after one forward at the largest batch
   size, and the peak (``VmHWM``), for
   (i) ``base`` alone, (ii) ``routed`` (base + routed adapters + router), (iii) ``ensemble`` (T full models); and the
   exact tensor bytes (parameters + buffers, each storage counted once) of the base, the routed model (with its
   parts: base tensors, ``lora_A``/``lora_B``, ``dense_delta``, router), the T models, the
   expert factors and the router.

Targets (``targets`` in the output; timing targets are checked here only, never in the test suite):

(each timing target's ``value`` uses the medians; ``value_from_min_ms``, the same ratio from the fastest calls, is
shown next to it: on a busy machine it is the steadier of the two)

* ``latency_b{B}_routed_embeddings/merged`` ≤ 1.3 for each batch size B;
* ``throughput_b{B}_routed_embeddings/ensemble`` ≥ T/2 for each batch size B (``routed_final`` is reported too,
  as ``throughput_b{B}_routed_final/ensemble``);
* ``routed_tensor_bytes`` ≤ base + expert factor + router bytes (strict: every tensor of the routed model counts),
  and ``routed_no_dense_delta``: the routed model stores no
  dense ΔW (``dense_delta`` is empty and the bytes above that budget, if any, are fewer than one dense ΔW of the
  smallest routed layer). RSS is reported next to it (``memory``), not checked.

    python benchmarks/routed_speed.py --threads 1              # the reference run (~1.5 min on 2 cores)
    python benchmarks/routed_speed.py --quick                  # a quick check (hidden 128, 2 layers, < 30 s)
    python benchmarks/routed_speed.py --hidden 768 --layers 12 # a BERT-base shape
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from neuromerge.routing import LowRankExpert, RoutedModel, Router

#: the linear modules of every BERT layer that carry experts
TARGET_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense")
LATENCY_MAX_RATIO = 1.3
MODELS = ("routed_embeddings", "routed_final", "merged", "ensemble")


@dataclass(frozen=True)
class Setup:
    """Model, expert and input shapes."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    experts: int
    rank: int
    seq: int
    seed: int

    def bert_config(self) -> Any:
        import transformers as tf

        return tf.BertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                             num_attention_heads=self.heads, intermediate_size=self.intermediate,
                             max_position_embeddings=max(512, self.seq))


def setup_from_args(args: argparse.Namespace) -> Setup:
    if args.quick:
        return Setup(hidden=128, layers=2, heads=4, intermediate=512, vocab=4000, experts=args.experts,
                     rank=args.rank, seq=32, seed=args.seed)
    heads = args.heads or max(1, args.hidden // 32)
    return Setup(hidden=args.hidden, layers=args.layers, heads=heads, intermediate=args.intermediate or 4 * args.hidden,
                 vocab=args.vocab, experts=args.experts, rank=args.rank, seq=args.seq, seed=args.seed)


# ------------------------------------------------------------------------------------------------ building
def build_base(s: Setup) -> nn.Module:
    """The base encoder (transformers' own init under ``torch.manual_seed(seed)``), eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(s.seed)
    return tf.BertModel(s.bert_config(), add_pooling_layer=False).eval()


def module_names(s: Setup) -> list[str]:
    return [f"encoder.layer.{i}.{m}" for i in range(s.layers) for m in TARGET_MODULES]


def build_experts(base: nn.Module, s: Setup) -> list[LowRankExpert]:
    """T low-rank experts: ``A (r, in) ~ N(0, 1/in)``, ``B (out, r) ~ N(0, 0.02²/r)`` from seeded generators."""
    import torch

    from neuromerge.routing import LowRankExpert

    experts = []
    for j in range(s.experts):
        g = torch.Generator().manual_seed(s.seed * 1000 + j + 1)
        factors = {}
        for name in module_names(s):
            lin = base.get_submodule(name)
            a = torch.randn(s.rank, lin.in_features, generator=g) / math.sqrt(lin.in_features)
            b = torch.randn(lin.out_features, s.rank, generator=g) * (0.02 / math.sqrt(s.rank))
            factors[name] = (a, b)
        experts.append(LowRankExpert(f"expert{j}", factors))
    return experts


def with_deltas(base: nn.Module, experts: list[LowRankExpert], weights: list[float]) -> nn.Module:
    """A copy of ``base`` with ``W0 + Σ_j w_j B_j A_j`` written into its weights (a plain model)."""
    import torch

    out = copy.deepcopy(base)
    with torch.no_grad():
        for e, w in zip(experts, weights, strict=True):
            if w == 0:
                continue
            for name in e.modules():
                out.get_submodule(name).weight.add_(e.delta(name), alpha=w)
    return out.eval()


def make_inputs(s: Setup, batch: int, seed: int) -> dict[str, torch.Tensor]:
    import torch

    ids = torch.randint(0, s.vocab, (batch, s.seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_router(s: Setup) -> Router:
    import torch

    from neuromerge.routing import Router

    return Router(s.hidden, s.experts, generator=torch.Generator().manual_seed(s.seed + 7)).eval()


def build_routed(base: nn.Module, experts: list[LowRankExpert], s: Setup, source: str) -> RoutedModel:
    """``RoutedModel`` (top-2 gates) on ``base`` (modified in place); the router's standardization comes from the
    features of a 64-input calibration batch, so routing differs between inputs."""
    import torch

    from neuromerge.routing import RoutedModel, TopKGates
    from neuromerge.routing.runtime import final_hidden_mean, pool_features

    router = build_router(s)
    calib = make_inputs(s, 64, s.seed + 99)
    with torch.no_grad():
        if source == "embeddings":
            feats = pool_features(base.embeddings(input_ids=calib["input_ids"]), calib["attention_mask"])
        else:
            feats = final_hidden_mean(base, calib)
    router.set_standardization(feats)
    feature = {"feature_module": "embeddings"} if source == "embeddings" else {
        "feature_module": None, "feature_fn": final_hidden_mean}
    return RoutedModel(base, experts, router=router, policy=TopKGates(k=2), **feature).eval()


# ------------------------------------------------------------------------------------------------- bytes
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def module_bytes(*modules: nn.Module) -> int:
    """Parameter + buffer bytes of ``modules`` together (shared storages once)."""
    return tensor_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def routed_breakdown(routed: RoutedModel) -> dict[str, int]:
    """The routed model's tensor bytes by part (``total``: all of them, each storage once)."""
    from neuromerge.routing import RoutedLinear

    layers = [m for m in routed.modules() if isinstance(m, RoutedLinear)]
    extra = {id(t) for m in layers for t in (m.lora_A, m.lora_B, m.dense_delta)}
    router_ids = {id(t) for t in (*routed.router.parameters(), *routed.router.buffers())}
    base_t = [t for t in (*routed.base.parameters(), *routed.base.buffers()) if id(t) not in extra | router_ids]
    return {
        "total": module_bytes(routed),
        "base_tensors": tensor_bytes(base_t),
        "lora_A_B": tensor_bytes(t for m in layers for t in (m.lora_A, m.lora_B)),
        "dense_delta": tensor_bytes(m.dense_delta for m in layers),
        "router": module_bytes(routed.router),
    }


def factor_bytes(experts: list[LowRankExpert]) -> int:
    return tensor_bytes(t for e in experts for t in e.tensors().values())


# ---------------------------------------------------------------------------------------------- memory
def release_free_heap() -> bool:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``, so that freed temporaries (expert factors before they
    are concatenated, calibration activations) leave the RSS; False where there is no glibc."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def peak_rss_mb() -> float:
    """Peak RSS of this process: ``VmHWM`` (``ru_maxrss`` would include the forking parent's RSS, which Linux
    carries across ``exec``); ``ru_maxrss`` where ``/proc`` is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def memory_child(kind: str, s: Setup, batch: int, threads: int) -> dict[str, Any]:
    """Build one configuration in this (fresh) process and report its RSS and tensor bytes."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline is taken)

    import neuromerge.routing.runtime  # noqa: F401

    torch.set_num_threads(threads)
    # load transformers' lazy BERT modules and torch's kernels with a throw-away tiny model, so the baseline
    # holds everything but the model itself
    tiny = Setup(hidden=32, layers=1, heads=2, intermediate=64, vocab=100, experts=1, rank=1, seq=s.seq, seed=0)
    with torch.no_grad():
        build_base(tiny)(**make_inputs(tiny, batch, 0))
    trimmed = release_free_heap()
    out: dict[str, Any] = {"kind": kind, "malloc_trim": trimmed, "baseline_rss_mb": rss_mb()}
    base = build_base(s)
    if kind == "base":
        model: Any = base
        out["tensor_bytes"] = module_bytes(base)
    elif kind == "routed":
        experts = build_experts(base, s)
        model = build_routed(base, experts, s, "embeddings")
        del experts  # the routed layers hold their own concatenated copies
        out["tensor_bytes"] = module_bytes(model)
    elif kind == "ensemble":
        experts = build_experts(base, s)
        models = [with_deltas(base, experts, [float(i == j) for i in range(s.experts)]) for j in range(s.experts)]
        del base, experts
        model = models
        out["tensor_bytes"] = module_bytes(*models)
    else:
        raise ValueError(kind)
    release_free_heap()
    out["rss_after_build_mb"] = rss_mb()
    inputs = make_inputs(s, batch, s.seed + 1)
    with torch.no_grad():
        if isinstance(model, list):
            for m in model:
                m(**inputs)
        else:
            model(**inputs)
    release_free_heap()
    out["rss_after_forward_mb"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    out["model_rss_mb"] = round(out["rss_after_build_mb"] - out["baseline_rss_mb"], 1)
    return out


def start_memory_child(kind: str, args: argparse.Namespace, batch: int) -> subprocess.Popen[str]:
    """Start ``--memory-child kind`` (a fresh interpreter: its RSS holds only its own imports and models)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", kind, "--threads", str(args.threads),
           "--batch-sizes", str(batch), "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--heads", str(args.heads), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
           "--experts", str(args.experts), "--rank", str(args.rank), "--seq", str(args.seq), "--seed", str(args.seed),
           *(["--quick"] if args.quick else [])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_memory_child(kind: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {kind!r} failed (exit {proc.returncode}): {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- timing
def time_models(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function; the functions take turns within each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize_times(times: list[float], batch: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"median_ms": round(med * 1e3, 3), "min_ms": round(min(times) * 1e3, 3),
            "max_ms": round(max(times) * 1e3, 3), "throughput_per_s": round(batch / med, 3), "n": len(times)}


def active_experts(routed: RoutedModel) -> int:
    """Experts with a non-zero top-2 gate for at least one input of the last routed batch."""
    assert routed.last_probs is not None
    return int(routed.policy.gates(routed.last_probs, "").ne(0).any(dim=0).sum())


# -------------------------------------------------------------------------------------------------- main
def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else math.inf


def targets(latency: dict[str, dict[str, dict[str, Any]]], bytes_: dict[str, Any], s: Setup) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b, runs in latency.items():
        v = ratio(runs["routed_embeddings"]["median_ms"], runs["merged"]["median_ms"])
        out[f"latency_b{b}_routed_embeddings/merged"] = {
            "value": v, "max": LATENCY_MAX_RATIO, "met": v <= LATENCY_MAX_RATIO,
            "value_from_min_ms": ratio(runs["routed_embeddings"]["min_ms"], runs["merged"]["min_ms"])}
        for src in ("routed_embeddings", "routed_final"):
            v = ratio(runs[src]["throughput_per_s"], runs["ensemble"]["throughput_per_s"])
            out[f"throughput_b{b}_{src}/ensemble"] = {
                "value": v, "min": s.experts / 2, "met": v >= s.experts / 2,
                "value_from_min_ms": ratio(runs["ensemble"]["min_ms"], runs[src]["min_ms"])}
    budget = bytes_["base"] + bytes_["expert_factors"] + bytes_["router"]
    routed = bytes_["routed"]
    out["routed_tensor_bytes"] = {"value": routed["total"], "max": budget, "met": routed["total"] <= budget,
                                  "excess_bytes": routed["total"] - budget}
    smallest_delta = min(s.hidden * s.hidden, s.hidden * s.intermediate) * 4
    excess = routed["total"] - budget
    out["routed_no_dense_delta"] = {
        "dense_delta_bytes": routed["dense_delta"], "excess_bytes": excess,
        "smallest_dense_delta_bytes": smallest_delta,
        "met": routed["dense_delta"] == 0 and excess < smallest_delta,
    }
    return out


def measure_speed(s: Setup, batches: list[int], repeats: int, warmup: int,
                  children: dict[str, subprocess.Popen[str]]) -> dict[str, Any]:
    """Build the four models and check them, collect the memory ``children``, then time the models; returns
    ``latency``, ``routing``, ``bytes``, ``memory`` and more."""
    import torch

    from neuromerge.routing import SoftGates
    from neuromerge.routing.runtime import RoutedLinear

    base = build_base(s)
    experts = build_experts(base, s)
    merged = with_deltas(base, experts, [1.0 / s.experts] * s.experts)
    ensemble = [with_deltas(base, experts, [float(i == j) for i in range(s.experts)]) for j in range(s.experts)]
    routed = {src: build_routed(copy.deepcopy(base), experts, s, src) for src in ("embeddings", "final")}
    n_routed = sum(isinstance(m, RoutedLinear) for m in routed["embeddings"].modules())
    assert n_routed == len(module_names(s)), n_routed
    bytes_ = {
        "base": module_bytes(base), "merged": module_bytes(merged), "ensemble": module_bytes(*ensemble),
        "expert_factors": factor_bytes(experts), "router": module_bytes(routed["embeddings"].router),
        "routed": routed_breakdown(routed["embeddings"]),
    }

    # sanity: equal soft gates 1/T on the routed model = the merged model (W0 + mean ΔW), up to float error
    x = make_inputs(s, 2, s.seed + 3)
    check = routed["embeddings"]
    saved, check.policy = check.policy, SoftGates()
    try:
        with torch.no_grad(), check.force(torch.full((1, s.experts), 1.0 / s.experts)):
            diff = float((check(**x).last_hidden_state - merged(**x).last_hidden_state).abs().max())
    finally:
        check.policy = saved

    memory = {}
    for kind, proc in children.items():
        log(f"waiting for the memory child {kind!r}")
        memory[kind] = finish_memory_child(kind, proc)

    def ensemble_mean(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([m(**inputs).last_hidden_state for m in ensemble]).mean(dim=0)

    latency: dict[str, dict[str, dict[str, Any]]] = {}
    routing: dict[str, dict[str, int]] = {}
    for b in batches:
        inputs = make_inputs(s, b, s.seed + 1)
        fns: dict[str, Callable[[], Any]] = {
            "routed_embeddings": lambda inputs=inputs: routed["embeddings"](**inputs).last_hidden_state,
            "routed_final": lambda inputs=inputs: routed["final"](**inputs).last_hidden_state,
            "merged": lambda inputs=inputs: merged(**inputs).last_hidden_state,
            "ensemble": lambda inputs=inputs: ensemble_mean(inputs),
        }
        n = repeats * 4 if b == 1 else repeats
        log(f"batch {b}: {warmup} warm-up + {n} timed calls of each of {', '.join(fns)}")
        with torch.no_grad():
            times = time_models(fns, n, warmup)
        latency[str(b)] = {k: summarize_times(v, b) for k, v in times.items()}
        routing[str(b)] = {src: active_experts(m) for src, m in routed.items()}
        log(f"batch {b}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in latency[str(b)].items()))
    return {"params": sum(p.numel() for p in base.parameters()), "routed_layers": n_routed, "bytes": bytes_,
            "sanity_diff": diff, "latency": latency, "routing": routing, "memory": memory}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[routed-speed {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = setup_from_args(args)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    t_start = time.perf_counter()
    log(f"setup: {asdict(s)}")
    # memory: one fresh child process per configuration, started now (before this process imports torch or builds
    # anything) and run side by side; all of them end before any timing starts
    children = {} if args.skip_memory else {k: start_memory_child(k, args, max(batches))
                                            for k in ("base", "routed", "ensemble")}

    import torch

    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    warmup = 1 if args.quick else args.warmup
    torch.set_num_threads(args.threads)
    speed = measure_speed(s, batches, repeats, warmup, children)
    bytes_ = speed["bytes"]
    memory: dict[str, Any] = speed["memory"]
    if memory:
        memory["routed_minus_base_rss_mb"] = round(memory["routed"]["model_rss_mb"] - memory["base"]["model_rss_mb"],
                                                   1)
        memory["expert_factors_plus_router_mb"] = round((bytes_["expert_factors"] + bytes_["router"]) / 2**20, 1)
    log("done")

    return {
        "setup": {**asdict(s), "params_per_model": speed["params"], "target_modules": list(TARGET_MODULES),
                  "routed_layers": speed["routed_layers"], "policy": "TopKGates(k=2)", "dtype": "float32"},
        "threads": args.threads, "repeats": repeats, "repeats_batch1": repeats * 4, "warmup": warmup,
        "quick": args.quick, "cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(), "versions": _versions(),
        "sanity_forced_mean_vs_merged_max_abs_diff": speed["sanity_diff"],
        "latency": speed["latency"],
        "routing_active_experts": speed["routing"],
        "tensor_bytes": bytes_,
        "memory": memory,
        "targets": targets(speed["latency"], bytes_, s),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("neuromerge", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384, help="hidden size (default 384, MiniLM-L6)")
    ap.add_argument("--layers", type=int, default=6, help="encoder layers")
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 32)")
    ap.add_argument("--intermediate", type=int, default=0, help="intermediate size (0: 4 × hidden)")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--experts", type=int, default=5, help="T, the number of experts")
    ap.add_argument("--rank", type=int, default=8, help="rank of every expert's factors")
    ap.add_argument("--seq", type=int, default=64, help="sequence length")
    ap.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per model and batch size (default 7, "
                                                              "--quick 2; batch 1 gets 4×)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per model first (--quick: 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, vocab 4000, seq 32, 2 repeats")
    ap.add_argument("--skip-memory", action="store_true", help="no memory child processes")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--memory-child", choices=("base", "routed", "ensemble"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        batch = max(int(b) for b in args.batch_sizes.split(",") if b.strip())
        print(json.dumps(memory_child(args.memory_child, setup_from_args(args), batch, args.threads)))
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
