"""Peer equality: fusion-bench's RegMean / Fisher merge functions on the same weights, Grams and Fishers."""

from __future__ import annotations

import pytest
import torch

from neuromerge.data_aware.fisher import fisher_merge
from neuromerge.data_aware.regmean import accumulate_grams, regmean_merge

from .fixtures import bert_setup

pytestmark = pytest.mark.peers


def test_regmean_matches_fusion_bench_on_a_tiny_bert() -> None:
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    access, base, experts, _heads, tasks = bert_setup()
    grams = []
    for e, t in zip(experts, tasks, strict=True):
        g, _ = accumulate_grams(access.module(e), access.batches(t, "train", None), mask_padding=False)
        grams.append(g)
    names = [n for n, v in base.items() if v.is_floating_point()]
    ours = regmean_merge(experts, grams, alpha=0.9, names=names)
    theirs = merging_with_regmean_weights({n: [e[n] for e in experts] for n in names},
                                          [{k: v.float() for k, v in g.items()} for g in grams],
                                          reduce_non_diagonal_ratio=0.9)
    assert set(theirs) == set(ours)
    for n in names:
        torch.testing.assert_close(ours[n], theirs[n], atol=2e-4, rtol=2e-4)


def test_fisher_merge_matches_fusion_bench() -> None:
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    fishers = [{k: torch.rand(v.shape, generator=g) ** 3 * (i + 1) for k, v in states[0].items()} for i in range(3)]
    for normalize in (True, False):
        ours = fisher_merge(states, fishers, normalize=normalize, min_weight=1e-6, coefficients=[1.0, 0.5, 2.0])
        theirs = merging_with_fisher_weights({k: [s[k] for s in states] for k in states[0]}, fishers,
                                             torch.tensor([1.0, 0.5, 2.0]), normalize_fisher_weight=normalize,
                                             minimal_fisher_weight=1e-6)
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k])
