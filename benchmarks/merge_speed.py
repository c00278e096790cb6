"""Merge speed and peak memory: neuromerge vs mergekit vs the read+write floor, on a synthetic Llama family.

Prints ONE JSON object to stdout (progress goes to stderr). See benchmarks/README.md for the targets.

The floor run right after another tool's run is often 2-3× slower than the floor run after a floor run (its write
phase: 0.15 s or up to 1.6 s, a state of this machine's kernel that `os.sync()` does not clear). The targets use the
floor measured in the round-robin, like every tool; ``--floor-extra`` more floor runs back to back give
``floor_best`` and the ratios ``ours_*/floor_best`` as well (no target), so that the reader sees both.

The family (a base + 3 experts, bf16, Llama architecture) is written once under ``--workdir`` straight to
safetensors shards, one tensor at a time from seeded generators, without building a transformers model; it is
reused when present. Each measured run is a separate child process: wall time is the best of ``--repeat``,
peak RSS is ``ru_maxrss`` from ``os.wait4`` of that child (the largest over the repeats is reported). The repeats go
round-robin over the runs, so a slow spell of a shared machine is spread over all of them.

    python benchmarks/merge_speed.py                      # ~334M params per model (hidden 1024, 16 layers)
    python benchmarks/merge_speed.py --hidden 2048        # the "double" variant (~1.2B params)
    python benchmarks/merge_speed.py --small --repeat 1   # a quick check (hidden 256, 4 layers, vocab 4000)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

N_EXPERTS = 3
SHARD_BYTES = 10**9
#: std of the base weights, of the experts' noise, share and factor of the larger noise entries
BASE_STD = 0.02
NOISE_STD = 0.002
OUTLIER_SHARE = 0.05
OUTLIER_FACTOR = 10.0
BLOCK = 64 * 2**20
OUR_METHODS = ("ta", "ties", "neuromerging", "passthrough")
#: runs available with ``--methods`` beyond the default ones (no target in benchmarks/README.md: informational ratios)
EXTRA_METHODS = ("della",)
#: DELLA's row: mergekit's defaults (``rescale: true`` = L1, ``normalize: true``, λ 1) with a real drop
DELLA_PARAMS = {"density": 0.5, "epsilon": 0.15}


# ------------------------------------------------------------------------------------------ the model family
@dataclass(frozen=True)
class Arch:
    """A Llama-architecture shape: untied embeddings, no GQA (``num_key_value_heads = heads``)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}"

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every weight, in HF order."""
        h, i = self.hidden, self.intermediate
        yield "model.embed_tokens.weight", (self.vocab, h)
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            yield p + "input_layernorm.weight", (h,)
            for proj in ("q", "k", "v", "o"):
                yield p + f"self_attn.{proj}_proj.weight", (h, h)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def hf_config(self) -> dict[str, Any]:
        """A valid ``LlamaConfig`` dict."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "initializer_range": BASE_STD, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "use_cache": True, "torch_dtype": "bfloat16",
        }


