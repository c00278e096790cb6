"""In-memory merging of state dicts: the same methods, parameters and statistics as the streaming engine.

``merge_state_dicts("ties", base_sd, [sd_a, sd_b], parameters={"density": 0.2})`` returns the merged state dict.
Every registered method is also reachable as ``neuromerge.functional.<name>(base, models, **parameters)``.
Global statistics (the global top-k threshold of TIES / NeuroMerging) are computed exactly by the same radix
select as the engine, so an in-memory merge equals the streamed one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .config import MergeConfig, ModelEntry, ParamResolver, validate_method_parameters
from .config import layer_index as _layer_index
from .engine import fused as fused_path
from .engine.layout import LayoutRules, from_canonical, to_canonical
from .engine.plan import plan_statistics
from .engine.reading import kernel_inputs
from .engine.stats import trim_statistics
from .engine.threads import one_torch_thread
from .methods import MergeInput
from .numeric import to_output_dtype
from .tensors import rng

StateDict = Mapping[str, torch.Tensor]


def merge_state_dicts(method: str, base: StateDict, models: Sequence[StateDict], *,
                      parameters: Mapping[str, Any] | None = None,
                      model_parameters: Sequence[Mapping[str, Any]] | None = None,
                      exclude: Sequence[str] | None = None, seed: int = 0, model_type: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """Merge ``models`` onto ``base`` with ``method``; tensors matching ``exclude`` and non-floating tensors are
    taken from the base. Tensors are assumed ``(out, in)`` unless ``model_type`` names a Conv1D architecture."""
    entries = [ModelEntry(model=f"<model {i}>", parameters=dict((model_parameters or [{}] * len(models))[i]))
               for i in range(len(models))]
    kwargs: dict[str, Any] = {"merge_method": method, "base_model": "<base>", "models": entries,
                              "parameters": dict(parameters or {}), "seed": seed}
    if exclude is not None:
        kwargs["exclude"] = list(exclude)
    config = MergeConfig(**kwargs)
    validate_method_parameters(config)
    impl = config.method_class()()
    patterns = [re.compile(p) for p in config.exclude]
    layers = [i for i in (_layer_index(n) for n in base) if i is not None]
    resolver = ParamResolver(config, max(layers) + 1 if layers else None)
    rules = LayoutRules.build(model_type)
    names = [n for n, t in base.items() if t.is_floating_point() and not any(p.search(n) for p in patterns)]
    layouts = {n: rules.classify(n, tuple(base[n].shape))[0] for n in names}

    def canonical(n: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return (to_canonical(base[n].float(), layouts[n]),
                [to_canonical(m[n].float(), layouts[n]) for m in models])

    trim = None
    spec = plan_statistics(impl, resolver, names)  # the engine's rule: one trim per (model, density value)
    if spec is not None:
        stat_names = [n for n in names if n in spec.tensors]
        with ThreadPoolExecutor(max_workers=1, initializer=one_torch_thread) as pool:
            trim = trim_statistics(spec.groups, stat_names, lambda n: n, canonical, len(models), executor=pool,
                                   progress=lambda _: iter, l1=spec.l1)
    out = dict(base)
    for n in names:
        b, ms = canonical(n)
        params, per_model = resolver.resolve(n)
        stats = trim.for_tensor(n) if trim is not None else None

        def uniform(t: int, shape: tuple[int, ...], _n: str = n) -> torch.Tensor:
            return rng.draw(seed, impl.name, _n, t, 0, shape)

        kind = "point" if layouts[n] == "point" else "neuronal"
        rows = (0, b.shape[0] if b.dim() else 1)
        if fused_path.fuses(impl, params, per_model) and all(
                t.device.type == "cpu" for t in (base[n], *(m[n] for m in models))):
            # the engine's fast path, so that an in-memory merge equals the streamed one
            stored = kernel_inputs([to_canonical(t[n], layouts[n]) for t in (base, *models)])
            fx = MergeInput(name=n, kind=kind, base=stored[0], models=stored[1:], params=params, per_model=per_model,
                            stats=stats, rows=rows, full_shape=tuple(b.shape))
            fused = fused_path.merge_fused(impl, fx, base[n].dtype)
            if fused is not None:
                out[n] = _output(from_canonical(fused[0], layouts[n], base[n].shape), base[n].dtype, n)
                continue
        x = MergeInput(name=n, kind=kind, base=b, models=ms, params=params, per_model=per_model, stats=stats,
                       rows=rows, full_shape=tuple(b.shape), uniform=uniform)
        out[n] = _output(from_canonical(impl.merge(x), layouts[n], base[n].shape), base[n].dtype, n)
    return out


def _output(merged: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``merged`` in the base's ``dtype``; a value beyond its range is an error, as in the engine."""
    return to_output_dtype(merged, dtype, tensor=name, mode="error")[0]


def __getattr__(name: str) -> Callable[..., dict[str, torch.Tensor]]:
    from .methods import get

    if name.startswith("_"):
        raise AttributeError(name)
    cls = get(name)

    def run(base: StateDict, models: Sequence[StateDict], **parameters: Any) -> dict[str, torch.Tensor]:
        return merge_state_dicts(cls.name, base, models, parameters=parameters)

    run.__doc__ = f"In-memory {cls.name}: {cls.summary}"
    return run
