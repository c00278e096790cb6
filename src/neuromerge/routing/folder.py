"""Routed-model folders: ``manifest.json`` + ``experts.safetensors`` + ``router.safetensors`` (+ ``base/``).

Layout (format ``neuromerge-routed``, version 1)::

    manifest.json        method, tasks, experts (name, kind, per-module rank and stored keys), gate policy,
                         router config + feature source, base {ref, class, header_hash, shapes, embedded},
                         heads {task: file}, router_validation {task: {accuracy, n, chance, train_n}},
                         inputs {task: {seed, file, fingerprint, train/val/test: {n, used, router, rows, sha256}}}
    experts.safetensors  every distinct expert tensor once (keys t0, t1, …; identical tensors share a key)
    router.safetensors   the router's state dict (absent when the model has no router)
    heads/<task>.safetensors  each task's linear head over the final pooled features: weight (C, d), bias (C,)
                         (the expert's probe head; absent for tasks scored without a head, e.g. by label words)
    base/                the base model (``save_pretrained``: sharded safetensors + config) when embedded

``heads``, ``router_validation`` and ``inputs`` are optional (older folders and Python-built models without them
load; ``load_routed(...).heads`` is then empty). ``route build`` writes them through :func:`write_trust` for every
method (WEMoE: no ``router_validation``, its per-MLP routers are no task classifiers; MERGE: no ``inputs``, its
data is the search's), and :func:`load_routed` gives every model it returns a ``heads`` attribute
(:func:`read_heads`).

The folder is written atomically (:class:`neuromerge.io.writer.AtomicOutput`: a temporary sibling folder
renamed into place). Loading checks the base against the manifest's header hash (SHA-256 of the weight files'
names, sizes and safetensors headers: :meth:`neuromerge.io.checkpoint.Checkpoint.header_hash`) and the shapes
of the routed modules' weights.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neuromerge.errors import CheckpointError, CompatibilityError, ConfigError
from neuromerge.io.checkpoint import open_checkpoint
from neuromerge.io.hub import looks_like_hf_id, resolve_hf_id
from neuromerge.io.writer import TOKENIZER_FILES, AtomicOutput
from neuromerge.routing.experts import DenseExpert, Expert, LowRankExpert, dedupe
from neuromerge.routing.policy import policy_from_dict
from neuromerge.routing.router import Router
from neuromerge.routing.runtime import FEATURE_FNS, FeatureFn, RoutedModel

FORMAT = "neuromerge-routed"
VERSION = 1
MANIFEST = "manifest.json"
EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
BASE_DIR = "base"
HEADS_DIR = "heads"

Heads = Mapping[str, Mapping[str, torch.Tensor] | None]


def _head_file(task: str) -> str:
    if not task or "/" in task or "\\" in task or task in (".", ".."):
        raise ConfigError(f"task name {task!r} cannot name a head file")
    return f"{HEADS_DIR}/{task}.safetensors"


def write_trust(tmp: Path, *, heads: Heads | None = None, router_validation: dict[str, Any] | None = None,
                inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write each task's head to ``tmp/heads/<task>.safetensors`` (``weight (C, d)``, ``bias (C,)``, float32; a
    task whose head is None gets no file) and return the manifest's ``heads`` / ``router_validation`` / ``inputs``
    entries (module docstring)."""
    files: dict[str, str] = {}
    for task, head in (heads or {}).items():
        if head is None:
            continue
        w, b = head.get("weight"), head.get("bias")
        if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[0],):
            shapes = {k: tuple(v.shape) for k, v in head.items()}
            raise ConfigError(f"head of task {task!r} must be weight (C, d) and bias (C,), got {shapes}")
        rel = _head_file(task)
        (tmp / HEADS_DIR).mkdir(exist_ok=True)
        save_file({"weight": w.detach().float().cpu().contiguous(), "bias": b.detach().float().cpu().contiguous()},
                  str(tmp / rel), metadata={"format": "pt"})
        files[task] = rel
    return {"heads": files, "router_validation": router_validation, "inputs": inputs}


