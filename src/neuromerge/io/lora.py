"""PEFT LoRA adapter folders as pool members: an adapter read as the *full* weights it stands for.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``) is opened by
:func:`open_model` as a :class:`LoraCheckpoint` over the pool's base checkpoint. It has the API of
:class:`~neuromerge.io.checkpoint.Checkpoint` (``names``, ``info``, ``read(name, rows)``, ``config``,
``header_hash``, ``total_bytes``, ``bytes_read``, ``close``, ``in``), so the merge engine, ``inspect`` and every
method see an ordinary model:

* a targeted module ``m`` (``lora_A``/``lora_B`` present) reads as ``W0 + s·B·A`` — PEFT's
  ``merge_and_unload`` (``peft/tuners/lora/layer.py``, ``get_delta_weight``) — with
  ``s = α/r`` (``α/√r`` when ``use_rslora``), ``r`` the rank of the stored ``A`` and ``α`` from ``alpha_pattern``
  (PEFT's ``get_pattern_key``: pattern ``p`` matches module ``m`` when ``re.match(rf"(.*\\.)?({p})$", m)``) or
  ``lora_alpha``;
* layouts: ``nn.Linear`` ``W0 ∈ R^{out×in}``, ``ΔW = B A``; ``fan_in_fan_out`` (GPT-2 ``Conv1D``, ``W0 ∈ R^{in×out}``)
  and embeddings (``lora_embedding_A/B``) ``ΔW = (B A)ᵀ``; convolutions ``ΔW = (B₁ₓ₁ · A_flat)`` reshaped to the
  kernel (``B`` must be a 1×1 kernel, as PEFT makes it);
* ``lora_bias`` adds ``s·b_B`` to the module's bias;
* tensors stored whole in the adapter (``modules_to_save``, biases trained with ``bias="all"|"lora_only"``,
  ``save_embedding_layers``) replace the base's (an adapted module's saved ``base_layer.weight`` is its ``W0``);
* every other tensor is the base's, read from the base checkpoint.

**Dtype.** Tensors the adapter changes are returned in **float32** (``W0 + s·B·A`` is formed in float64 and rounded
once; the engine works in fp32 anyway, so casting to the base dtype would only add a rounding); ``info`` reports
that dtype. Other tensors keep the base's stored dtype. PEFT's ``merge_and_unload`` rounds in the base dtype
after an fp32 product, so the two agree to within fp32 rounding, not bit for bit.

**Names.** PEFT stores ``base_model.model.<module>.lora_A.weight``; ``<module>`` is the module path of the model
the adapter was made on, so ``<module>.weight`` is the base tensor name when the base checkpoint was saved from
that same model class (``save_pretrained``). ``.base_layer`` and ``.modules_to_save`` (and the adapter name
``default`` of older PEFT files) are dropped from names.

**Refused** (one-line :class:`~neuromerge.errors.CheckpointError`): other PEFT types, DoRA, ``trainable_token_indices``,
``target_parameters``, ``layer_replication`` and any tensor name this module does not understand; a
:class:`~neuromerge.errors.CompatibilityError` when no base is configured, when the adapter names a different base
model, or when a factor's shape does not fit the base tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import CheckpointError, CompatibilityError
from neuromerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from neuromerge.io.hub import looks_like_hf_id, resolve_hf_id

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: adapter_config keys whose (truthy) presence means weights this module cannot reproduce
UNSUPPORTED_OPTIONS = ("use_dora", "trainable_token_indices", "target_parameters", "layer_replication")
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                        r"(?:\.default)?(?:\.(?P<param>weight|bias))?$")
_DROPPED_PARTS = frozenset({"base_layer", "modules_to_save", "default"})


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: tensor names of its factors in the adapter file and how ``ΔW`` is laid out.

    ``transposed``: ``ΔW = (B A)ᵀ`` (``fan_in_fan_out`` Conv1D and embeddings) instead of ``B A``."""

    module: str
    a: str
    b: str
    b_bias: str | None
    transposed: bool
    scaling: float


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """``s = α / r`` (Hu et al. 2021), or ``α / √r`` with rsLoRA (Kalajdzievski 2023); PEFT ``update_layer``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def base_name(adapter_key: str) -> str:
    """``base_model.model.x.base_layer.bias`` → ``x.bias`` (PEFT prefix and wrapper parts dropped)."""
    name = adapter_key.removeprefix(PREFIX)
    return ".".join(p for p in name.split(".") if p not in _DROPPED_PARTS)


class LoraCheckpoint:
    """A PEFT LoRA adapter presented as the full weights ``W0 + s·B·A`` over ``base`` (see the module docstring).

    ``path`` is the adapter folder, ``config`` the base's ``config.json`` (the adapter has none), ``files`` the
    adapter weight file, ``bytes_read`` counts the adapter's tensor bytes read (base bytes are counted by the base
    checkpoint), ``total_bytes`` is the adapter file's size."""

    kind = "lora"
    #: the adapter's ``base_model_name_or_path`` and whether it names the pool's base: True, or None when the two
    #: cannot be compared (a local copy may live anywhere; only the factor shapes were checked)
    base_reference: str | None = None
    base_match: bool | None = None

    def __init__(self, path: Path, source: str, base: Checkpoint, adapter: Checkpoint, peft_config: dict[str, Any]
                 ) -> None:
        self.path = path
        self.source = source
        self.base = base
        self.adapter = adapter
        self.peft_config = peft_config
        self.files = list(adapter.files)
        self.config = base.config
        self.modules: dict[str, LoraModule] = {}  # base tensor name → module
        self.bias_of: dict[str, LoraModule] = {}  # base bias name → module with lora_bias
        self.whole: dict[str, str] = {}  # base tensor name → adapter tensor stored whole
        self._build_index()
        self._names = list(dict.fromkeys([*base.names(), *self.whole]))

    # ------------------------------------------------------------------------------------------ index
    def _build_index(self) -> None:
        cfg = self.peft_config
        factors: dict[str, dict[str, str]] = {}
        for key in self.adapter.names():
            m = _FACTOR_RE.match(key.removeprefix(PREFIX))
            if m is None:
                if any(tag in key for tag in ("lora_", "magnitude", "token_adapter")):
                    raise CheckpointError(f"{self.path}: adapter tensor {key!r} is not supported (only LoRA factors "
                                          "and whole tensors are)")
                self.whole[base_name(key)] = key
                continue
            module = base_name(m.group("module"))
            param = m.group("param") or "weight"
            factors.setdefault(module, {})[f"{m.group('kind')[-1]}.{param}"] = key
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        rslora = bool(cfg.get("use_rslora", False))
        for module, parts in factors.items():
            if "A.weight" not in parts or "B.weight" not in parts:
                raise CheckpointError(f"{self.path}: module {module!r} has only one of its LoRA factors A, B")
            embedding = "lora_embedding_A" in parts["A.weight"]
            rank = int(self.adapter.info(parts["A.weight"]).shape[0])
            alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank)))
            spec = LoraModule(module, parts["A.weight"], parts["B.weight"], parts.get("B.bias"),
                              transposed=embedding or fan_in_fan_out, scaling=lora_scaling(alpha, rank, rslora))
            self._check_fits(spec)
            self.modules[f"{module}.weight"] = spec
            if spec.b_bias is not None:
                self.bias_of[f"{module}.bias"] = spec

    def _check_fits(self, spec: LoraModule) -> None:
        name = f"{spec.module}.weight"
        if name not in self.base:
            raise CompatibilityError(f"{self.path}: the adapter targets {spec.module!r} but the base {self.base.path} "
                                     f"has no tensor {name!r}; is it the adapter's base model?")
        shape = tuple(self.base.info(name).shape)
        a, b = self.adapter.info(spec.a).shape, self.adapter.info(spec.b).shape
        rank = a[0]
        if len(shape) > 2:  # convolution: B is a 1×1 kernel (out, r, 1, 1), A (r, in, k, k)
            fits = (b[:2] == (shape[0], rank) and all(d == 1 for d in b[2:]) and tuple(a[1:]) == shape[1:])
        elif spec.transposed:  # ΔW = (B A)ᵀ ∈ R^{in×out}: A (r, rows), B (cols, r)
            fits = len(shape) == 2 and tuple(a) == (rank, shape[0]) and tuple(b) == (shape[1], rank)
        else:
            fits = len(shape) == 2 and tuple(a) == (rank, shape[1]) and tuple(b) == (shape[0], rank)
        if not fits:
            raise CompatibilityError(
                f"{self.path}: LoRA factors of {spec.module!r} (A {list(a)}, B {list(b)}"
                f"{', fan_in_fan_out' if spec.transposed else ''}) do not fit the base tensor {list(shape)}"
            )
        if spec.b_bias is not None and f"{spec.module}.bias" not in self.base:
            raise CompatibilityError(f"{self.path}: lora_bias for {spec.module!r} but the base has no bias there")

    # ------------------------------------------------------------------------------------------ Checkpoint API
    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.path)!r}, base={str(self.base.path)!r}, {len(self.modules)} modules)"

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        """The base's tensor names, then any tensor the adapter stores whole that the base lacks."""
        return list(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.whole or name in self.base)

    def changed(self, name: str) -> bool:
        """Whether the adapter changes tensor ``name`` (else it reads as the base's)."""
        return name in self.modules or name in self.bias_of or name in self.whole

    def info(self, name: str) -> TensorInfo:
        """Shape of the base tensor; dtype float32 for the tensors the adapter changes (what :meth:`read`
        returns), the base's otherwise."""
        if name in self.whole and name not in self.base:
            src = self.adapter.info(self.whole[name])
            return TensorInfo(name, src.shape, torch.float32, src.file, -1, math.prod(src.shape) * 4)
        info = self.base.info(name)
        if not self.changed(name):
            return info
        if name in self.whole:
            whole = self.adapter.info(self.whole[name])
            if tuple(whole.shape) != tuple(info.shape):
                raise CompatibilityError(f"{self.path}: tensor {name!r} is {list(whole.shape)} in the adapter but "
                                         f"{list(info.shape)} in the base")
        return TensorInfo(name, info.shape, torch.float32, self.files[0], -1, math.prod(info.shape) * 4)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``a..b-1`` of dim 0 when ``rows`` is given) as the adapter makes it."""
        if name in self.modules:
            return self._lora_weight(self.modules[name], name, rows)
        if name in self.whole:
            return self._whole(name, rows)
        if name in self.bias_of:
            spec = self.bias_of[name]
            bias = self.base.read(name, rows).to(torch.float32)
            return bias.add_(self.adapter.read(spec.b_bias, rows).to(torch.float32), alpha=spec.scaling)
        return self.base.read(name, rows)

    def _whole(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        self.info(name)  # shape check against the base
        return self.adapter.read(self.whole[name], rows).to(torch.float32)

    def _lora_weight(self, spec: LoraModule, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """``W0[rows] + s·ΔW[rows]`` with ``ΔW = B A`` (rows of ``B``) or ``(B A)ᵀ`` (columns of ``A``).

        The sum is formed in float64 and rounded to float32 once: the fp32 inputs' products are exact in float64,
        so a row chunk reads (up to a double-rounding coincidence) bit for bit as the same rows of a whole read,
        whatever row blocking the matmul kernel uses."""
        w0 = self._whole(name, rows) if name in self.whole else self.base.read(name, rows)
        a = self.adapter.read(spec.a).to(torch.float64)
        if spec.transposed:
            if rows is not None:
                a = a[:, rows[0] : rows[1]]
            delta = a.t() @ self.adapter.read(spec.b).to(torch.float64).t()
        else:
            b = self.adapter.read(spec.b, rows).to(torch.float64)
            delta = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        return delta.mul_(spec.scaling).reshape(w0.shape).add_(w0.to(torch.float64)).to(torch.float32)

    def header_hash(self) -> str:
        """SHA-256 over the base's header hash, the adapter file's header hash and ``adapter_config.json``."""
        h = hashlib.sha256()
        h.update(self.base.header_hash().encode())
        h.update(self.adapter.header_hash().encode())
        h.update(json.dumps(self.peft_config, sort_keys=True).encode())
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        """Size of the adapter weight file (the base's bytes are the base checkpoint's)."""
        return self.adapter.total_bytes

    @property
    def bytes_read(self) -> int:
        """Adapter tensor bytes read so far."""
        return self.adapter.bytes_read

    #: True for mergekit's ``MODEL+LORA`` reference: the view opened ``base`` itself and closes it
    owns_base: bool = False

    def close(self) -> None:
        """Close the adapter file (the base is closed by its owner: the pool, or this view for ``MODEL+LORA``)."""
        self.adapter.close()
        if self.owns_base:
            self.base.close()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter, refusing what :class:`LoraCheckpoint` cannot reproduce."""
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {folder / ADAPTER_CONFIG} ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{folder}: PEFT adapter type {peft_type} is not supported (only LORA)")
    for key in UNSUPPORTED_OPTIONS:
        if cfg.get(key):
            raise CheckpointError(f"{folder}: LoRA adapters with `{key}` are not supported")
    return cfg


