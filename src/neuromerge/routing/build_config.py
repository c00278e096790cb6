"""``neuromerge route build METHOD -o OUT --config CONFIG``: a routed model from a user's Hugging Face model.

The config is a :class:`RouteBuildConfig`: the user's model and task data (:class:`~neuromerge.tasks.hf.
UserModelConfig`: ``base``, ``tasks``, ``experts`` — PEFT LoRA adapters or full checkpoints — and the data budget)
plus the routed method's ``variant``, ``params`` and ``embed_base``. :func:`validate_route_build` lists every
problem before anything is loaded or fitted; :func:`build_inputs` opens the model as a
:class:`~neuromerge.tasks.TaskSet` (:func:`~neuromerge.tasks.hf.open_user_model`); :func:`build_from_config`
(MIN-Merging, Twin, EMR: :mod:`.build`) and :func:`build_wemoe_from_config` (WEMoE) build and save.

Each task's data is split 60 / 20 / 20 (seeded); the train split feeds the router and the calibration, the validation
split the router choice and MIN-Merging's layer importance, scored by a linear probe fit on the expert's final
features (the adapters' own heads are not used) — or, for a causal LM and a task entry with ``label_words``, by
label-word likelihood. The routed folder records what the build read (:func:`input_record`: the manifest's
``inputs``), the router's validation accuracy per task against chance (``router_validation``) and each task's probe
head (``heads/<task>.safetensors``): :mod:`neuromerge.routing.folder`. Relative paths resolve against the config
file's folder (:mod:`neuromerge.paths`); the routed folder records absolute paths, so it loads from any working
directory. ``base`` may be a Hugging Face id in the
local cache (downloaded only with ``--allow-download``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError

from ..errors import TaskError, validation_lines
from ..paths import config_dir
from ..tasks.contract import Budget, Expert, Split, StateDict, TaskData
from ..tasks.hf import HFSuite, UserModelConfig, check_user_model, open_user_model, resolved_config
from ..tasks.splits import SPLIT_FRACTIONS


class RouteBuildConfig(UserModelConfig):
    """``neuromerge route build`` for a Hugging Face base and its experts (module docstring)."""

    variant: str | None = Field(None, description="a variant of METHOD (e.g. min_merging:no_hierarchy)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    embed_base: bool = Field(False, description="store the base weights in the routed folder")


def validate_route_build(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                         allow_download: bool = False, check_params: Callable[[Mapping[str, Any]], Any] | None = None,
                         out: Path | None = None, force: bool = False) -> tuple[RouteBuildConfig, str]:
    """``(config with absolute paths, base reference to record)`` of a ``route build`` config, before anything is
    loaded or fitted; :class:`~neuromerge.errors.TaskError` listing *every* problem, one per line, each prefixed by
    the config file (``source``, relative paths resolved against its folder) or ``route build config``:

    the fields (:class:`RouteBuildConfig`), the user's model (:func:`~neuromerge.tasks.hf.check_user_model`: the
    base, the task file and its data files, each expert), the method's parameters (``check_params``) and the output
    folder (exists without ``force``)."""
    where = f"{source}: " if source is not None else "route build config: "
    problems: list[str] = []
    cfg: RouteBuildConfig | None = None
    try:
        cfg = RouteBuildConfig.model_validate(dict(raw))
    except ValidationError as err:
        problems += validation_lines(err)
    found = check_user_model(raw, config_dir(source), allow_download=allow_download)
    problems += found.problems
    params = raw.get("params", {})
    if check_params is not None and isinstance(params, Mapping):  # checked even when other fields are wrong
        try:
            check_params(params)
        except ValidationError as err:
            problems += validation_lines(err, "params.")
        except TaskError as err:
            problems += [f"params: {line}" for line in str(err).splitlines()]
    lines = [where + p for p in problems]
    if out is not None and Path(out).exists() and not force:
        lines.append(f"output folder {out} exists; pass --force to replace it")
    if lines or cfg is None:
        raise TaskError("\n".join(lines))
    return resolved_config(cfg, found), str(found.base_ref)  # type: ignore[return-value]


def build_inputs(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                 allow_download: bool = False, checked: tuple[RouteBuildConfig, str] | None = None
                 ) -> tuple[RouteBuildConfig, HFSuite, Budget, list[TaskData], StateDict, list[Expert]]:
    """A validated :class:`RouteBuildConfig` (:func:`validate_route_build`, or ``checked``: its result) and what a
    builder needs from it (:func:`~neuromerge.tasks.hf.open_user_model`): the suite over the base, the budget, the
    tasks (router order), the base state and one expert per task (its state + a probe head)."""
    cfg, _ = checked if checked is not None else validate_route_build(raw, source=source,
                                                                      allow_download=allow_download)
    ts = open_user_model(cfg)
    tasks = [*ts.tasks, *ts.ood]
    if ts.ood:  # a routed model routes between the experts it holds: every expert's task is one of them
        raise TaskError(f"task(s) {', '.join(t.name for t in ts.ood)} are out of domain (in_domain: false) in "
                        f"{cfg.tasks}; a routed model's experts need in-domain tasks")
    return cfg, ts.suite, ts.budget, tasks, ts.base, ts.experts  # type: ignore[return-value]


def split_sha256(split: Split) -> str:
    """SHA-256 of a split's inputs (texts, or an image tensor's bytes) and labels, in split order."""
    h = hashlib.sha256()
    if isinstance(split.inputs, torch.Tensor):
        h.update(split.inputs.detach().cpu().contiguous().numpy().tobytes())
    else:
        for t in split.inputs:
            h.update(str(t).encode())
            h.update(b"\x1f")
    h.update(b"\x1e")
    h.update(split.labels.numpy().tobytes())
    return h.hexdigest()


def input_record(tasks: Sequence[TaskData], suite: Any, *, seed: int, files: Mapping[str, str] | None = None,
                 router_validation: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest's ``inputs``: per task, ``seed`` (of the 60 / 20 / 20 split), ``file`` (its data file, when
    known), ``fingerprint`` (the splits' content hash) and per split ``train`` / ``val`` / ``test``:

    ``n`` (examples in the split), ``used`` (the build read the split's first ``used`` examples: router, probe,
    calibration, layer importance, WEMoE's unlabelled test inputs — the suite's ``reads``, when it counts them),
    ``router`` (the first ``router`` examples trained the router — train — or scored it — val), ``rows`` (each
    example's record index in the data file, in split order) and ``sha256`` (:func:`split_sha256`). Rows outside
    every ``rows[:used]`` were never read by the build."""
    reads: Mapping[tuple[str, str], int] = getattr(suite, "reads", None) or {}
    out: dict[str, Any] = {}
    for t in tasks:
        rv = (router_validation or {}).get(t.name) or {}
        entry: dict[str, Any] = {"seed": int(seed), "fractions": list(SPLIT_FRACTIONS)}
        if files and t.name in files:
            entry["file"] = str(files[t.name])
        entry["fingerprint"] = t.fingerprint
        for split in ("train", "val", "test"):
            data: Split = getattr(t, split)
            router = int(rv.get("train_n", 0)) if split == "train" else int(rv.get("n", 0)) if split == "val" else 0
            entry[split] = {"n": len(data), "used": int(reads.get((t.name, split), router)), "router": router,
                            "rows": list(data.rows) if data.rows is not None else None, "sha256": split_sha256(data)}
        out[t.name] = entry
    return out


