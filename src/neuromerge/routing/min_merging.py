"""MIN-Merging's enhancement stage as pure functions (Liang, arXiv 2510.17890; no public code; docs/methods/spec.md §3).

A *layer* is a transformer block (CNN block), found from a module name by :func:`block_index`
(``encoder.layer.{l}.``, ``model.layers.{l}.`` / ``layers.{l}.``, ``_blocks.{l}.``). With task ``t``'s LoRA expert
``ΔW_{t,m} = B_{t,m} A_{t,m}``:

1. **Layer importance** (reconstruction): ``I_{t,l} = Perf_t(full expert) − Perf_t(expert without its LoRA at
   layer l)`` on task ``t``'s validation inputs (:func:`layer_importance`, the evaluation is a callback).
   ``Core_t = {l : I_{t,l} > δ}`` (optionally capped to the ``top_fraction`` most important layers,
   :func:`core_layers`); layers with ``I_{t,l} < −ε`` (dropping them *improves* validation by more than ε) are
   pruned from the expert (:func:`harmful_layers`, :func:`drop_blocks`).
2. **Neuron importance** (reconstruction): ``s_{t,m,i} = ‖ΔW_{t,m}[i,:]‖₂ · E_x|a_{m,i}(x)|`` with ``a_{m,i}`` the
   output of neuron ``i`` of module ``m`` in the expert model on calibration inputs of task ``t``
   (:func:`mean_abs_outputs`); the top ``keep`` fraction of rows (output neurons, rows of ``B``) are kept and the
   others zeroed (:func:`neuron_scores`, :func:`keep_top_rows`). ``‖(BA)[i,:]‖₂² = B_i (A Aᵀ) B_iᵀ`` is computed
   without materializing ``ΔW``.
3. The hierarchical merge uses :class:`~neuromerge.routing.policy.HierarchicalGates` with, per expert, the module
   names of its core layers (:func:`core_modules`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuromerge.errors import ConfigError
from neuromerge.routing.cli import register_builder

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers|h|blocks|_blocks)\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """Block index of a module / tensor name (``encoder.layer.3.attention.self.query`` → 3,
    ``model.layers.0.mlp.up_proj`` → 0, ``_blocks.5._expand_conv`` → 5); None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def group_by_block(modules: Iterable[str]) -> dict[int, list[str]]:
    """``{block: [module names]}`` in increasing block order (names outside the blocks are left out)."""
    out: dict[int, list[str]] = {}
    for m in modules:
        b = block_index(m)
        if b is not None:
            out.setdefault(b, []).append(m)
    return dict(sorted(out.items()))


def drop_blocks(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], blocks: Iterable[int]) -> Factors:
    """``factors`` without the modules of ``blocks``."""
    gone = set(blocks)
    return {m: f for m, f in factors.items() if block_index(m) not in gone}


def layer_importance(evaluate: Callable[[int | None], float], blocks: Iterable[int]) -> tuple[float, dict[int, float]]:
    """``(Perf(full), {l: Perf(full) − Perf(without l)})``; ``evaluate(None)`` scores the full expert,
    ``evaluate(l)`` the expert without its update at block ``l``."""
    full = float(evaluate(None))
    return full, {int(b): full - float(evaluate(int(b))) for b in blocks}


def core_layers(importance: Mapping[int, float], delta: float = 0.0, top_fraction: float | None = None) -> set[int]:
    """``{l : I_l > δ}``; with ``top_fraction`` at most ``⌈top_fraction · L⌉`` of them (largest ``I`` first, ties to
    the lower block)."""
    core = sorted((b for b, v in importance.items() if v > delta), key=lambda b: (-importance[b], b))
    if top_fraction is not None:
        if not 0 <= top_fraction <= 1:
            raise ConfigError(f"core top_fraction must lie in [0, 1], got {top_fraction}")
        core = core[: math.ceil(top_fraction * len(importance))]
    return set(core)


def harmful_layers(importance: Mapping[int, float], epsilon: float) -> set[int]:
    """``{l : I_l < −ε}``: layers whose removal improves the validation score by more than ``ε``."""
    return {b for b, v in importance.items() if v < -epsilon}