def _same_base(ref: str | None, base: Checkpoint) -> bool | None:
    """Whether the adapter's ``base_model_name_or_path`` names ``base``: True when it names it; False only when
    it and the base's id (its source or ``config.json``'s ``_name_or_path``) are HF ids that differ; None when they
    cannot be compared (a local copy of a model may live anywhere; the factor shapes are checked in any case)."""
    if not ref:
        return None
    cfg = base.config or {}
    known = {base.source, str(base.path), base.path.name, str(cfg.get("_name_or_path", ""))}
    if ref in known or ref.rstrip("/") in known:
        return True
    p = Path(ref).expanduser()
    if p.exists() and p.resolve() == Path(base.path).resolve():
        return True
    ids = [x for x in (base.source, str(cfg.get("_name_or_path", ""))) if looks_like_hf_id(x) and not Path(x).exists()]
    if looks_like_hf_id(ref) and not p.exists() and ids:
        return ref.lower() in {x.lower() for x in ids}
    return None


def open_lora(folder: Path, base: Checkpoint | None, *, source: str | None = None) -> LoraCheckpoint:
    """Open the PEFT LoRA adapter ``folder`` over ``base`` (see :class:`LoraCheckpoint`)."""
    if base is None:
        raise CompatibilityError(f"{folder} is a LoRA adapter; set `base_model` to the model it was trained on")
    cfg = read_adapter_config(folder)
    ref = cfg.get("base_model_name_or_path")
    match = _same_base(ref, base)
    if match is False:
        raise CompatibilityError(f"{folder} is a LoRA adapter of {ref!r}, but the base model is {base.source!r}")
    weights = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"no adapter weights in {folder}: expected {' or '.join(ADAPTER_WEIGHTS)}")
    adapter = open_checkpoint(weights)
    try:
        view = LoraCheckpoint(folder, source or str(folder), base, adapter, cfg)
    except BaseException:
        adapter.close()
        raise
    view.base_reference, view.base_match = (str(ref) if ref else None), match
    return view


