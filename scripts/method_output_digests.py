"""SHA-256 of the merged output of every registered static method, to show that a refactoring leaves every merge
bitwise unchanged.

A small seeded pool (a Llama-like state dict: embeddings, attention / MLP matrices, norms, one tensor no expert
changes) is merged in memory (:func:`neuromerge.functional.merge_state_dicts`, which takes the engine's fused-kernel
path where the engine would) with every static method under several parameter settings (global and per-tensor
trims, sign rules, variants, per-model values), in float32 and bfloat16, with the native kernels on and off
(``NEUROMERGE_NATIVE=0``, one subprocess per setting of the switch). Each line is ``KEY SHA256``; the digest covers
every output tensor's name, dtype, shape and bytes.

    python scripts/method_output_digests.py                       # print the digests
    python scripts/method_output_digests.py --write FILE          # record them
    python scripts/method_output_digests.py --check FILE          # compare (exit 1 and list the differences)

A static method with no entry in :data:`SETTINGS` is merged with its defaults, so a new method is covered too.
The digests depend on the CPU (torch's vectorised reductions and BLAS) and the torch version: ``--check`` compares
only when the recorded ``# env`` line matches this machine's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: method -> [(label, global parameters, per-model parameters or None)]; methods not listed run with defaults
SETTINGS: dict[str, list[tuple[str, dict[str, Any], list[dict[str, Any]] | None]]] = {
    "linear": [("default", {}, None), ("weights", {}, [{"weight": 0.5}, {"weight": 2.0}, {"weight": -0.25}]),
               ("sum", {"normalize": False}, [{"weight": 0.5}, {"weight": 2.0}, {"weight": 1.0}])],
    "task_arithmetic": [("default", {}, None), ("normalize", {"lambda": 0.7, "normalize": True},
                                                [{"weight": 0.5}, {"weight": 2.0}, {"weight": 1.0}])],
    "ties": [("global", {}, None), ("tensor", {"scope": "tensor", "density": 0.3}, None),
             ("count-positive-sum", {"sign_method": "count", "zero_sign": "positive", "variant": "dis-sum"}, None),
             ("per-model", {"lambda": 0.8}, [{"density": 0.1, "weight": 0.7}, {"density": 1.0}, {"density": 0.4}]),
             ("dense", {"density": 1.0}, None), ("normalize-false", {"normalize": False}, None)],
    "dare_linear": [("default", {}, None), ("per-model", {"normalize": True, "rescale": "none"},
                                            [{"density": 0.3}, {"density": 0.9, "weight": 2.0}, {"density": 1.0}])],
    "dare_ties": [("default", {}, None), ("positive", {"zero_sign": "positive", "density": 0.7}, None)],
    "breadcrumbs": [("default", {}, None), ("per-model", {"normalize": True},
                                            [{"density": 0.5, "gamma": 0.1}, {"density": 0.8}, {"gamma": 0.0}])],
    "breadcrumbs_ties": [("default", {}, None), ("dis-sum", {"variant": "dis-sum", "density": 0.6}, None)],
    "neuromerging": [("default", {}, None), ("tensor", {"scope": "tensor"}, None),
                     ("lambdas", {"lambda1": 0.5, "lambda2": 0.8, "parallel_reconstruction": "official",
                                  "cum_threshold": 0.9, "sign_method": "count"}, None),
                     ("per-model", {}, [{"density": 0.1}, {"density": 0.5, "weight": 0.5}, {"density": 1.0}])],
    "consensus": [("default", {}, None), ("k1", {"k": 1, "tall_lambda": 0.4, "lambda": 1.0}, None)],
    "pcb": [("default", {}, None), ("dense", {"density": 0.5, "lambda": 0.5}, None)],
    "tsv": [("default", {}, None), ("lam", {"lambda": 0.5}, None)],
    "model_stock": [("default", {}, None), ("filter-wise", {"filter_wise": True}, None)],
    "slerp": [("default", {}, None), ("t", {"t": 0.2}, None)],
    "nearswap": [("default", {}, None), ("t", {"t": 0.05}, None)],
    "della": [("default", {}, None), ("drop", {"density": 0.5, "epsilon": 0.1}, None),
              ("inverse", {"density": 0.5, "rescale": "inverse"}, None)],
    "della_linear": [("default", {}, None), ("drop", {"density": 0.5, "epsilon": 0.1}, None)],
}


def pool(dtype: torch.dtype, n_models: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A seeded base and ``n_models`` experts (Llama-like names; ``model.norm.weight`` unchanged by every expert)."""
    g = torch.Generator().manual_seed(1234)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32, 16), "lm_head.weight": (32, 16),
                                          "model.norm.weight": (16,)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (16, 16),
                   f"model.layers.{i}.mlp.up_proj.weight": (24, 16),
                   f"model.layers.{i}.mlp.down_proj.weight": (16, 24),
                   f"model.layers.{i}.input_layernorm.weight": (16,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = []
    for t in range(n_models):
        scale = 0.02 * (t + 1)
        m = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        m["model.norm.weight"] = base["model.norm.weight"].clone()
        if t == 1:  # a few exact zeros of the task vector and a sign-conflicting row
            m["model.layers.0.mlp.up_proj.weight"][0] = base["model.layers.0.mlp.up_proj.weight"][0]
            m["model.layers.1.self_attn.q_proj.weight"][2] = -models[0]["model.layers.1.self_attn.q_proj.weight"][2]
        models.append(m)
    return ({k: v.to(dtype) for k, v in base.items()}, [{k: v.to(dtype) for k, v in m.items()} for m in models])


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors sorted by name: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def static_methods() -> list[str]:
    from neuromerge.methods import available

    return [n for n, cls in available().items() if not getattr(cls, "data_aware", False)]


def digests() -> Iterator[tuple[str, str]]:
    """``(key, sha256)`` for every static method, setting and dtype, under this process's native switch."""
    from neuromerge import kernels
    from neuromerge.functional import merge_state_dicts

    native = "native" if kernels.available() else "torch"
    for name in static_methods():
        from neuromerge.methods import get

        cls = get(name)
        n_models = min(3, cls.max_models or 3)
        for label, params, per_model in SETTINGS.get(name, [("default", {}, None)]):
            for dtype in (torch.float32, torch.bfloat16):
                base, models = pool(dtype, max(n_models, cls.min_models))
                models = models[:max(n_models, cls.min_models)]
                pm = per_model[:len(models)] if per_model is not None else None
                out = merge_state_dicts(name, base, models, parameters=params, model_parameters=pm, seed=7)
                yield f"{name}:{label}:{str(dtype).removeprefix('torch.')}:{native}", digest(out)


def environment() -> str:
    return f"# env torch={torch.__version__} cpu={torch.backends.cpu.get_cpu_capability()}"


def collect() -> list[str]:
    """Every digest line, native kernels on and off (one subprocess each)."""
    lines = [environment()]
    for switch in ("1", "0"):
        env = {**os.environ, "NEUROMERGE_NATIVE": switch}
        res = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"digests with NEUROMERGE_NATIVE={switch} failed:\n{res.stderr}")
        lines += res.stdout.splitlines()
    return lines


