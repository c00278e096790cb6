"""Merging PEFT LoRA adapters *into a LoRA adapter* (config ``output: {format: lora, rank: r | concat}``).

Every pool member is a LoRA adapter over the same base (read by :mod:`neuromerge.io.lora` as ``W0 + s·B·A``), so
the merge engine merges full weights and each targeted module's merged update is ``ΔW = W_merged − W0``: the
method (Task Arithmetic, TIES, DARE, NeuroMerging, …) always acts on the products ``s_t B_t A_t``, never on ``A``
and ``B`` separately (averaging factors gives ``Σ B_t · Σ A_t``, cross terms ``B_t A_u`` included).

* ``rank: r`` — :class:`LoraSink` receives the merged rows of each tensor from the engine, subtracts ``W0`` and,
  once a targeted module is complete, factorises ``ΔW`` by truncated SVD
  (:func:`~neuromerge.tensors.lowrank.truncated_svd_factors`): the written factors ``A = diag(√S_r) V_rᵀ``,
  ``B = U_r diag(√S_r)`` with ``lora_alpha = r`` (scaling 1, no rsLoRA), and the discarded relative energy
  ``Σ_{i>r} σ_i² / Σ σ_i²`` is reported per module and in total (``Σ_m discarded_m ‖ΔW_m‖² / Σ_m ‖ΔW_m‖²``). A
  tensor no adapter targets must come out of the merge equal to the base (rtol 1e-6); if it does not (e.g.
  ``linear`` with weights not summing to 1) the merge stops with an error.
* ``rank: concat`` — Task Arithmetic / linear merges are exact as a LoRA: ``Σ_t c_t s_t B_t A_t =
  [c_1 s_1 B_1, …] · [A_1; …]`` (:func:`~neuromerge.tensors.lowrank.concat_factors`) with ``c_t`` the method's
  coefficient of task vector ``t`` (:func:`delta_coefficients`); no merge pass, no SVD, discarded energy 0.

Layouts: the factorised matrix is ``M = ΔW`` for ``nn.Linear`` (out×in), ``ΔWᵀ`` for ``fan_in_fan_out`` Conv1D and
embeddings (PEFT stores ``lora_embedding_A`` as r×vocab), ``ΔW.reshape(out, −1)`` for convolutions (``A`` reshaped
to the kernel, ``B`` to a 1×1 kernel), exactly the inverse of :class:`~neuromerge.io.lora.LoraCheckpoint`'s reads.

Output folder: ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha = r``, ``rank_pattern`` /
``alpha_pattern`` for modules of another rank, ``target_modules`` = the written modules' full paths,
``base_model_name_or_path`` and ``task_type`` from the inputs) and ``adapter_model.safetensors`` with PEFT's key
names, in ``dtype`` (float32 unless the config's ``dtype`` says otherwise).

Refused before any weight is read (one-line :class:`~neuromerge.errors.CompatibilityError` /
:class:`~neuromerge.errors.ConfigError`): a pool member that is not a LoRA adapter, adapters naming different base
models, adapters with ``modules_to_save`` or ``lora_bias``, adapters that disagree on a module's layout or on
``fan_in_fan_out``.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from neuromerge.errors import CompatibilityError, ConfigError, NeuromergeError
from neuromerge.io.checkpoint import Checkpoint
from neuromerge.io.lora import LoraCheckpoint, LoraModule
from neuromerge.numeric import OverflowMode, to_output_dtype
from neuromerge.tensors.lowrank import concat_factors, truncated_svd_factors

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: a tensor no adapter targets counts as unchanged when |merged − base| <= UNCHANGED_RTOL · |base| elementwise
UNCHANGED_RTOL = 1e-6
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraTarget:
    """One module of the output adapter.

    ``weight``: the base tensor name (``<module>.weight``); ``shape`` its storage shape; ``a_key``/``b_key``: the
    PEFT key names written; ``transposed``: ``M = ΔWᵀ``; ``sources``: ``(model index, factors)`` of the adapters
    that target it."""

    module: str
    weight: str
    shape: tuple[int, ...]
    a_key: str
    b_key: str
    transposed: bool
    sources: tuple[tuple[int, LoraModule], ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the factorised matrix ``M`` (``B ∈ R^{m×r}``, ``A ∈ R^{r×n}``)."""
        if self.transposed:
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])

    def to_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """Storage-layout ``ΔW`` → ``M``."""
        return delta.t() if self.transposed else delta.reshape(self.matrix_shape)

    def factor_shapes(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r×n) and ``B`` (m×r) reshaped to PEFT's shapes (conv kernels for a convolution)."""
        if len(self.shape) > 2:
            return a.reshape(a.shape[0], *self.shape[1:]), b.reshape(*b.shape, *([1] * (len(self.shape) - 2)))
        return a, b


