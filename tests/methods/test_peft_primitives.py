"""Equality with PEFT's ``peft.utils.merge_utils`` on the same inputs.

PEFT semantics that differ from ours, and how the inputs are chosen so that equality is expected:
- PEFT elects the sign on the *unweighted* trimmed task vectors and divides the disjoint sum by the *count* of
  agreeing entries; we (like mergekit) weight first and divide by the sum of their weights. Equal for unit weights;
  for equal weights ``c`` PEFT's result is ``c`` times ours (tested).
- PEFT breaks a zero election to ``+1``; ``consensus.elect_sign`` (TIES code) takes the tensor's majority sign,
  ``zero_sign: positive`` reproduces PEFT exactly (tested both ways).
- PEFT keeps exactly ``k`` entries in ``magnitude_based_pruning`` (topk); we keep ties at the threshold:
  continuous random inputs have no ties.
- PEFT's DARE draws with ``torch.bernoulli``; we patch it to return our counter-based masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft_mu

from neuromerge.tensors.consensus import agreement_mask, disjoint_merge, elect_sign
from neuromerge.tensors.selection import magnitude_prune
from neuromerge.tensors.sparsify import bernoulli_keep_mask, elect_sign_positive

pytestmark = pytest.mark.peers


def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


BASE = torch.zeros(6, 9)  # θ0 = 0 so that the merged θ is the merged task vector, exactly
TASKS = [rand((6, 9), 1 + i) for i in range(3)]
ONES = torch.ones(3)


def trimmed(density: float) -> torch.Tensor:
    return torch.stack([magnitude_prune(t, density) for t in TASKS])


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_magnitude_prune_matches_peft(density):
    for task in TASKS:
        torch.testing.assert_close(magnitude_prune(task, density), peft_mu.prune(task, density, "magnitude"))


def test_trim_then_weighted_sum_matches_peft_magnitude_prune(run_method):
    """PEFT's ``magnitude_prune`` merge = per-tensor trim + weighted sum = our Breadcrumbs with γ = 0, λ = 1."""
    weights = torch.tensor([1.0, 0.5, 2.0])
    theirs = peft_mu.magnitude_prune(TASKS, weights, 0.3)
    per_model = [{"weight": float(w)} for w in weights]
    ours, _ = run_method("breadcrumbs", BASE, TASKS, {"density": 0.3, "gamma": 0.0, "lambda": 1.0}, per_model)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_matches_peft(run_method):
    weights = torch.tensor([0.3, 1.5, -0.4])
    theirs = peft_mu.task_arithmetic(TASKS, weights)
    ours, _ = run_method("task_arithmetic", BASE, TASKS, {"lambda": 1.0}, [{"weight": float(w)} for w in weights])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("ours", "theirs"), [("sum", "total"), ("count", "frequency")])
def test_majority_sign_mask_matches_peft_without_zero_elections(ours, theirs):
    dense = torch.stack(TASKS)  # 3 non-zero entries per coordinate: no zero sum, no tied count
    mask = agreement_mask(dense, elect_sign(dense, ours))
    torch.testing.assert_close(mask, peft_mu.calculate_majority_sign_mask(dense, theirs))


@pytest.mark.parametrize(("ours", "theirs"), [("sum", "total"), ("count", "frequency")])
def test_positive_zero_sign_matches_peft_even_with_zero_elections(ours, theirs):
    x = trimmed(0.3)
    x[:, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # a zero sum and a tied count
    x[:, 0, 1] = 0.0  # nothing left at all
    mask = agreement_mask(x, elect_sign_positive(x, ours))
    torch.testing.assert_close(mask, peft_mu.calculate_majority_sign_mask(x, theirs))


def test_majority_zero_sign_differs_from_peft_only_where_the_election_is_zero():
    x = -trimmed(0.3).abs()  # every elected sign is negative, so the tensor's majority is −1
    x[:, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # Σ = 0: PEFT picks +1, elect_sign picks the majority −1
    ours = agreement_mask(x, elect_sign(x, "sum"))
    theirs = peft_mu.calculate_majority_sign_mask(x, "total")
    differs = (ours != theirs).any(dim=0)
    assert differs[0, 0] and int(differs.sum()) == 1


def test_disjoint_merge_matches_peft():
    x = trimmed(0.4)
    sign = elect_sign(x, "sum")
    theirs = peft_mu.disjoint_merge(x, peft_mu.calculate_majority_sign_mask(x, "total"))
    torch.testing.assert_close(disjoint_merge(x, sign, "mean"), theirs)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_with_unit_weights_matches_peft(run_method, density):
    theirs = peft_mu.ties(TASKS, ONES, density)
    ours, _ = run_method("ties", BASE, TASKS, {"scope": "tensor", "density": density})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_ties_with_equal_weights_is_peft_divided_by_the_weight(run_method):
    """PEFT divides by the count of agreeing entries, so equal weights c scale its result by c; our dis-mean
    divides by Σ m_t w_t and is scale-free: PEFT(c) = ours with λ = c."""
    theirs = peft_mu.ties(TASKS, 2.5 * ONES, 0.3)
    ours, _ = run_method("ties", BASE, TASKS, {"scope": "tensor", "density": 0.3, "lambda": 2.5},
                         [{"weight": 2.5}] * 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_ties_with_unequal_weights_differs_from_peft(run_method):
    weights = [1.0, 0.2, 3.0]
    theirs = peft_mu.ties(TASKS, torch.tensor(weights), 0.3)
    ours, _ = run_method("ties", BASE, TASKS, {"scope": "tensor", "density": 0.3},
                         [{"weight": w} for w in weights])
    assert not torch.allclose(ours, theirs, atol=1e-3)


def _patch_bernoulli(monkeypatch: pytest.MonkeyPatch, masks: list[np.ndarray], density: float) -> list:
    queue = [torch.from_numpy(m).to(torch.float32) for m in masks]

    def fake_bernoulli(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert torch.all(probs == density)
        return queue.pop(0)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    return queue


@pytest.mark.parametrize(
    ("name", "weights"), [("dare_linear", [1.0, 0.5, 2.0]), ("dare_ties", [1.0, 1.0, 1.0])]
)
def test_dare_matches_peft_given_the_same_masks(make_input, run_method, monkeypatch, name, weights):
    density = 0.4
    per_model = [{"weight": w} for w in weights]
    x = make_input(name, BASE, TASKS, {"density": density}, per_model, seed=7)
    masks = [bernoulli_keep_mask(x.random_uniform(t), density).numpy() for t in range(3)]
    queue = _patch_bernoulli(monkeypatch, masks, density)
    theirs = getattr(peft_mu, name)(TASKS, torch.tensor(weights), density)
    assert not queue  # PEFT consumed exactly our three masks
    ours, _ = run_method(name, BASE, TASKS, {"density": density}, per_model, seed=7)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
