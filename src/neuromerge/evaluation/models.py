"""The models :func:`~neuromerge.evaluation.evaluate` scores: a merged folder, a routed folder, or the base.

- a **merged folder** (``neuromerge merge``'s output, any model folder or ``.safetensors`` file): its backbone
  tensors, found by name — exactly, or as ``<prefix>.<name>`` when the folder holds a model with a task head
  (``bert.encoder…``); every backbone tensor must be there with the base's shape. A merged **LoRA adapter**
  (``--output-format lora``, or any PEFT adapter folder) is read as ``θ0 + s·B·A`` over the base;
- a **routed folder** (``neuromerge route build`` / MERGE: a ``manifest.json`` of format ``neuromerge-routed``):
  :func:`~neuromerge.routing.folder.load_routed`, scored through its own router;
- the **base**: the task set's pre-trained state.

A folder's per-task heads (``heads/<task>.safetensors``, or a routed model's ``heads``) come with it
(:mod:`.heads`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..errors import NeuromergeError, TaskError
from ..tasks.contract import StateDict, TaskSet

ModelKind = Literal["base", "merged", "adapter", "routed"]


@dataclass
class EvaluatedModel:
    """One scored model: a ``backbone`` state dict (base, merged folder, adapter) or a ``module`` (a routed model),
    the folder's own heads by task, and what the folder says about itself (``info``: the merge or routed method)."""

    name: str
    kind: ModelKind
    path: str | None = None
    backbone: StateDict | None = None
    module: nn.Module | None = None
    heads: dict[str, StateDict] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def is_routed_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a routed-model manifest (``manifest.json`` of format ``neuromerge-routed``)."""
    from ..routing.folder import FORMAT, MANIFEST

    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def check_model_path(path: str | os.PathLike[str]) -> str | None:
    """The problem with a model to score, as one line (None: it looks usable). Reads manifests and headers only."""
    from ..io.checkpoint import open_checkpoint
    from ..io.lora import is_adapter_folder
    from ..routing.folder import read_manifest

    p = Path(path).expanduser()
    if not p.exists():
        return f"model {path} does not exist"
    if (p / "manifest.json").is_file():
        try:
            read_manifest(p)
        except NeuromergeError as err:
            return f"model {path}: {err}"
        return None
    if is_adapter_folder(p):
        return None
    try:
        with open_checkpoint(p):
            pass
    except NeuromergeError as err:
        return f"model {path} is neither a model folder, a routed-model folder nor a LoRA adapter ({err})"
    return None


def read_backbone(path: str | os.PathLike[str], base: StateDict) -> StateDict:
    """The backbone tensors of a merged model (module docstring), cast to the base's dtypes; a one-line
    :class:`TaskError` naming the first tensor that is missing, ambiguous or of another shape."""
    from ..io.checkpoint import open_checkpoint

    try:
        ckpt = open_checkpoint(path)
    except NeuromergeError as err:
        raise TaskError(f"model {path}: {err}") from None
    with ckpt:
        names = ckpt.names()
        known = set(names)
        out: StateDict = {}
        for name, ref in base.items():
            found = name if name in known else None
            if found is None:
                hits = [n for n in names if n.endswith("." + name)]
                if len(hits) != 1:
                    why = "no tensor" if not hits else f"{len(hits)} tensors"
                    raise TaskError(f"model {path}: {why} named {name!r} (or *.{name}); is it a merge of this base?")
                found = hits[0]
            t = ckpt.read(found)
            if tuple(t.shape) != tuple(ref.shape):
                raise TaskError(f"model {path}: tensor {found!r} has shape {tuple(t.shape)}, the base has "
                                f"{tuple(ref.shape)}")
            out[name] = t.to(ref.dtype)
    return out


def _merge_info(path: Path) -> dict[str, Any]:
    """The merge method ``merge_report.json`` names (empty when the folder has none)."""
    try:
        rep = json.loads((path / "merge_report.json").read_text(encoding="utf-8"))
        return {"method": rep["summary"]["method"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def open_model(path: str | os.PathLike[str], ts: TaskSet, name: str | None = None) -> EvaluatedModel:
    """``path`` as an :class:`EvaluatedModel` over ``ts`` (module docstring), with its heads for ``ts``'s tasks."""
    from ..io.lora import is_adapter_folder
    from .heads import folder_heads

    p = Path(path).expanduser()
    problem = check_model_path(p)
    if problem is not None:
        raise TaskError(problem)
    label = name or p.name or str(path)
    widths = {e.task: (None if e.head is None else int(e.head["weight"].shape[1])) for e in ts.experts}
    if is_routed_folder(p):
        from ..routing.folder import load_routed, read_manifest

        doc = read_manifest(p)
        try:
            module = load_routed(p, module=ts.suite.module(ts.base)).eval()
        except NeuromergeError as err:
            raise TaskError(f"model {path}: {err}") from None
        info = {"method": doc.get("method"), "variant": (doc.get("extra") or {}).get("variant"),
                "tasks": doc.get("tasks")}
        return EvaluatedModel(label, "routed", str(p), module=module, info=info,
                              heads=folder_heads(p, module, ts.tasks, widths))
    if is_adapter_folder(p):
        expert_state = getattr(ts.suite, "expert_state", None)
        if expert_state is None:
            raise TaskError(f"model {path} is a LoRA adapter; suite {ts.suite.name!r} reads only full model folders")
        try:
            backbone, _ = expert_state(ts.base, p)
        except NeuromergeError as err:
            raise TaskError(f"model {path}: {err}") from None
        return EvaluatedModel(label, "adapter", str(p), backbone=backbone,
                              heads=folder_heads(p, None, ts.tasks, widths))
    backbone = read_backbone(p, ts.base)
    return EvaluatedModel(label, "merged", str(p), backbone=backbone, info=_merge_info(p) if p.is_dir() else {},
                          heads=folder_heads(p, None, ts.tasks, widths) if p.is_dir() else {})


__all__ = ["EvaluatedModel", "ModelKind", "check_model_path", "is_routed_folder", "open_model", "read_backbone"]
