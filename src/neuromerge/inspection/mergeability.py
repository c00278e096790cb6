"""Per-component mergeability on a bench suite: the signal MERGE searches on (docs/methods/spec.md §2).

For a component ``c`` (:mod:`.components`: ``layer.N/attention``, ``layer.N/mlp``, …) and the in-domain tasks
``t = 1..T`` with experts ``θ_t``:

* the probe merges **only** ``c`` by Task Arithmetic with ``λ = 1/T``: ``θ̄^c = θ0^c + (1/T)·Σ_s τ_s^c`` — the
  experts' mean on that component, the natural "merge this component" operator (no coefficient to tune, so
  components are compared on equal terms; a tuned λ would mix the component's mergeability with the tuning);
* task ``t`` is scored with **its own expert everywhere else** and its own head: backbone
  ``θ_t`` with ``c`` replaced by ``θ̄^c``;
* ``loss_t(c) = score(θ_t, t) − score(θ_t[c ← θ̄^c], t)`` on the validation split (accuracy points in [0, 1]; for
  perplexity tasks the sign is flipped so that a positive loss is always worse); the row reports every
  ``loss_t`` and their mean. Small losses mark components that can be shared; large ones, components that
  must stay per task.

Tensors the suite never merges (:meth:`Suite.merge_exclude`) and non-floating tensors are in no component.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch

from .components import component_of, component_order
from .report import Mergeability, MergeabilityRow
from .suite_pool import SuiteExperts

OPERATOR = "task arithmetic, λ = 1/T"

StateDict = dict[str, torch.Tensor]


def component_groups(state: StateDict, exclude: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Components of the floating, non-excluded tensors of ``state``: ``(component, tensor names)`` in
    component order, names in state order."""
    patterns = [re.compile(p) for p in exclude]
    groups: dict[str, list[str]] = {}
    for name, t in state.items():
        if t.is_floating_point() and not any(p.search(name) for p in patterns):
            groups.setdefault(component_of(name).name, []).append(name)
    return [(c, groups[c]) for c in sorted(groups, key=component_order)]


def merged_component(base: StateDict, experts: Sequence[StateDict], names: Sequence[str]) -> StateDict:
    """``θ0 + (1/T)·Σ_t (θ_t − θ0)`` on ``names``, computed as the float64 mean ``(1/T)·Σ_t θ_t`` (the same
    number, with one rounding to the stored dtype; experts that agree on a tensor give it back exactly)."""
    out: StateDict = {}
    for name in names:
        out[name] = torch.stack([e[name].to(torch.float64) for e in experts]).mean(dim=0).to(base[name].dtype)
    return out


def component_mergeability(se: SuiteExperts, *, progress: Callable[[Iterable, int, str], Iterable] | None = None,
                           components: Sequence[str] | None = None) -> Mergeability:
    """Mergeability rows of every component (or of ``components``) of the suite's backbone (module docstring)."""
    suite, budget = se.suite, se.budget
    bar = progress or (lambda items, total, desc: items)
    states = [e.backbone for e in se.experts]

    def score(backbone: StateDict, i: int) -> float:
        return float(suite.evaluate(backbone, se.experts[i].head, se.tasks[i], "val", budget))

    reference = {t.name: score(e.backbone, i) for i, (t, e) in enumerate(zip(se.tasks, se.experts, strict=True))}
    groups = component_groups(se.base, suite.merge_exclude())
    if components is not None:
        groups = [(c, n) for c, n in groups if c in set(components)]
    rows = []
    for comp, names in bar(groups, len(groups), "mergeability"):
        merged = merged_component(se.base, states, names)
        loss = {}
        for i, task in enumerate(se.tasks):
            got = score({**states[i], **merged}, i)
            ref = reference[task.name]
            loss[task.name] = got - ref if task.metric == "perplexity" else ref - got
        rows.append(MergeabilityRow(component=comp, tensors=len(names),
                                    parameters=sum(se.base[n].numel() for n in names), loss=loss,
                                    mean_loss=sum(loss.values()) / len(loss)))
    return Mergeability(suite=suite.name, quick=se.quick, mode=se.mode, seed=se.seed, operator=OPERATOR,
                        reference=reference, rows=rows)


__all__ = ["OPERATOR", "component_groups", "component_mergeability", "merged_component"]