def _data_files(cfg: RouteBuildConfig, names: Sequence[str]) -> dict[str, str]:
    """Task name → absolute data file of its task-file entry."""
    from ..tasks.taskfile import data_file, user_entries

    return {e.name: str(data_file(cfg.tasks, e)) for e in user_entries(cfg.tasks, list(names))}


def build_from_config(method: str, raw: Mapping[str, Any], out: Path, *, force: bool = False,
                      source: str | os.PathLike[str] | None = None, allow_download: bool = False) -> Path:
    """Build and save a routed model from a :class:`RouteBuildConfig` (the ``route build`` CLI; ``source``: the
    config file, relative paths resolve against its folder; ``allow_download``: a base given as a hub id missing
    from the cache may be downloaded)."""
    from .build import VARIANTS, build_variant
    from .folder import save_routed

    variant = raw.get("variant") or method
    if not isinstance(variant, str) or variant.split(":")[0] != method or (variant not in VARIANTS
                                                                          and variant != "emr"):
        raise TaskError(f"variant {variant!r} is not a variant of {method!r}; known: {', '.join(VARIANTS)}")
    variant = "emr:router" if variant == "emr" else variant
    if variant == "min_merging:uniform_router" or VARIANTS[variant].oracle:
        raise TaskError(f"{variant} is a bench ablation; a saved routed model needs a trained router")
    checked = validate_route_build(raw, source=source, allow_download=allow_download, out=out, force=force,
                                   check_params=lambda p: VARIANTS[variant].params.model_validate(
                                       {**dict(p), **VARIANTS[variant].overrides}))
    cfg, suite, budget, tasks, base, experts = build_inputs(raw, checked=checked)
    built = build_variant(variant, suite, base, experts, tasks, budget, cfg.params, cfg.seed)
    embed = cfg.embed_base or built.backbone_changed
    extra = {"variant": variant, "storage_bytes": built.storage_bytes, "meta": built.meta,
             "config": cfg.model_dump()}
    names = [t.name for t in tasks]
    inputs = input_record(tasks, suite, seed=cfg.seed, files=_data_files(cfg, names),
                          router_validation=built.router_validation)
    return save_routed(built.model, out, base_ref=checked[1], embed_base=embed, tasks=names,
                       method=method, extra=json.loads(json.dumps(extra, default=str)), force=force,
                       heads={e.task: e.head for e in experts}, router_validation=built.router_validation,
                       inputs=inputs)