def compare(recorded: list[str], now: list[str]) -> list[str]:
    """The differences between two digest listings (missing, new or changed keys)."""
    old = dict(line.split(" ", 1) for line in recorded if line and not line.startswith("#"))
    new = dict(line.split(" ", 1) for line in now if line and not line.startswith("#"))
    out = [f"changed {k}" for k in old if k in new and new[k] != old[k]]
    out += [f"missing {k}" for k in old if k not in new] + [f"new {k}" for k in new if k not in old]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", action="store_true", help="this process's native switch only (internal)")
    p.add_argument("--write", type=Path, help="write the digests to this file")
    p.add_argument("--check", type=Path, help="compare with the digests recorded in this file")
    args = p.parse_args(argv)
    if args.one:
        for key, sha in digests():
            print(key, sha)
        return 0
    lines = collect()
    if args.write:
        args.write.write_text("\n".join(lines) + "\n")
    if args.check:
        recorded = args.check.read_text().splitlines()
        if recorded[0] != lines[0]:
            print(f"recorded on another machine ({recorded[0]!r}, here {lines[0]!r}): not comparable")
            return 2
        diff = compare(recorded, lines)
        print("\n".join(diff) if diff else f"all {len(lines) - 1} digests unchanged")
        return 1 if diff else 0
    if not args.write:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
