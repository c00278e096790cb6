"""Fixed, seeded, stratified train / validation / test splits of a labelled dataset (texts or tensors).

:func:`make_splits` cleans a text corpus (:func:`clean_texts`: stripped; empty, NaN or non-string texts dropped;
a repeated text kept once when its labels agree, dropped when they disagree) and cuts 60 / 20 / 20 % of every
class (:func:`stratified_indices`, a generator seeded by ``(seed, task name, class)``), each split optionally
capped (:func:`stratified_cap`, class proportions kept, a class-wise prefix of the full split). The fingerprint
is the SHA-256 of the task name, the class names and every split's content, in order.
:func:`make_tensor_splits` does the same for a tensor dataset (images). Used by the task files
(:mod:`.taskfile`) and the bench's built-in text tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import TaskError
from .contract import Split, TaskData

#: train / validation / test fractions of every class
SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)


def clean_texts(texts: Sequence[Any], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Strip; drop empty, NaN and non-string texts; keep one copy of a repeated text when its labels agree and
    drop every copy when they disagree. Order of first occurrence is kept."""
    kept, ys, _ = clean_rows(texts, labels)
    return kept, ys


def clean_rows(texts: Sequence[Any], labels: Sequence[int]) -> tuple[list[str], list[int], list[int]]:
    """:func:`clean_texts` plus, for every kept text, the index of its first occurrence in ``texts`` (its row)."""
    seen: dict[str, tuple[int, int]] = {}
    conflicting: set[str] = set()
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(t, str):
            continue
        s = t.strip()
        if not s:
            continue
        if s in seen and seen[s][0] != int(y):
            conflicting.add(s)
        seen.setdefault(s, (int(y), i))
    kept = [(t, y, i) for t, (y, i) in seen.items() if t not in conflicting]
    return [t for t, _, _ in kept], [y for _, y, _ in kept], [i for _, _, i in kept]


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def stratified_indices(labels: Sequence[int], num_classes: int, *, seed: int, name: str = "",
                       fractions: Sequence[float] = SPLIT_FRACTIONS) -> list[list[list[int]]]:
    """Per split, per class, the example indices: every class is shuffled by a generator seeded by
    ``(seed, name, class)`` and cut at the cumulative ``fractions`` (rounded), the last split taking the rest."""
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    out: list[list[list[int]]] = [[[] for _ in range(num_classes)] for _ in fractions]
    for c, idx in enumerate(by_class):
        g = torch.Generator().manual_seed(_seed_of(seed, name, c))
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        bounds = [0] + [round(len(idx) * sum(fractions[: k + 1])) for k in range(len(fractions) - 1)] + [len(idx)]
        for k in range(len(fractions)):
            out[k][c] = perm[bounds[k]: bounds[k + 1]]
    return out


def stratified_cap(per_class: Sequence[int], cap: int) -> list[int]:
    """How many examples of each class to keep so that at most ``cap`` remain, proportional to the class sizes
    (largest remainder), every non-empty class keeping at least one when ``cap`` allows."""
    total = sum(per_class)
    if cap >= total:
        return list(per_class)
    quota = [cap * n / total for n in per_class]
    keep = [math.floor(q) for q in quota]
    if cap >= sum(1 for n in per_class if n):
        for c, n in enumerate(per_class):
            if n and keep[c] == 0:
                keep[c] = 1
    rest = cap - sum(keep)
    order = sorted(range(len(per_class)), key=lambda c: (-(quota[c] - keep[c]), c))
    for c in order:
        if rest <= 0:
            break
        if keep[c] < per_class[c]:
            keep[c] += 1
            rest -= 1
    while sum(keep) > cap:  # the minimum-one rule overshot: take from the largest classes
        c = max(range(len(keep)), key=lambda i: (keep[i], -i))
        keep[c] -= 1
    return keep


def split_fingerprint(name: str, classes: Sequence[str], splits: Sequence[Split]) -> str:
    """SHA-256 of the task name, its class names and every split's texts and labels."""
    h = hashlib.sha256(name.encode())
    h.update("\x1f".join(classes).encode())
    for s in splits:
        h.update(b"\x1e")
        for t in s.inputs:
            h.update(t.encode())
            h.update(b"\x1f")
        h.update(s.labels.numpy().tobytes())
    return h.hexdigest()


