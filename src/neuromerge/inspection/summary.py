"""The short text summary of ``neuromerge inspect`` and its suggested merge method.

**Suggestion rules** (whole-model statistics of :mod:`.report`; the first rule that holds decides):

1. ``single-expert`` — one expert: ``task_arithmetic`` (nothing to reconcile; tune λ on validation data).
2. ``near-identical`` — mean pairwise cosine ``>=`` :data:`NEAR_IDENTICAL_COSINE`: ``linear`` (weight averaging;
   experts that moved the same way lose nothing by averaging — Model Soups, Wortsman et al. 2022).
3. ``signs-agree`` — ``sign_agreement >=`` :data:`AGREEING_SIGNS` (the experts disagree on at most half the
   coordinates that unrelated updates would): ``task_arithmetic`` (a sum interferes little; trimming and sign
   election have little to fix — Ilharco et al. 2023).
4. ``orthogonal-conflicts`` — the signs conflict (rule 3 failed) and at least :data:`ORTHOGONAL_SHARE` of the
   update energy is orthogonal to the pre-trained neurons: ``neuromerging`` (its per-neuron orthogonal merge,
   SVD + TIES on the orthogonal parts, is where those conflicts live — Fang et al. 2025, docs/methods/spec.md §1).
5. ``rescaling-conflicts`` — the signs conflict and a sizeable part of the update rescales the pre-trained neurons
   (parallel share above ``1 − ORTHOGONAL_SHARE``, which NeuroMerging's default ``λ1 = 0`` would drop): ``ties``
   (trim, elect, disjoint mean on whole task vectors — Yadav et al. 2023).

Without an expert pair (a single expert) rules 2–5 cannot apply; a pool with no trimmed overlap at all
(``sign_agreement`` undefined) is treated as agreeing (rule 3).
"""

from __future__ import annotations

from .report import GroupStats, Suggestion, Summary

NEAR_IDENTICAL_COSINE = 0.9
AGREEING_SIGNS = 0.5
ORTHOGONAL_SHARE = 0.9
#: how many blocks / experts the summary names
TOP = 3


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f} %"


def mean_orthogonal_share(model: GroupStats) -> float | None:
    """Orthogonal share of the update energy over all experts (energy-weighted: ``1 − Σ_t par_t / Σ_t e_t``)."""
    shares = [(p, n * n) for p, n in zip(model.parallel_share, model.update_norm, strict=True) if p is not None]
    energy = sum(e for _, e in shares)
    return 1.0 - sum(p * e for p, e in shares) / energy if energy > 0 else None


def suggest(model: GroupStats, experts: int) -> Suggestion:
    """The suggested method for the whole-model statistics ``model`` (rules in the module docstring)."""
    if experts < 2:
        return Suggestion("task_arithmetic", "single-expert",
                          "one expert: there is nothing to reconcile; scale its task vector (tune λ on validation)")
    cos = model.mean_cosine
    if cos is not None and cos >= NEAR_IDENTICAL_COSINE:
        return Suggestion("linear", "near-identical",
                          f"the experts are near-identical (mean task-vector cosine {cos:.3f} >= "
                          f"{NEAR_IDENTICAL_COSINE}): averaging them loses almost nothing")
    agree = model.sign_agreement
    if agree is None or agree >= AGREEING_SIGNS:
        what = "no coordinate is kept by two experts" if agree is None else (
            f"sign agreement {agree:.2f} >= {AGREEING_SIGNS}: the experts disagree on "
            f"{_pct(model.conflict_share_of_overlap)} of the coordinates they share")
        return Suggestion("task_arithmetic", "signs-agree",
                          f"{what}; a plain sum of task vectors interferes little (tune λ on validation)")
    orth = mean_orthogonal_share(model)
    conflict = (f"the experts' trimmed signs conflict on {_pct(model.conflict_share_of_overlap)} of the coordinates "
                f"they share (sign agreement {agree:.2f} < {AGREEING_SIGNS})")
    if orth is not None and orth >= ORTHOGONAL_SHARE:
        return Suggestion("neuromerging", "orthogonal-conflicts",
                          f"{conflict} and {_pct(orth)} of the update energy is orthogonal to the pre-trained "
                          "neurons: NeuroMerging resolves the conflicts inside that orthogonal subspace")
    return Suggestion("ties", "rescaling-conflicts",
                      f"{conflict} and {_pct(None if orth is None else 1 - orth)} of the update energy rescales "
                      "the pre-trained neurons (which NeuroMerging's default λ1 = 0 drops): TIES trims and elects "
                      "signs on the whole task vectors")


def summarize(model: GroupStats, blocks: list[GroupStats], labels: list[str], *, base: str, density: float
              ) -> Summary:
    """Most conflicting blocks, most orthogonal experts, the suggestion, and the text printed by the CLI."""
    ranked = sorted((b for b in blocks if b.sign_conflict_rate),
                    key=lambda b: -(b.sign_conflict_rate or 0.0))[:TOP]
    conflicting = [{"block": b.name, "sign_conflict_rate": b.sign_conflict_rate,
                    "conflict_share_of_overlap": b.conflict_share_of_overlap} for b in ranked]
    orth = [(labels[t], s) for t, s in enumerate(model.orthogonal_share) if s is not None]
    orthogonal = [{"expert": name, "orthogonal_share": s} for name, s in sorted(orth, key=lambda x: -x[1])[:TOP]]
    suggestion = suggest(model, len(labels))
    lines = [
        f"inspected {len(labels)} expert(s) against {base}: {model.numel:,} parameters in {model.tensors} merged "
        f"tensors (trim density {density:g})",
        f"task-vector cosine, mean over pairs: {'n/a' if model.mean_cosine is None else f'{model.mean_cosine:.3f}'}",
        f"sign conflicts: {_pct(model.sign_conflict_rate, 2)} of coordinates, {_pct(model.conflict_share_of_overlap)}"
        f" of those kept by 2+ experts (sign agreement "
        f"{'n/a' if model.sign_agreement is None else f'{model.sign_agreement:.2f}'}; 0 = as unrelated updates)",
        f"orthogonal share of the update energy: {_pct(mean_orthogonal_share(model))}",
        "most conflicting blocks: " + (", ".join(f"{c['block']} ({_pct(c['sign_conflict_rate'], 2)})"
                                                  for c in conflicting) or "none"),
        "most orthogonal experts: " + (", ".join(f"{o['expert']} ({_pct(o['orthogonal_share'])})"
                                                  for o in orthogonal) or "none"),
        f"suggested method: {suggestion.method} — {suggestion.reason}",
    ]
    return Summary(conflicting, orthogonal, suggestion, "\n".join(lines))


__all__ = ["AGREEING_SIGNS", "NEAR_IDENTICAL_COSINE", "ORTHOGONAL_SHARE", "mean_orthogonal_share", "suggest",
           "summarize"]