def arch_from_args(hidden: int, small: bool) -> Arch:
    if small:
        return Arch(hidden=256, layers=4, intermediate=1024, vocab=4000, heads=4)
    return Arch(hidden=hidden, layers=16, intermediate=4 * hidden, vocab=32000, heads=max(1, hidden // 64))


def _generator(model: str, name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{model}/{name}".encode()))


def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Norm weights ``1 + N(0, 0.02)``, matrices ``N(0, 0.02)`` (fp32)."""
    import torch

    x = torch.randn(shape, generator=_generator("base", name)) * BASE_STD
    return x + 1.0 if len(shape) == 1 else x


def expert_tensor(base: torch.Tensor, expert: int, name: str) -> torch.Tensor:
    """``θ0 + ε``, ``ε ~ N(0, 0.002)`` with ~5 % of the entries 10× larger (so trimming matters)."""
    import torch

    g = _generator(f"expert{expert}", name)
    noise = torch.randn(base.shape, generator=g) * NOISE_STD
    big = torch.rand(base.shape, generator=g) < OUTLIER_SHARE
    return base + torch.where(big, noise * OUTLIER_FACTOR, noise)


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor: the header (known from the shapes) first, then each
    tensor's bytes as it is produced, so only one tensor is in memory at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16",
                 itemsize: int = 2):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in entries:
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._order = [name for name, _ in entries]
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        assert self._order[self._next] == name, (self._order[self._next], name)
        self._file.write(tensor.contiguous().view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self._order), "not every tensor was written"
        self._file.close()


def shard_plan(arch: Arch, max_bytes: int | None = None) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped in order into shards of at most ``max_bytes`` (default ``SHARD_BYTES``) bf16 bytes (a
    bigger tensor alone)."""
    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in arch.tensors():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def family_dirs(root: Path) -> list[Path]:
    return [root / m for m in ("base", *(f"expert{i}" for i in range(N_EXPERTS)))]


def family_ready(root: Path, arch: Arch) -> bool:
    marker = root / "complete.json"
    return marker.is_file() and json.loads(marker.read_text()).get("arch") == asdict(arch)


def build_family(root: Path, arch: Arch) -> None:
    """Write ``root/base`` and ``root/expert{0,1,2}`` (bf16 shards of at most 1 GB); ``root/complete.json``
    marks a finished build. Needs torch; :func:`main` runs it in a child process so that the measuring
    process stays small (a forked child starts with its parent's RSS, which ``ru_maxrss`` would count)."""
    import torch

    dirs = family_dirs(root)
    shutil.rmtree(root, ignore_errors=True)
    shards = shard_plan(arch)
    files = shard_names(len(shards))
    t0 = time.perf_counter()
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(arch.hf_config(), indent=2))
        if len(shards) > 1:
            weight_map = {name: files[i] for i, shard in enumerate(shards) for name, _ in shard}
            index = {"metadata": {"total_size": 2 * arch.n_params}, "weight_map": weight_map}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for entries, file in zip(shards, files, strict=True):
        writers = [SafetensorsStreamWriter(d / file, entries) for d in dirs]
        for name, shape in entries:
            base = base_tensor(name, shape)
            writers[0].write(name, base.to(torch.bfloat16))
            for e in range(N_EXPERTS):
                writers[e + 1].write(name, expert_tensor(base, e, name).to(torch.bfloat16))
        for w in writers:
            w.close()
    marker = root / "complete.json"
    marker.write_text(json.dumps({"arch": asdict(arch), "build_s": round(time.perf_counter() - t0, 1)}))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- the runs
def _models(experts: list[Path], **params: float) -> list[dict[str, Any]]:
    return [{"model": str(e), "parameters": {"weight": 1.0, **params}} for e in experts]


def frankenmerge(experts: list[Path], layers: int) -> list[dict[str, Any]]:
    """The ``passthrough`` slice merge: expert 0's first ¾ of the layers, then expert 1's last ¾ (a depth-upscaled
    stack of 1.5× the layers, SOLAR's recipe across two models)."""
    cut = 3 * layers // 4
    return [{"sources": [{"model": str(experts[0]), "layer_range": [0, cut]}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [layers - cut, layers]}]}]


def configs(base: Path, experts: list[Path], methods: list[str], mergekit: bool,
            layers: int = 16) -> dict[str, dict[str, Any]]:
    """Merge configs by run name. Ours: TA (λ 0.3), TIES (global trim, density 0.2), NeuroMerging (density
    0.2), a ``passthrough`` slice merge (:func:`frankenmerge`), DELLA (density 0.5, ε 0.15, mergekit's defaults
    otherwise; with ``--methods …,della``); mergekit: TA (λ 0.3), per-tensor TIES (density 0.2), the same slice merge
    and the same DELLA config. Output bf16, 1 GB shards."""
    common = {"base_model": str(base), "dtype": "bfloat16"}
    sliced = {"merge_method": "passthrough", "slices": frankenmerge(experts, layers)}
    ours = {
        "ta": {"merge_method": "task_arithmetic", "models": _models(experts), "parameters": {"lambda": 0.3}},
        "ties": {"merge_method": "ties", "models": _models(experts, density=0.2),
                 "parameters": {"scope": "global", "lambda": 1.0}},
        "neuromerging": {"merge_method": "neuromerging", "models": _models(experts, density=0.2)},
        "passthrough": sliced,
        "della": {"merge_method": "della", "models": _models(experts, **DELLA_PARAMS)},
    }
    theirs = {
        "ta": {"merge_method": "task_arithmetic", "models": _models(experts), "parameters": {"lambda": 0.3}},
        "ties": {"merge_method": "ties", "models": _models(experts, density=0.2),
                 "parameters": {"normalize": True, "lambda": 1.0}},
        "passthrough": sliced,
        "della": {"merge_method": "della", "models": _models(experts, **DELLA_PARAMS)},
    }

    def with_common(m: str, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**({"dtype": "bfloat16"} if m == "passthrough" else common), **cfg}  # slices: no base model

    out = {f"ours_{m}": {**with_common(m, ours[m]), "shard_size": SHARD_BYTES} for m in methods}
    if mergekit:
        out.update({f"mergekit_{m}": with_common(m, theirs[m]) for m in methods if m in theirs})
    return out


FLOOR_CODE = """
import sys
block, out_bytes, out, inputs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
buf = bytearray(block)
view = memoryview(buf)
for path in inputs:
    with open(path, "rb") as f:
        while f.readinto(buf):
            pass
with open(out, "wb") as f:
    left = out_bytes
    while left > 0:
        n = min(block, left)
        f.write(view[:n])
        left -= n
"""


def commands(name: str, config_path: Path | None, out: Path, threads: int, inputs: list[Path],
             out_bytes: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if name.startswith("ours_"):
        return [str(bin_dir / "neuromerge"), "merge", str(config_path), "-o", str(out), "--threads", str(threads),
                "--force", "--no-progress"]
    if name.startswith("mergekit_"):
        return [str(bin_dir / "mergekit-yaml"), str(config_path), str(out), "--device", "cpu", "--num-threads",
                str(threads), "--out-shard-size", str(SHARD_BYTES), "--no-copy-tokenizer", "--quiet"]
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    return [sys.executable, "-c", FLOOR_CODE, str(BLOCK), str(out_bytes), str(out / "floor.bin"), *files]


def child_env() -> dict[str, str]:
    """The environment of the measured runs: this one without ``PYTHONDONTWRITEBYTECODE``, so that a package
    installed in editable mode (ours, in a development checkout) gets its bytecode cached by the first run like
    any installed package (mergekit's was compiled by pip at install); with the variable set, every run would
    recompile our sources (~70 ms)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(cmd: list[str], out: Path, make_out: bool = False) -> tuple[float, int] | str:
    """One run of ``cmd`` as a child process: (wall seconds, peak RSS in KiB from ``os.wait4``), or the stderr tail
    of a failing run. ``out`` is removed before (created empty when ``make_out``) and after the run, and dirty pages
    are flushed (``os.sync``, not timed) before it starts, so that no run starts while an earlier one's output is
    still being written back. (That does not remove the slow floor after another tool's run: see the module doc.)"""
    shutil.rmtree(out, ignore_errors=True)
    if make_out:
        out.mkdir(parents=True)
    os.sync()  # no run starts while the kernel still writes back an earlier run's output
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        assert proc.stderr is not None
        with proc.stderr:
            err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            return f"exit {code}: " + err.decode(errors="replace")[-2000:]
        return wall, usage.ru_maxrss
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(cmds: dict[str, tuple[list[str], Path, bool]], repeat: int) -> dict[str, dict[str, Any]]:
    """Best wall time over ``repeat`` runs of each command and its peak RSS (the largest over the repeats). The
    repeats go round-robin over the commands (round 1 runs every command once, then round 2, …), so that a slow
    or fast spell of this shared machine does not fall on one tool's runs only. A failing command gives
    ``{"error": <stderr tail>}`` and is not run again."""
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    rss: dict[str, int] = dict.fromkeys(cmds, 0)
    errors: dict[str, str] = {}
    for round_ in range(repeat):
        for name, (cmd, out, make_out) in cmds.items():
            if name in errors:
                continue
            got = run_once(cmd, out, make_out)
            if isinstance(got, str):
                errors[name] = got
                print(f"[bench] {name} failed: {got[-300:]}", file=sys.stderr)
                continue
            walls[name].append(got[0])
            rss[name] = max(rss[name], got[1])
            print(f"[bench] round {round_ + 1}/{repeat} {name}: {got[0]:.3f} s", file=sys.stderr)
    return {
        name: {"error": errors[name]} if name in errors else {
            "wall_s": round(min(walls[name]), 3), "wall_s_all": [round(w, 3) for w in walls[name]],
            "peak_rss_mb": round(rss[name] / 1024, 1),
        }
        for name in cmds
    }


def ratio(runs: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    """``wall(a) / wall(b)``, or None when either run is missing or failed."""
    wall_a, wall_b = runs.get(a, {}).get("wall_s"), runs.get(b, {}).get("wall_s")
    if wall_a is None or not wall_b:
        return None
    return round(wall_a / wall_b, 3)


def summarize(runs: dict[str, dict[str, Any]], rss_baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Ratios and the targets of benchmarks/README.md (``met`` is None when a run is missing)."""
    ratios = {
        "ours_ta/mergekit_ta": ratio(runs, "ours_ta", "mergekit_ta"),
        "ours_ties/mergekit_ties": ratio(runs, "ours_ties", "mergekit_ties"),
        "ours_passthrough/mergekit_passthrough": ratio(runs, "ours_passthrough", "mergekit_passthrough"),
        "neuromerging/ours_ties": ratio(runs, "ours_neuromerging", "ours_ties"),
        **{f"ours_{m}/floor": ratio(runs, f"ours_{m}", "floor") for m in OUR_METHODS},
    }
    # informational, no target: the runs beyond the default ones
    ratios.update({f"ours_{m}/mergekit_{m}": ratio(runs, f"ours_{m}", f"mergekit_{m}") for m in EXTRA_METHODS
                   if f"ours_{m}" in runs})
    # informational, no target: against the fastest floor run, including the back-to-back ones
    ratios.update({f"ours_{m}/floor_best": ratio(runs, f"ours_{m}", "floor_best") for m in OUR_METHODS
                   if "floor_best" in runs})
    limits = {"ours_ta/mergekit_ta": 1 / 3, "ours_ties/mergekit_ties": 1 / 5, "neuromerging/ours_ties": 2.0,
              **{f"ours_{m}/floor": 3.0 for m in OUR_METHODS}}
    targets: dict[str, Any] = {
        k: {"value": ratios[k], "max": round(v, 3), "met": None if ratios[k] is None else ratios[k] <= v}
        for k, v in limits.items()
    }
    for m in OUR_METHODS:
        run = runs.get(f"ours_{m}")
        if run is None or "peak_rss_mb" not in run:
            continue
        targets[f"ours_{m}_peak_rss_mb"] = {"value": run["peak_rss_mb"], "max": 1536, "met": run["peak_rss_mb"] <= 1536}
        base_run = (rss_baseline or {}).get("runs", {}).get(f"ours_{m}", {})
        if base_run.get("peak_rss_mb"):
            growth = round(run["peak_rss_mb"] / base_run["peak_rss_mb"], 3)
            targets[f"ours_{m}_rss_growth_vs_baseline"] = {"value": growth, "max": 1.3, "met": growth <= 1.3}
    return {"ratios": ratios, "targets": targets}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/neuromerge/bench-speed").expanduser())
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (intermediate = 4×); 2048 = double")
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers, vocab 4000 (a quick check)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best wall time is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both tools")
    ap.add_argument("--methods", default=",".join(OUR_METHODS),
                    help=f"subset of {','.join(OUR_METHODS + EXTRA_METHODS)} (default: {','.join(OUR_METHODS)})")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--floor-extra", type=int, default=3,
                    help="floor runs back to back after the round-robin (reported as floor_best; no target)")
    ap.add_argument("--rss-baseline", type=Path, help="a previous JSON (e.g. hidden 1024): RSS growth check")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(OUR_METHODS + EXTRA_METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {','.join(OUR_METHODS + EXTRA_METHODS)}")

    arch = arch_from_args(args.hidden, args.small)
    root = args.workdir.expanduser() / arch.name
    if args.build_only:
        build_family(root, arch)
        return
    print(f"[bench] model family {root} ({arch.n_params / 1e6:.1f}M params per model)", file=sys.stderr)
    if not family_ready(root, arch):
        print("[bench] building it (once)", file=sys.stderr)
        build = [sys.executable, __file__, "--build-only", "--workdir", str(args.workdir), "--hidden",
                 str(args.hidden), *(["--small"] if args.small else [])]
        subprocess.run(build, check=True)
    base, *experts = family_dirs(root)
    out_bytes = folder_bytes(base)

    run_dir = root / "runs"
    run_dir.mkdir(exist_ok=True)
    plan = list(configs(base, experts, methods, not args.skip_mergekit, arch.layers).items())
    plan += [] if args.skip_floor else [("floor", None)]
    cmds: dict[str, tuple[list[str], Path, bool]] = {}
    for name, cfg in plan:
        config_path = None
        if cfg is not None:
            config_path = run_dir / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = run_dir / f"out_{name}"
        cmds[name] = (commands(name, config_path, out, args.threads, [base, *experts], out_bytes), out, cfg is None)
    runs = measure(cmds, args.repeat)
    if args.floor_extra and "wall_s" in runs.get("floor", {}):
        cmd, out, make_out = cmds["floor"]
        extra = [run_once(cmd, out, make_out) for _ in range(args.floor_extra)]
        walls = [got[0] for got in extra if not isinstance(got, str)]
        runs["floor"]["wall_s_back_to_back"] = [round(w, 3) for w in walls]
        runs["floor_best"] = {"wall_s": round(min([runs["floor"]["wall_s"], *walls]), 3)}

    baseline = json.loads(args.rss_baseline.read_text()) if args.rss_baseline else None
    result = {
        "model": {"arch": asdict(arch), "params_per_model": arch.n_params, "n_experts": N_EXPERTS,
                  "dtype": "bfloat16", "bytes_per_model": out_bytes,
                  "input_bytes": out_bytes * (N_EXPERTS + 1)},
        "threads": args.threads, "repeat": args.repeat, "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "runs": runs,
        **summarize(runs, baseline),
    }
    print(json.dumps(result, indent=2))
    failed = [name for name, run in runs.items() if "error" in run]
    if failed:
        print(f"[bench] failed runs: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("neuromerge", "mergekit", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":
    main()
