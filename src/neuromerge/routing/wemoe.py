"""WEMoE routed-model folders (method ``wemoe``): save and load a :class:`~neuromerge.data_aware.wemoe.WEMoEModel`.

Layout (format ``neuromerge-routed``, version 1, as :mod:`neuromerge.routing.folder`)::

    manifest.json        method "wemoe", tasks, the routed MLPs (name, input module, linears), gate, router
                         depth / hidden size, the stored backbone tensors, base {ref, class, header_hash, shapes,
                         embedded}, storage bytes
    wemoe.safetensors    backbone.<name>: the backbone tensors that differ from the base (the Task-Arithmetic-merged
                         non-MLP tensors when the base is referenced); tau.<linear>.weight (T, out, in) and
                         tau.<linear>.bias (T, out): the task vectors τ_t of every routed linear (float32)
    router.safetensors   the state of the per-MLP routers (``WEMoEModel.routers``: keys ``<mlp>.<parameter>``)
    base/                with ``embed_base``: the backbone itself (``save_pretrained``: merged non-MLP tensors,
                         base MLP weights), so no backbone tensor is stored in ``wemoe.safetensors``

Loading builds the base (the referenced or embedded folder, or ``module=``), checks its header hash and the routed
linears' shapes, loads the stored backbone tensors into it and rebuilds the routers and the model: outputs equal
the saved model's. Without ``base_ref`` and ``embed_base`` every backbone tensor is stored and :func:`load_wemoe`
needs ``module=`` (a module of the same architecture: its tensors are all replaced).

``neuromerge route build wemoe`` (:func:`cli_build`) builds one from a Hugging Face base, PEFT adapters and a task
file (:func:`neuromerge.routing.build_config.build_wemoe_from_config`); from Python, build the model with
:func:`neuromerge.data_aware.wemoe.wemoe_merge_models` and save it with :func:`save_wemoe`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from neuromerge.data_aware.wemoe import MLPGroup, Router, WEMoEModel, _key
from neuromerge.errors import CheckpointError, CompatibilityError, ConfigError
from neuromerge.io.writer import AtomicOutput
from neuromerge.routing.cli import register_builder
from neuromerge.routing.folder import (
    BASE_DIR,
    FORMAT,
    MANIFEST,
    ROUTER_FILE,
    VERSION,
    Heads,
    _base_module,
    _base_path,
    _build_base,
    _check_shapes,
    _copy_tokenizer,
    _header_hash,
    _load_tensors,
    manifest_ref,
    read_heads,
    read_manifest,
    write_trust,
)

METHOD = "wemoe"
WEMOE_FILE = "wemoe.safetensors"
BACKBONE_PREFIX = "backbone."
TAU_PREFIX = "tau."


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _changed(state: dict[str, torch.Tensor], ref: nn.Module | None, where: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that differ from ``ref``'s state dict (all of them when ``ref`` is None), cloned for
    safetensors; :class:`CompatibilityError` when ``ref`` lacks one or holds it in another shape."""
    ref_state = ref.state_dict() if ref is not None else {}
    out = {}
    for name, t in state.items():
        r = ref_state.get(name)
        if ref is not None and (r is None or r.shape != t.shape):
            found = "no such tensor" if r is None else f"shape {list(r.shape)}"
            raise CompatibilityError(f"base {where} does not fit the WEMoE backbone: {name} has {found}, the backbone "
                                     f"{list(t.shape)}")
        if r is None or r.dtype != t.dtype or not torch.equal(r, t.to(r.device)):
            out[BACKBONE_PREFIX + name] = t.detach().cpu().contiguous().clone()
    return out