def build_wemoe_from_config(raw: Mapping[str, Any], out: Path, *, force: bool = False,
                            source: str | os.PathLike[str] | None = None, allow_download: bool = False) -> Path:
    """``neuromerge route build wemoe``: WEMoE's routers trained by entropy minimization on the unlabelled test
    split of each task file entry (``params``: :class:`~neuromerge.data_aware.wemoe.WEMoEParams`), saved with
    :func:`neuromerge.routing.wemoe.save_wemoe`."""
    from ..data_aware.wemoe import WEMoEParams, wemoe_merge_models
    from .wemoe import save_wemoe

    if raw.get("variant") not in (None, "wemoe"):
        raise TaskError(f"wemoe has no variant {raw.get('variant')!r}")
    checked = validate_route_build(raw, source=source, allow_download=allow_download, out=out, force=force,
                                   check_params=WEMoEParams.model_validate)
    cfg, suite, budget, tasks, base, experts = build_inputs(raw, checked=checked)
    params = WEMoEParams.model_validate(cfg.params)
    info: dict[str, Any] = {}
    model = wemoe_merge_models(suite, base, [e.backbone for e in experts], [e.head for e in experts], tasks, budget,
                               params, seed=cfg.seed, info=info)
    extra = {"variant": "wemoe", "meta": info, "config": cfg.model_dump()}
    names = [t.name for t in tasks]
    return save_wemoe(model, out, base_ref=checked[1], embed_base=cfg.embed_base, tasks=names,
                      extra=json.loads(json.dumps(extra, default=str)), force=force,
                      heads={e.task: e.head for e in experts},
                      inputs=input_record(tasks, suite, seed=cfg.seed, files=_data_files(cfg, names)))


__all__ = ["RouteBuildConfig", "build_from_config", "build_inputs", "build_wemoe_from_config", "input_record",
           "split_sha256", "validate_route_build"]