def unverified_base_note(view: LoraCheckpoint) -> str | None:
    """The warning for an adapter whose base cannot be checked against the local base (``base_match`` None)."""
    if view.base_match is not None:
        return None
    if view.base_reference is None:
        return (f"LoRA adapter {view.path} names no base model (base_model_name_or_path); assumed to be "
                f"{view.base.path}: only the factor shapes could be checked")
    return (f"LoRA adapter {view.path} was trained on {view.base_reference!r}, which cannot be compared with the local "
            f"base {view.base.path}; assumed to be the same model: only the factor shapes could be checked")


def split_lora_reference(text: str) -> tuple[str, str] | None:
    """mergekit's ``MODEL+LORA`` reference (``ModelReference``: a model with a LoRA adapter applied) as its two
    parts, or None for a plain reference (no ``+``, or a path that exists as written)."""
    if "+" not in text or Path(text).expanduser().exists():
        return None
    chunks = text.split("+")
    if len(chunks) != 2 or not all(c.strip() for c in chunks):
        raise CheckpointError(f"model reference {text!r}: expected MODEL+LORA (a model, then one LoRA adapter, as "
                              "mergekit writes it)")
    return chunks[0], chunks[1]


def open_applied_lora(text: str, model_ref: str, lora_ref: str, *, allow_download: bool = False) -> LoraCheckpoint:
    """``MODEL+LORA``: the full weights ``W_model + s·B·A`` of the adapter ``LORA`` applied to ``MODEL`` (mergekit
    merges the adapter into the model with PEFT's ``merge_and_unload`` first; here the product is added per tensor
    as it is read, in float32)."""
    model = open_checkpoint(model_ref, allow_download=allow_download)
    try:
        lora = Path(lora_ref).expanduser()
        if not lora.exists() and looks_like_hf_id(lora_ref):
            lora = resolve_hf_id(lora_ref, allow_download=allow_download)
        if not is_adapter_folder(lora):
            raise CheckpointError(f"model reference {text!r}: {lora_ref} is not a PEFT LoRA adapter folder (no "
                                  f"{ADAPTER_CONFIG})")
        view = open_lora(lora, model, source=text)
    except BaseException:
        model.close()
        raise
    view.owns_base = True
    return view


def open_model(path: str | os.PathLike[str], base: Checkpoint | None, *, allow_download: bool = False
               ) -> Checkpoint | LoraCheckpoint:
    """A pool member: a PEFT LoRA adapter folder as :class:`LoraCheckpoint` over ``base``, anything else through
    :func:`~neuromerge.io.checkpoint.open_checkpoint` (same arguments, same errors)."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    split = split_lora_reference(text)
    if split is not None:
        return open_applied_lora(text, *split, allow_download=allow_download)
    if not p.exists() and looks_like_hf_id(text):
        try:
            p = resolve_hf_id(text, allow_download=False)
        except CheckpointError:
            return open_checkpoint(text, allow_download=allow_download)
    if is_adapter_folder(p):
        return open_lora(p, base, source=text)
    return open_checkpoint(text, allow_download=allow_download)


__all__ = ["LoraCheckpoint", "LoraModule", "is_adapter_folder", "lora_scaling", "open_applied_lora", "open_lora",
           "open_model", "split_lora_reference", "unverified_base_note"]