def save_wemoe(model: WEMoEModel, folder: str | os.PathLike[str], *, base_ref: str | None = None,
               embed_base: bool = False, extra: dict | None = None, force: bool = False,
               tasks: Sequence[str] | None = None, heads: Heads | None = None,
               inputs: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder`` (see the module docstring); returns the folder's path.

    ``base_ref``: a local transformers folder or cached HF id of the base θ0 the model was built on (its header hash
    is recorded; it is loaded once to find the backbone tensors that differ from it). ``embed_base``: write the
    backbone itself to ``base/`` (transformers backbones only; the tokenizer is copied from a ``base_ref`` folder).
    With neither, the whole backbone is stored. ``tasks``: the experts' names (default ``task0``, ``task1``…).
    ``force`` replaces an existing folder. Writing is atomic (:class:`~neuromerge.io.writer.AtomicOutput`).
    ``heads`` (task → ``{"weight", "bias"}``) and ``inputs``: :func:`neuromerge.routing.folder.write_trust`
    (WEMoE's per-MLP routers are not task classifiers: no ``router_validation``).
    """
    backbone = model.backbone
    base_ref = manifest_ref(base_ref)
    n_experts = int(model.experts)
    names = list(tasks) if tasks is not None else [f"task{i}" for i in range(n_experts)]
    if len(names) != n_experts:
        raise ConfigError(f"{len(names)} task names for a WEMoE model of {n_experts} experts")
    if embed_base and not hasattr(backbone, "save_pretrained"):
        raise ConfigError(f"embed_base needs a transformers backbone, got {type(backbone).__name__}")
    shapes = {f"{lin}.weight": list(backbone.get_submodule(lin).weight.shape) for g in model.groups
              for lin in g.linears}
    taus: dict[str, torch.Tensor] = {}
    for lin in (lin for g in model.groups for lin in g.linears):
        for part, prefix in (("weight", "dw__"), ("bias", "db__")):
            t = getattr(model, prefix + _key(lin))
            if t is not None:
                taus[f"{TAU_PREFIX}{lin}.{part}"] = t.detach().cpu().float().contiguous()
    routers = {k: v.detach().cpu().contiguous() for k, v in model.routers.state_dict().items()}
    state = backbone.state_dict()
    with AtomicOutput(Path(folder), force=force, inputs=[base_ref]) as tmp:
        path: Path | None = None
        if embed_base:
            path = tmp / BASE_DIR
            backbone.save_pretrained(path)
            if base_ref is not None and Path(base_ref).is_dir():
                _copy_tokenizer(Path(base_ref), path)
        elif base_ref is not None:
            path = _base_path(Path(folder), {"ref": base_ref}, None)
        header_hash = _header_hash(path) if path is not None else None
        ref = _build_base(path, type(backbone).__name__) if path is not None else None
        stored = _changed(state, ref, BASE_DIR if embed_base else str(base_ref))
        del ref
        save_file({**stored, **taus}, str(tmp / WEMOE_FILE), metadata={"format": "pt"})
        save_file(routers, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        trust = write_trust(tmp, heads=heads, inputs=inputs)
        first = next(iter(model.routers.values()))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "method": METHOD,
            "tasks": names,
            "wemoe": {
                "file": WEMOE_FILE,
                "gate": model.gate,
                "experts": n_experts,
                "groups": [{"name": g.name, "input_module": g.input_module, "linears": list(g.linears),
                            "hidden": backbone.get_submodule(g.linears[0]).in_features} for g in model.groups],
                "backbone_tensors": sorted(k[len(BACKBONE_PREFIX):] for k in stored),
            },
            "router": {"config": {"kind": "wemoe", "depth": int(first.depth), "experts": n_experts,
                                  "routers": len(model.groups)},
                       "feature": {"kind": "mlp_input", "reduce": "token_mean", "mask_kwarg": "attention_mask"}},
            "base": {"ref": base_ref, "embedded": bool(embed_base), "class": type(backbone).__name__,
                     "header_hash": header_hash, "shapes": shapes, "is_backbone": bool(embed_base)},
            "storage_bytes": {"backbone": _nbytes(stored), "task_vectors": _nbytes(taus), "routers": _nbytes(routers)},
            **trust,
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def _backbone(folder: Path, doc: dict[str, Any], base: str | os.PathLike[str] | None, module: nn.Module | None,
              check_hash: bool) -> nn.Module:
    """The base module of the folder: ``module``, else built from the embedded / referenced base (its header hash
    checked); the routed linears' shapes checked."""
    info = doc["base"]
    module, where = _base_module(folder, info, base, module, check_hash, "load_wemoe")
    _check_shapes(module, info.get("shapes", {}), where)
    return module


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_wemoe(folder: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
               module: nn.Module | None = None, check_hash: bool = True) -> WEMoEModel:
    """Rebuild the :class:`WEMoEModel` of a ``wemoe`` routed-model folder (eval mode).

    ``base`` overrides the base model's location; ``module`` replaces the base altogether (the model the manifest's
    base describes — for an embedded base the backbone itself — or any module of the architecture when the folder
    stores the whole backbone); it is modified in place. Errors: :class:`CheckpointError` for a missing / unreadable
    file or tensor, :class:`CompatibilityError` when the base differs (header hash, shapes) or the routers' state
    does not fit.
    """
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc.get("method") != METHOD:
        raise CheckpointError(f"{folder / MANIFEST} is a {doc.get('method')!r} routed model, not {METHOD!r}")
    spec = doc["wemoe"]
    tensors = _load_tensors(folder / spec.get("file", WEMOE_FILE))
    router_state = _load_tensors(folder / ROUTER_FILE)
    backbone = _backbone(folder, doc, base, module, check_hash)
    stored = _split(tensors, BACKBONE_PREFIX)
    missing = sorted(set(spec.get("backbone_tensors", [])) - set(stored))
    if missing:
        raise CheckpointError(f"{WEMOE_FILE} of {folder} lacks backbone tensors the manifest lists: {missing[:5]}")
    try:
        unexpected = backbone.load_state_dict(stored, strict=False).unexpected_keys
    except RuntimeError as e:
        raise CompatibilityError(f"the stored backbone tensors of {folder} do not fit the base: "
                                 f"{str(e).splitlines()[-1].strip()}") from None
    if unexpected:
        raise CompatibilityError(f"the base has no tensors {unexpected[:5]} stored in {folder / WEMOE_FILE}")
    taus = _split(tensors, TAU_PREFIX)
    groups = [MLPGroup(g["name"], g["input_module"], tuple(g["linears"])) for g in spec["groups"]]
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for lin in (lin for g in groups for lin in g.linears):
        if f"{lin}.weight" not in taus:
            raise CheckpointError(f"task vector {TAU_PREFIX}{lin}.weight is missing from {folder / WEMOE_FILE}")
        deltas[lin] = (taus[f"{lin}.weight"], taus.get(f"{lin}.bias"))
    depth, n_experts = int(doc["router"]["config"]["depth"]), int(spec["experts"])
    with torch.device("meta"):  # no initialization work: every parameter is assigned from the stored state
        routers = nn.ModuleDict({_key(g["name"]): Router(int(g["hidden"]), n_experts, depth, 0.0)
                                 for g in spec["groups"]})
    try:
        routers.load_state_dict(router_state, assign=True)
    except RuntimeError as e:
        raise CompatibilityError(f"{ROUTER_FILE} of {folder} does not match its config: "
                                 f"{str(e).splitlines()[0]}") from None
    model = WEMoEModel(backbone, groups, deltas, {g.name: routers[_key(g.name)] for g in groups},
                       gate=spec["gate"]).eval()
    model.heads = read_heads(folder, doc)
    return model


def cli_build(params: dict[str, Any], out: Path, *, force: bool = False, source: Path | None = None,
              allow_download: bool = False) -> Path:
    """``neuromerge route build wemoe -o OUT --config CONFIG``: a Hugging Face base + PEFT LoRA adapters + task data
    (:class:`neuromerge.routing.build_config.RouteBuildConfig`; ``params`` are WEMoE's)."""
    from neuromerge.routing.build_config import build_wemoe_from_config

    return build_wemoe_from_config(params, Path(out), force=force, source=source, allow_download=allow_download)


register_builder("wemoe", cli_build)

__all__ = ["METHOD", "WEMOE_FILE", "cli_build", "load_wemoe", "save_wemoe"]