@dataclass
class LoraOutputPlan:
    """Everything the LoRA output needs, decided from headers: the targets and the adapter config fields."""

    rank: int | str
    targets: dict[str, LoraTarget]  # base weight name → target
    models: list[LoraCheckpoint]
    base_model_name_or_path: str | None
    fan_in_fan_out: bool
    task_type: str | None
    dtype: torch.dtype
    dropped: list[str] = field(default_factory=list)  # targeted modules excluded from merging

    def target_rank(self, target: LoraTarget) -> int:
        """Rank written for ``target``: Σ input ranks for ``concat``, else ``min(rank, m, n)``."""
        if self.rank == "concat":
            return sum(self.models[i].adapter.info(spec.a).shape[0] for i, spec in target.sources)
        return min(int(self.rank), *target.matrix_shape)

    def output_bytes(self) -> int:
        """Bytes of the factors to write."""
        return sum(self.target_rank(t) * sum(t.matrix_shape) * self.dtype.itemsize for t in self.targets.values())

    def summary(self) -> dict[str, Any]:
        return {"format": "lora", "rank": self.rank, "modules": len(self.targets), "dropped_modules": self.dropped}


def _refs(models: Sequence[LoraCheckpoint]) -> str | None:
    """The inputs' common ``base_model_name_or_path`` (None when none gives one); different ones are an error."""
    refs = {str(m.peft_config.get("base_model_name_or_path")).rstrip("/"): m for m in models
            if m.peft_config.get("base_model_name_or_path")}
    if len(refs) > 1:
        (r1, m1), (r2, m2) = list(refs.items())[:2]
        raise CompatibilityError(f"the adapters have different base models: {r1!r} ({m1.path}) and {r2!r} "
                                 f"({m2.path}); a LoRA output needs adapters of one base")
    return next(iter(refs), None)


def _check_representable(m: LoraCheckpoint) -> None:
    if m.peft_config.get("modules_to_save"):
        raise CompatibilityError(f"{m.path}: adapters with modules_to_save cannot be merged into a LoRA adapter "
                                 "(use output format full)")
    if m.bias_of:
        raise CompatibilityError(f"{m.path}: adapters with lora_bias cannot be merged into a LoRA adapter "
                                 "(use output format full)")


def _factor_key(key: str) -> str:
    """An input factor key as PEFT saves it (no adapter name)."""
    return key.replace(".default", "")


def plan_lora_output(rank: int | str, dtype: str | None, base: Checkpoint, models: Sequence[Checkpoint],
                     base_given: bool, merged: set[str], base_ref: str | None) -> LoraOutputPlan:
    """Check from headers that the pool can be written as one LoRA adapter and list its modules.

    ``merged``: the base tensors the plan merges (a targeted module whose weight is excluded from merging keeps
    the base's weight in a full merge, so it is left out of the adapter and listed in ``dropped``)."""
    if not base_given:
        raise ConfigError("output format lora needs `base_model`: the model the LoRA adapters were trained on")
    adapters: list[LoraCheckpoint] = []
    for m in models:
        if not isinstance(m, LoraCheckpoint):
            raise CompatibilityError(f"output format lora needs every model to be a LoRA adapter folder; {m.path} "
                                     "is a full checkpoint (use output format full)")
        if m.owns_base:
            raise CompatibilityError(f"output format lora needs adapters over the base; {m.source} applies an adapter "
                                     "to another model (use output format full)")
        _check_representable(m)
        adapters.append(m)
    ref = _refs(adapters) or base_ref
    fan = {bool(m.peft_config.get("fan_in_fan_out", False)) for m in adapters
           if any(not _is_embedding(s) for s in m.modules.values())}
    if len(fan) > 1:
        raise CompatibilityError("the adapters disagree on fan_in_fan_out; they cannot be written as one adapter")
    tasks = {m.peft_config.get("task_type") for m in adapters}
    targets: dict[str, LoraTarget] = {}
    dropped: list[str] = []
    order = {n: i for i, n in enumerate(base.names())}
    names = sorted({n for m in adapters for n in m.modules}, key=order.__getitem__)
    for name in names:
        sources = tuple((i, m.modules[name]) for i, m in enumerate(adapters) if name in m.modules)
        first = sources[0][1]
        for i, spec in sources[1:]:
            if spec.transposed != first.transposed or _is_embedding(spec) != _is_embedding(first):
                raise CompatibilityError(f"{adapters[i].path} and {adapters[sources[0][0]].path} store the LoRA "
                                         f"factors of {first.module!r} differently (layout or embedding)")
        if name not in merged:
            dropped.append(first.module)
            continue
        targets[name] = LoraTarget(first.module, name, tuple(base.info(name).shape), _factor_key(first.a),
                                   _factor_key(first.b), first.transposed, sources)
    if not targets:
        raise CompatibilityError("no LoRA-targeted module is merged (all excluded?); nothing to write")
    return LoraOutputPlan(rank, targets, adapters, ref, fan.pop() if fan else False,
                          tasks.pop() if len(tasks) == 1 else None, OUT_DTYPES[dtype] if dtype else torch.float32,
                          dropped)