def read_heads(folder: str | os.PathLike[str], doc: Mapping[str, Any] | None = None
               ) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {"weight": (C, d), "bias": (C,)}}``: the heads the manifest lists (empty when it lists none);
    :class:`CheckpointError` when a listed file is missing or lacks a tensor."""
    folder = Path(folder)
    doc = read_manifest(folder) if doc is None else doc
    out: dict[str, dict[str, torch.Tensor]] = {}
    for task, rel in (doc.get("heads") or {}).items():
        tensors = _load_tensors(folder / rel)
        if set(tensors) != {"weight", "bias"}:
            raise CheckpointError(f"{folder / rel} must hold exactly 'weight' and 'bias', has {sorted(tensors)}")
        out[task] = tensors
    return out


def _expert_entries(experts: list[Expert]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Manifest entries of ``experts`` and the deduplicated tensors to store."""
    named = [(f"{i}|{k}", t) for i, e in enumerate(experts) for k, t in e.tensors().items()]
    stored, keys = dedupe(named)
    entries = []
    for i, e in enumerate(experts):
        if isinstance(e, LowRankExpert):
            mods = {m: {"rank": e.rank(m), "A": keys[f"{i}|{m}.A"], "B": keys[f"{i}|{m}.B"]} for m in e.factors}
        else:
            mods = {m: {"delta": keys[f"{i}|{m}.delta"]} for m in e.deltas}
        entries.append({"name": e.name, "kind": e.kind, "modules": mods})
    return entries, stored


def _module_shapes(model: RoutedModel) -> dict[str, list[int]]:
    return {f"{m}.weight": list(layer.weight.shape) for m, layer in model.routed_layers.items()}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _check_ref_shapes(ckpt_path: str, shapes: dict[str, list[int]]) -> None:
    """Refuse a base reference whose routed weights (when present under the same names) differ in shape."""
    with open_checkpoint(ckpt_path) as ckpt:
        for name, shape in shapes.items():
            if name in ckpt and list(ckpt.info(name).shape) != shape:
                raise CompatibilityError(f"base {ckpt_path}: {name} has shape {list(ckpt.info(name).shape)}, the "
                                         f"routed model's base has {shape}")


def manifest_ref(base_ref: str | None) -> str | None:
    """The base reference a manifest records: an existing local path made absolute (the folder then loads from
    any working directory), anything else (a Hugging Face id, None) as given."""
    if base_ref is None or Path(base_ref).is_absolute() or not Path(base_ref).expanduser().exists():
        return base_ref
    return os.path.abspath(Path(base_ref).expanduser())


def _header_hash(path: str | os.PathLike[str]) -> str:
    with open_checkpoint(path) as ckpt:
        return ckpt.header_hash()


