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
label-word likelihood. Relative paths resolve against the config file's folder (:mod:`neuromerge.paths`); the routed
folder records absolute paths, so it loads from any working directory. ``base`` may be a Hugging Face id in the
local cache (downloaded only with ``--allow-download``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ..errors import TaskError, validation_lines
from ..paths import config_dir
from ..tasks.contract import Budget, Expert, StateDict, TaskData
from ..tasks.hf import HFSuite, UserModelConfig, check_user_model, open_user_model, resolved_config


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
    return save_routed(built.model, out, base_ref=checked[1], embed_base=embed, tasks=[t.name for t in tasks],
                       method=method, extra=json.loads(json.dumps(extra, default=str)), force=force)


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
    return save_wemoe(model, out, base_ref=checked[1], embed_base=cfg.embed_base, tasks=[t.name for t in tasks],
                      extra=json.loads(json.dumps(extra, default=str)), force=force)


__all__ = ["RouteBuildConfig", "build_from_config", "build_inputs", "build_wemoe_from_config",
           "validate_route_build"]