def _is_embedding(spec: LoraModule) -> bool:
    return "lora_embedding_A" in spec.a


# ------------------------------------------------------------------------------------------ coefficients
def delta_coefficients(method: str, params: Any, per_model: Sequence[Any]) -> list[float]:
    """``c_t`` with merged ``θ − θ0 = Σ_t c_t τ_t`` for the methods linear in the task vectors.

    Task Arithmetic: ``c_t = λ w_t`` (``normalize``: ``λ w_t / Σ w``, mergekit's zero-sum guard). Linear
    (``θ = Σ w_t θ_t / Σ w_t``): ``c_t = w_t / Σ w`` — and ``w_t`` with ``normalize: false`` only when
    ``Σ w = 1``, since otherwise the base itself is scaled by ``Σ w``, which no LoRA represents."""
    from neuromerge.methods.task_arithmetic import weight_sum

    weights = [float(p.weight) for p in per_model]
    if method == "task_arithmetic":
        scale = params.lam / (weight_sum(weights) if params.normalize else 1.0)
        return [scale * w for w in weights]
    if method == "linear":
        total = sum(weights)
        if params.normalize and total != 0.0:
            return [w / total for w in weights]
        if not params.normalize and abs(total - 1.0) <= 1e-9:
            return weights
        raise ConfigError(f"linear with weights summing to {total:g} (normalize: {params.normalize}) scales the base "
                          "model itself; a LoRA adapter cannot represent it")
    raise ConfigError(f"rank concat needs task_arithmetic or linear, not {method!r}")