def make_splits(name: str, texts: Sequence[Any], labels: Sequence[int], classes: Sequence[str], *, seed: int,
                sizes: Sequence[int | None] | None, in_domain: bool = True, source: str = "") -> TaskData:
    """A :class:`TaskData` with fixed, seeded, stratified, disjoint train / val / test splits of the cleaned
    corpus (:func:`clean_texts`; 60 / 20 / 20 % per class), each split capped at ``sizes[k]`` examples when
    ``sizes`` is given (``None`` entries: uncapped; stratified: class proportions kept, a class-wise prefix of the
    full split, so a small run's split is a subset of a large run's). Inside a split, examples are ordered by a
    seeded shuffle; each split's ``rows`` are the examples' positions in ``texts`` (a repeated text: its first)."""
    if len(texts) != len(labels):
        raise TaskError(f"task {name!r}: {len(texts)} texts but {len(labels)} labels")
    bad = [y for y in labels if not 0 <= int(y) < len(classes)]
    if bad:
        raise TaskError(f"task {name!r}: label {bad[0]} outside 0..{len(classes) - 1}")
    ctexts, clabels, crows = clean_rows(texts, labels)
    counts = [clabels.count(c) for c in range(len(classes))]
    empty = [classes[c] for c, n in enumerate(counts) if n < 3]
    if empty:
        raise TaskError(f"task {name!r}: class(es) {', '.join(map(repr, empty))} have fewer than 3 examples "
                         "(one per split needed)")
    parts = stratified_indices(clabels, len(classes), seed=seed, name=name)
    splits = []
    for k, per_class in enumerate(parts):
        if sizes is not None and sizes[k] is not None:
            keep = stratified_cap([len(p) for p in per_class], int(sizes[k]))
            per_class = [p[:n] for p, n in zip(per_class, keep, strict=True)]
        idx = [i for p in per_class for i in p]
        g = torch.Generator().manual_seed(_seed_of(seed, name, "order", k))
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        splits.append(Split([ctexts[i] for i in idx], torch.tensor([clabels[i] for i in idx], dtype=torch.long),
                            rows=[crows[i] for i in idx]))
    return TaskData(name=name, classes=list(classes), train=splits[0], val=splits[1], test=splits[2],
                    in_domain=in_domain, source=source, fingerprint=split_fingerprint(name, classes, splits))


def make_tensor_splits(name: str, inputs: torch.Tensor, labels: Sequence[int], classes: Sequence[str], *,
                       seed: int, sizes: Sequence[int | None] | None, in_domain: bool = True,
                       source: str = "") -> TaskData:
    """Stratified seeded splits of a tensor dataset, as :func:`make_splits` does for texts."""
    counts = [list(labels).count(c) for c in range(len(classes))]
    few = [classes[c] for c, n in enumerate(counts) if n < 3]
    if few:
        raise TaskError(f"task {name!r}: class(es) {', '.join(map(repr, few))} have fewer than 3 examples "
                         "(one per split needed)")
    parts = stratified_indices(list(labels), len(classes), seed=seed, name=name)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    splits, h = [], hashlib.sha256(name.encode() + "\x1f".join(classes).encode())
    for k, per_class in enumerate(parts):
        if sizes is not None and sizes[k] is not None:
            keep = stratified_cap([len(q) for q in per_class], int(sizes[k]))
            per_class = [q[:n] for q, n in zip(per_class, keep, strict=True)]
        idx = torch.tensor(sorted(i for q in per_class for i in q), dtype=torch.long)
        split = Split(inputs[idx].contiguous(), y[idx], rows=idx.tolist())
        h.update(split.inputs.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
        splits.append(split)
    return TaskData(name=name, classes=list(classes), train=splits[0], val=splits[1], test=splits[2],
                    in_domain=in_domain, source=source, fingerprint=h.hexdigest())
