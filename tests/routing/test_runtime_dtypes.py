"""Every routed kind runs in float32, under the bench's bf16 autocast and converted to bfloat16 (issue #16, item 9).

MIN-Merging (low-rank experts, hierarchical gates), Twin-Merging (low-rank, soft gates, ``final`` features), EMR
(dense experts, one-hot gates), WEMoE (routed MLPs) and MERGE (chain routing over a library) are built directly on
a tiny BERT with random experts (no training). Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what
``TextSuite.evaluate`` uses) and after ``model.to(torch.bfloat16)`` the outputs are finite and equal the float32
reference within a bf16 tolerance, and the experts still act (the reference differs from the plain base by more
than that tolerance).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from neuromerge.data_aware.wemoe import WEMoEModel, WEMoEParams, build_wemoe
from neuromerge.routing import (
    HierarchicalGates,
    LowRankExpert,
    OneHotGates,
    RoutedModel,
    Router,
    SoftGates,
)
from neuromerge.routing.components import component_map, components
from neuromerge.routing.recombination import ChainRoutedModel, Configuration, build_library
from neuromerge.routing.runtime import final_hidden_mean

from .test_runtime import BERT_MODULES, LLAMA_MODULES, dense, ids_batch, lowrank, tiny_bert, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("min_merging", "twin", "emr", "wemoe", "merge")


def _router(seed: int = 1) -> Router:
    return Router(32, 3, hidden=16, generator=torch.Generator().manual_seed(seed))


def _perturbed(state: dict[str, torch.Tensor], n: int, scale: float) -> list[dict[str, torch.Tensor]]:
    out = []
    for t in range(n):
        g = torch.Generator().manual_seed(100 + t)
        out.append({k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                    for k, v in state.items()})
    return out


def build(kind: str) -> nn.Module:
    """A routed tiny BERT of ``kind`` with three random experts, in float32 and eval mode."""
    base = tiny_bert()
    if kind in ("min_merging", "twin"):
        experts = [lowrank(base, f"e{j}", BERT_MODULES, 4, seed=j, scale=0.5) for j in range(3)]
        if kind == "twin":  # Twin routes on the final hidden state (a separate pass with the gates off)
            return RoutedModel(base, experts, router=_router(), policy=SoftGates(), feature_module=None,
                               feature_fn=final_hidden_mean).eval()
        policy = HierarchicalGates(2, {0: {BERT_MODULES[0]}, 2: {BERT_MODULES[1]}})
        return RoutedModel(base, experts, router=_router(), policy=policy, feature_module="embeddings").eval()
    if kind == "emr":
        experts = [dense(base, f"e{j}", BERT_MODULES, seed=j) for j in range(3)]
        return RoutedModel(base, experts, router=_router(), policy=OneHotGates(), feature_module="embeddings").eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    if kind == "wemoe":
        def make(s: dict[str, torch.Tensor]) -> nn.Module:
            m = copy.deepcopy(base)
            m.load_state_dict(s)
            return m.eval()

        model = build_wemoe(make, state, _perturbed(state, 3, 0.05), WEMoEParams(),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # sample-dependent routing weights
            for r in model.routers.values():
                r.layers[-1].weight.mul_(60)
        return model.eval()
    assert kind == "merge"
    cmap = component_map(state)
    lib = build_library(state, _perturbed(state, 3, 0.05), cmap, Configuration.uniform(components(cmap), (0, 1, 1)))
    return ChainRoutedModel(base, lib, _router(), feature_module="embeddings").eval()


def _inputs() -> dict[str, torch.Tensor]:
    ids = ids_batch(4, 7)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: nn.Module, autocast: bool = False) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**_inputs()).last_hidden_state


def _check(kind: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(got).all(), kind
    err = float((got.float() - ref).abs().max())
    tol = 0.03 * float(ref.abs().max())  # bf16 keeps 8 bits of mantissa; two layers of error
    assert err <= tol, f"{kind}: max error {err:.4f} > {tol:.4f}"
    plain = tiny_bert()(**_inputs()).last_hidden_state.detach()  # the base alone
    assert float((ref - plain).abs().max()) > 2 * tol, f"{kind}: the experts do not change the output"


@pytest.mark.parametrize("kind", KINDS)
def test_routed_kind_runs_under_bf16_autocast(kind: str) -> None:
    model = build(kind)
    ref = _run(model)
    got = _run(model, autocast=True)
    _check(kind, got, ref)
    assert torch.equal(_run(model), ref)  # float32 again afterwards: nothing cached in bf16


@pytest.mark.parametrize("kind", KINDS)
def test_routed_kind_runs_converted_to_bfloat16(kind: str) -> None:
    ref = _run(build(kind))
    model = build(kind).to(torch.bfloat16)
    got = _run(model)
    assert got.dtype == torch.bfloat16  # MERGE's float32 library follows the conversion too
    _check(kind, got, ref)


def test_lowrank_causal_lm_under_autocast_and_bf16() -> None:
    """A routed Llama (low-rank experts on attention and MLP projections), forced soft gates."""
    base = tiny_llama()
    experts = [lowrank(base, f"e{j}", LLAMA_MODULES, 2, seed=j, scale=0.2) for j in range(2)]
    model = RoutedModel(base, experts, router=None, policy=SoftGates(), feature_module=None).eval()
    ids = ids_batch(3, 6)
    probs = torch.tensor([[0.3, 0.7]])

    def logits(m: nn.Module, autocast: bool = False) -> torch.Tensor:
        with torch.no_grad(), m.force(probs), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(input_ids=ids).logits.float()

    ref = logits(model)
    for got in (logits(model, autocast=True), logits(model.to(torch.bfloat16))):
        assert torch.isfinite(got).all()
        assert float((got - ref).abs().max()) <= 0.03 * float(ref.abs().max())


def test_lowrank_conv_under_autocast() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1)).eval()
    g = torch.Generator().manual_seed(3)
    low = LowRankExpert("l", {"0": (torch.randn(2, 27, generator=g), torch.randn(4, 2, generator=g) * 0.3),
                              "2": (torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g) * 0.3)})
    model = RoutedModel(cnn, [low], router=None, policy=SoftGates(), feature_module=None)
    x = torch.randn(2, 3, 5, 5, generator=g)
    with torch.no_grad(), model.force(torch.tensor([[1.0]])):
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).float()
    assert torch.isfinite(got).all() and float((got - ref).abs().max()) <= 0.03 * float(ref.abs().max())


def test_wemoe_deep_copy_routes_with_its_own_tensors() -> None:
    """The hooks of a copied WEMoE model belong to the copy (they used to close over the original)."""
    model = build("wemoe")
    assert isinstance(model, WEMoEModel)
    ref = _run(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in twin.named_buffers():
            if name.startswith("dw__"):
                t.zero_()  # the copy's task vectors gone: the copy must change, the original must not
    assert torch.equal(_run(model), ref)
    assert not torch.allclose(_run(twin), ref, atol=1e-4)
    assert _run(copy.deepcopy(model).to(torch.bfloat16)).dtype == torch.bfloat16