def row_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖(B A)[i,:]‖₂`` for every row ``i`` (float64), via ``B_i (A Aᵀ) B_iᵀ``."""
    a64, b64 = a.double(), b.double()
    gram = a64 @ a64.T
    return ((b64 @ gram) * b64).sum(dim=1).clamp_min(0).sqrt()


def neuron_scores(a: torch.Tensor, b: torch.Tensor, act_mean: torch.Tensor) -> torch.Tensor:
    """``s_i = ‖ΔW[i,:]‖₂ · E_x|a_i(x)|`` for ``ΔW = B A`` and ``act_mean (out,)`` (float64)."""
    if act_mean.shape != (b.shape[0],):
        raise ConfigError(f"activation means of shape {tuple(act_mean.shape)} do not match {b.shape[0]} neurons")
    return row_norms(a, b) * act_mean.double()


def keep_count(n: int, keep: float) -> int:
    """``⌈keep · n⌉`` rows kept (``keep`` in [0, 1])."""
    if not 0 <= keep <= 1:
        raise ConfigError(f"neuron keep ratio must lie in [0, 1], got {keep}")
    return min(n, math.ceil(keep * n - 1e-9))


def keep_top_rows(b: torch.Tensor, scores: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B with all but the top ⌈keep·out⌉ rows by score zeroed, kept-row mask)``; ties go to the lower row."""
    n = b.shape[0]
    k = keep_count(n, keep)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return b * mask[:, None].to(b.dtype), mask


def prune_neurons(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], act_means: Mapping[str, torch.Tensor],
                  keep: float) -> tuple[Factors, dict[str, float]]:
    """Apply :func:`keep_top_rows` to every module's ``B`` (``act_means[m]`` = ``E|a_m|``); returns the pruned
    factors and each module's pruned fraction. ``keep = 1`` returns the factors unchanged."""
    out: Factors = {}
    pruned: dict[str, float] = {}
    for m, (a, b) in factors.items():
        if keep >= 1:
            out[m], pruned[m] = (a, b), 0.0
            continue
        new_b, mask = keep_top_rows(b, neuron_scores(a, b, act_means[m]), keep)
        out[m] = (a, new_b)
        pruned[m] = 1.0 - float(mask.float().mean())
    return out, pruned


def core_modules(core: Sequence[set[int]], factors: Sequence[Mapping[str, Any]]) -> dict[int, set[str]]:
    """``{expert j: module names of expert j that lie in its core blocks}`` for
    :class:`~neuromerge.routing.policy.HierarchicalGates`."""
    return {j: {m for m in f if block_index(m) in core[j]} for j, f in enumerate(factors)}


def _channel_abs_sum(out: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """``(Σ |out| per channel, count)``: channels are the last dim of ``(B, T, C)`` / ``(B, C)`` outputs (positions
    with ``mask == 0`` skipped) and dim 1 of ``(B, C, H, W)`` conv outputs."""
    x = out.detach().float().abs()
    if x.dim() == 4:
        return x.sum(dim=(0, 2, 3)), float(x.shape[0] * x.shape[2] * x.shape[3])
    if x.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=(0, 1)), float(m.sum())
    flat = x.reshape(-1, x.shape[-1])
    return flat.sum(dim=0), float(flat.shape[0])


def mean_abs_outputs(model: nn.Module, names: Iterable[str],
                     batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """``E_x|a_{m,i}(x)|`` per module ``m`` of ``names``: the mean absolute output of each output neuron over the
    calibration ``batches`` (``(forward kwargs, mask or None)``; padded positions excluded), under ``no_grad``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            s, c = _channel_abs_sum(out if isinstance(out, torch.Tensor) else out[0], current["mask"])
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0.0) + c

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for inputs, mask in batches:
                current["mask"] = mask
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1.0) for n in sums}


def cli_build(params: dict[str, Any], out: Path, *, force: bool = False, source: Path | None = None,
              allow_download: bool = False) -> Path:
    """``neuromerge route build min_merging -o OUT --config CONFIG``: a Hugging Face base + PEFT LoRA adapters + task
    data (:class:`neuromerge.routing.build_config.RouteBuildConfig`)."""
    from neuromerge.routing.build_config import build_from_config

    return build_from_config("min_merging", params, Path(out), force=force, source=source,
                             allow_download=allow_download)


register_builder("min_merging", cli_build)

__all__ = [
    "block_index",
    "cli_build",
    "core_layers",
    "core_modules",
    "drop_blocks",
    "group_by_block",
    "harmful_layers",
    "keep_count",
    "keep_top_rows",
    "layer_importance",
    "mean_abs_outputs",
    "neuron_scores",
    "prune_neurons",
    "row_norms",
]