# ------------------------------------------------------------------------------------------ writing
def write_adapter(out_dir: Path, plan: LoraOutputPlan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  report: dict[str, dict[str, float]], overflow: OverflowMode = "error") -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir`` (the engine's atomic
    temporary folder). ``factors`` maps base weight names to ``(A, B)`` as ``r×n``/``m×r`` matrices; ``report``
    gets per module ``rank``. A factor entry beyond the adapter dtype's range is an error, or clamped with
    ``overflow="clamp"`` (:func:`~neuromerge.numeric.to_output_dtype`). Returns the shard summary the merge report
    expects, with ``clamped``: the clamped entries per factor that has some."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    clamped: dict[str, int] = {}
    for name, target in plan.targets.items():
        for key, factor in zip((target.a_key, target.b_key), target.factor_shapes(*factors[name]), strict=True):
            tensors[key], n = to_output_dtype(factor, plan.dtype, tensor=key, mode=overflow, what="LoRA factor")
            tensors[key] = tensors[key].contiguous()
            if n:
                clamped[key] = n
        a = tensors[target.a_key]
        ranks[target.module] = int(a.shape[0])
        report[name]["rank"] = float(a.shape[0])
    main_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != main_rank}
    config = {
        "peft_type": "LORA",
        "task_type": plan.task_type,
        "base_model_name_or_path": plan.base_model_name_or_path,
        "r": main_rank,
        "lora_alpha": main_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"format": "pt", "merged_by": "neuromerge"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    size = (out_dir / ADAPTER_FILE).stat().st_size
    return {"files": [ADAPTER_FILE, CONFIG_FILE], "index": None, "total_size": size, "bytes_written": size,
            "clamped": clamped}


def lora_report(plan: LoraOutputPlan, per_module: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The ``lora`` section of ``merge_report.json``: per module rank, ``‖ΔW‖_F²`` and discarded relative energy,
    and the total discarded share ``Σ_m d_m E_m / Σ_m E_m``."""
    energy = sum(r["energy"] for r in per_module.values())
    lost = sum(r["discarded_energy"] * r["energy"] for r in per_module.values())
    worst = max(per_module.items(), key=lambda kv: kv[1]["discarded_energy"])
    return {
        **plan.summary(),
        "discarded_energy": lost / energy if energy > 0 else 0.0,
        "max_discarded_energy": {"module": plan.targets[worst[0]].module, "value": worst[1]["discarded_energy"]},
        "per_module": {plan.targets[n].module: r for n, r in per_module.items()},
    }


# ------------------------------------------------------------------------------------------ rank r: SVD
class LoraSink:
    """Receives the engine's merged rows (fp32, storage layout, with the base's rows), assembles ``ΔW`` of each
    targeted module, factorises it when complete and checks that every other merged tensor equals the base.

    Thread-safe; :meth:`add` of the last rows of a module runs that module's SVD in the calling worker thread."""

    def __init__(self, plan: LoraOutputPlan, overflow: OverflowMode = "error") -> None:
        self.plan = plan
        self.overflow = overflow
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.report: dict[str, dict[str, float]] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, merged: torch.Tensor, base: torch.Tensor, rows: tuple[int, int] | None) -> None:
        """Rows ``rows`` (all when None) of tensor ``name`` after the merge, and the same rows of the base."""
        target = self.plan.targets.get(name)
        if target is None:
            _check_unchanged(name, merged, base)
            return
        delta = merged.to(torch.float64) - base.to(torch.float64)
        a, b = rows if rows is not None else (0, target.shape[0])
        with self._lock:
            buf = self._buffers.get(name)
            if buf is None:
                buf = self._buffers[name] = torch.empty(target.shape, dtype=torch.float32)
            buf[a:b] = delta.reshape(b - a, *target.shape[1:])
            self._rows[name] = self._rows.get(name, 0) + (b - a)
            if self._rows[name] < target.shape[0]:
                return
            buf = self._buffers.pop(name)
        self._factorize(target, buf)

    def _factorize(self, target: LoraTarget, delta: torch.Tensor) -> None:
        m = target.to_matrix(delta)
        a, b, lost = truncated_svd_factors(m, self.plan.target_rank(target))
        energy = float(m.to(torch.float64).square().sum())
        with self._lock:
            self.factors[target.weight] = (a, b)
            self.report[target.weight] = {"energy": energy, "discarded_energy": lost}

    def finish(self, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the adapter; return (shard summary, ``lora`` report section)."""
        missing = [t.module for n, t in self.plan.targets.items() if n not in self.factors]
        if missing:
            raise NeuromergeError(f"{len(missing)} LoRA module(s) not fully merged: {', '.join(missing[:5])}")
        shards = write_adapter(out_dir, self.plan, self.factors, self.report, self.overflow)
        return shards, lora_report(self.plan, self.report)


def _check_unchanged(name: str, merged: torch.Tensor, base: torch.Tensor) -> None:
    base = base.to(torch.float32)
    if not torch.all((merged - base).abs() <= UNCHANGED_RTOL * base.abs()):
        raise CompatibilityError(f"the merge changes {name!r}, which no adapter targets as a LoRA module; a LoRA "
                                 "adapter cannot hold it (use output format full)")


# ------------------------------------------------------------------------------------------ rank concat
def concat_adapter(plan: LoraOutputPlan, base: Checkpoint, coefficients: Callable[[str], list[float]]
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, float]]]:
    """Exact factors of a linear merge: per module ``A_cat = [A_t]``, ``B_cat = [c_t s_t B_t]`` over the adapters
    that target it (``coefficients(weight_name)`` gives ``c_t`` for every model). Factors are returned as
    ``r×n``/``m×r`` float32 matrices; only the products ``c_t s_t B_t`` round. ``energy`` = ``‖B A‖_F² =
    Σ (AAᵀ) ⊙ (BᵀB)`` (float64, without forming ``B A``)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, dict[str, float]] = {}
    for name, target in plan.targets.items():
        coef = coefficients(name)
        pairs, cs = [], []
        for i, spec in target.sources:
            model = plan.models[i]
            own_w0 = model.adapter.read(model.whole[name]).float() if name in model.whole else None
            if own_w0 is not None and not torch.equal(own_w0, base.read(name).float()):
                raise CompatibilityError(f"{model.path} stores its own base weight for {target.module!r}; rank concat "
                                         "needs adapters over the same base weights")
            a = model.adapter.read(spec.a).to(torch.float32)
            b = model.adapter.read(spec.b).to(torch.float32)
            pairs.append((a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])))
            cs.append(coef[i] * spec.scaling)
        a_cat, b_cat = concat_factors(pairs, cs)
        factors[name] = (a_cat, b_cat)
        a64, b64 = a_cat.double(), b_cat.double()
        energy = float(((a64 @ a64.t()) * (b64.t() @ b64)).sum())
        report[name] = {"energy": energy, "discarded_energy": 0.0}
    return factors, report


__all__ = ["LoraOutputPlan", "LoraSink", "LoraTarget", "concat_adapter", "delta_coefficients", "lora_report",
           "plan_lora_output", "write_adapter"]