def save_routed(model: RoutedModel, folder: str | os.PathLike[str], *, base_ref: str | None = None,
                embed_base: bool = False, tasks: list[str], method: str, extra: dict | None = None,
                force: bool = False, heads: Heads | None = None, router_validation: dict[str, Any] | None = None,
                inputs: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder`` (see the module docstring); returns the folder's path.

    ``base_ref``: a local model folder (recorded as an absolute path) or a cached HF id of the base (its header
    hash is recorded); with
    ``embed_base`` the base's weights and config are written to ``base/`` (``save_pretrained`` of the base with
    its original linear layers). One of the two is required. ``force`` replaces an existing folder. ``heads``
    (task → ``{"weight", "bias"}`` or None), ``router_validation`` and ``inputs``: :func:`write_trust`.
    """
    if base_ref is None and not embed_base:
        raise ConfigError("save_routed needs base_ref (a path or HF id of the base) or embed_base=True")
    base_ref = manifest_ref(base_ref)
    shapes = _module_shapes(model)
    if base_ref is not None:
        _check_ref_shapes(base_ref, shapes)
    entries, stored = _expert_entries(model.experts)
    router = model.router
    with AtomicOutput(Path(folder), force=force, inputs=[base_ref]) as tmp:
        save_file(stored, str(tmp / EXPERTS_FILE), metadata={"format": "pt"})
        if router is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
            save_file(state, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        if embed_base:
            if not hasattr(model.base, "save_pretrained"):
                raise ConfigError(f"embed_base needs a transformers model, got {type(model.base).__name__}")
            with model.unwrapped() as base:
                base.save_pretrained(tmp / BASE_DIR)
            ref_dir = Path(base_ref) if base_ref is not None else None
            if ref_dir is not None and ref_dir.is_dir():
                _copy_tokenizer(ref_dir, tmp / BASE_DIR)
            header_hash = _header_hash(tmp / BASE_DIR)
        else:
            header_hash = _header_hash(base_ref)  # type: ignore[arg-type]
        trust = write_trust(tmp, heads=heads, router_validation=router_validation, inputs=inputs)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "tasks": list(tasks),
            "experts": entries,
            "policy": model.policy.to_dict(),
            "router": {"config": router.config() if router is not None else None, "feature": model.feature_source},
            "base": {"ref": base_ref, "embedded": bool(embed_base), "class": type(model.base).__name__,
                     "header_hash": header_hash, "shapes": shapes},
            "storage_bytes": model.storage_bytes(),
            **trust,
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(folder)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of a routed-model folder; :class:`CheckpointError` when missing, unparsable, of
    another format or of an unknown version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {folder} is not a routed-model folder")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {path} ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has unknown manifest version {doc.get('version')!r} (this neuromerge reads "
                              f"version {VERSION}); upgrade neuromerge")
    return doc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}; the routed-model folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {e})") from None


def _experts_from(entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> list[Expert]:
    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"tensor {key!r} named by the manifest is missing from {EXPERTS_FILE}")
        return tensors[key]

    experts: list[Expert] = []
    for e in entries:
        if e["kind"] == "lowrank":
            experts.append(LowRankExpert(e["name"], {m: (get(v["A"]), get(v["B"])) for m, v in e["modules"].items()}))
        elif e["kind"] == "dense":
            experts.append(DenseExpert(e["name"], {m: get(v["delta"]) for m, v in e["modules"].items()}))
        else:
            raise CheckpointError(f"expert {e['name']!r} has unknown kind {e['kind']!r}")
    return experts


def _base_path(folder: Path, info: dict[str, Any], override: str | os.PathLike[str] | None) -> Path:
    if override is not None:
        return Path(override)
    if info.get("embedded"):
        return folder / BASE_DIR
    ref = info.get("ref")
    if ref is None:
        raise CheckpointError(f"{folder / MANIFEST} names no base model and embeds none")
    p = Path(ref).expanduser()
    if not p.exists() and looks_like_hf_id(ref):
        p = resolve_hf_id(ref)
    if not p.exists():
        raise CheckpointError(f"base model {ref} (from {folder / MANIFEST}) does not exist")
    return p


def _build_base(path: Path, class_name: str | None) -> torch.nn.Module:
    """``transformers.<class>.from_pretrained(path)`` (local files only); the class saved in the manifest, else
    ``config.architectures[0]``."""
    import transformers

    if not (path / "config.json").is_file():
        raise CheckpointError(f"base model {path} has no config.json; load_routed needs a transformers folder")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = [n for n in (class_name, *(getattr(config, "architectures", None) or [])) if n]
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise CheckpointError(f"cannot build the base model of {path}: no transformers class among {names}")
    return cls.from_pretrained(path, local_files_only=True).eval()


def _verify_base(path: Path, info: dict[str, Any], folder: Path) -> None:
    """:class:`CompatibilityError` unless the base at ``path`` has the header hash the manifest's ``base`` section
    records (no check when it records none)."""
    if info.get("header_hash"):
        found = _header_hash(path)
        if found != info["header_hash"]:
            raise CompatibilityError(f"base model {path} is not the one {folder} was built on (header hash "
                                     f"{found[:12]}… ≠ {info['header_hash'][:12]}…)")


def _base_module(folder: Path, info: dict[str, Any], base: str | os.PathLike[str] | None,
                 module: torch.nn.Module | None, check_hash: bool, loader: str) -> tuple[torch.nn.Module, Path]:
    """``(module, where)``: the given ``module``, else the base built from the folder's embedded / referenced base
    (``base`` overrides its location; header hash checked unless ``check_hash`` is False). ``loader`` names the
    function the error message points to when the folder names no base."""
    if module is not None:
        return module, Path("module=")
    if info.get("ref") is None and not info.get("embedded") and base is None:
        raise CheckpointError(f"{folder} names no base model; pass {loader}(..., module=backbone)")
    path = _base_path(folder, info, base)
    if check_hash:
        _verify_base(path, info, folder)
    return _build_base(path, info.get("class")), path


def _check_shapes(model: torch.nn.Module, shapes: dict[str, list[int]], where: Path) -> None:
    params = dict(model.named_parameters())
    for name, shape in shapes.items():
        if name not in params:
            raise CompatibilityError(f"base model {where} has no tensor {name!r}, which the routed model routes")
        if list(params[name].shape) != list(shape):
            raise CompatibilityError(f"base model {where}: {name} has shape {list(params[name].shape)}, the routed "
                                     f"model was built for {list(shape)}")


def load_routed(folder: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                feature_fn: FeatureFn | None = None, check_hash: bool = True, module: torch.nn.Module | None = None
                ) -> Any:
    """Rebuild the routed model saved in ``folder`` (eval mode): a :class:`RoutedModel` (MIN-Merging,
    Twin-Merging, EMR…), for a MERGE folder (``method: merge``) a
    :class:`~neuromerge.routing.recombination.ChainRoutedModel`, for a WEMoE folder (``method: wemoe``) a
    :class:`~neuromerge.data_aware.wemoe.WEMoEModel` (:func:`neuromerge.routing.wemoe.load_wemoe`).

    ``base`` overrides the base model's location: a local model folder used instead of the embedded ``base/`` or
    the manifest's recorded reference — for a base that moved; its header hash must still match the recorded one
    unless ``check_hash=False`` (a base with other weights but the routed modules' shapes then loads; the routed
    model is no longer the one built). ``feature_fn`` supplies the router's feature function when
    the model was saved with a custom one; ``module`` gives a MERGE or WEMoE folder its backbone when it neither
    embeds nor names one. The returned model's ``heads`` attribute holds the folder's per-task heads
    (:func:`read_heads`: ``{task: {"weight" (C, d), "bias" (C,)}}``, empty when the folder has none). Errors:
    :class:`CheckpointError` for a missing / unreadable file or an unknown manifest version,
    :class:`CompatibilityError` when the base differs (header hash, routed shapes) or the router's output size
    differs from the number of experts.
    """
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc.get("method") == "merge":
        from .recombination import load_chain_routed

        return load_chain_routed(folder, base=base, module=module, feature_fn=feature_fn, check_hash=check_hash)
    if doc.get("method") == "wemoe":
        from .wemoe import load_wemoe

        return load_wemoe(folder, base=base, module=module, check_hash=check_hash)
    heads = read_heads(folder, doc)
    entries, rconf = doc["experts"], doc["router"]
    config = rconf.get("config")
    if config is not None and int(config["n_out"]) != len(entries):
        raise CompatibilityError(f"the router of {folder} has {config['n_out']} outputs but the manifest lists "
                                 f"{len(entries)} experts")
    experts = _experts_from(entries, _load_tensors(folder / EXPERTS_FILE))
    router = None
    if config is not None:
        state = _load_tensors(folder / ROUTER_FILE)
        router = Router(**{k: int(v) for k, v in config.items()})
        try:
            router.load_state_dict(state)
        except RuntimeError as e:
            raise CompatibilityError(f"{ROUTER_FILE} of {folder} does not match its config {config}: "
                                     f"{str(e).splitlines()[0]}") from None
        router.eval()
    info = doc["base"]
    path = _base_path(folder, info, base)
    if check_hash:
        _verify_base(path, info, folder)
    model = _build_base(path, info.get("class"))
    _check_shapes(model, info.get("shapes", {}), path)
    feature = rconf.get("feature") or {}
    fn, module = None, None
    if feature.get("kind") == "fn":
        fn = feature_fn or FEATURE_FNS.get(feature.get("name", ""))
        if fn is None:
            raise ConfigError(f"{folder} routes with a custom feature function; pass load_routed(..., feature_fn=)")
    else:
        module = feature.get("module")
    routed = RoutedModel(model, experts, router=router, policy=policy_from_dict(doc["policy"]), feature_module=module,
                         feature_fn=fn, mask_kwarg=feature.get("mask_kwarg", "attention_mask")).eval()
    routed.heads = heads
    return routed
