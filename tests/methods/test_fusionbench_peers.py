"""Peer equality with FusionBench (fusion-bench 0.2.33): TSV-Merge and TALL masks / consensus merging.

FusionBench 0.2.33 ships no PCB-Merging; PCB is checked against an independent transcription of the official
formula in ``test_tsv_pcb_tall.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from neuromerge.methods import MergeInput, get

pytestmark = pytest.mark.peers

SHAPES = {"blocks.0.attn.weight": (8, 6), "blocks.0.mlp.weight": (5, 9), "blocks.0.norm.bias": (6,)}


def state_dicts(seed: int, t: int) -> tuple[OrderedDict, list[OrderedDict]]:
    gen = torch.Generator().manual_seed(seed)
    base = OrderedDict((n, torch.randn(s, generator=gen)) for n, s in SHAPES.items())
    models = [OrderedDict((n, b + 0.1 * torch.randn(b.shape, generator=gen)) for n, b in base.items())
              for _ in range(t)]
    return base, models


def ours(method: str, base: OrderedDict, models: list[OrderedDict], params: dict) -> OrderedDict:
    """Our method applied tensor by tensor, as the engine streams a model."""
    cls = get(method)
    out = OrderedDict()
    for name, b in base.items():
        x = MergeInput(
            name=name, kind="neuronal" if b.dim() == 2 else "point", base=b.clone(),
            models=[m[name].clone() for m in models], params=cls.Params.model_validate(params),
            per_model=[cls.Params.model_validate(params) for _ in models], rows=(0, b.shape[0]),
            full_shape=tuple(b.shape),
        )
        out[name] = cls().merge(x)
    return out


def test_tsv_equals_fusionbench() -> None:
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils

    base, models = state_dicts(40, 3)
    task_vectors = [OrderedDict((n, m[n] - base[n]) for n in base) for m in models]
    peer = TSVM_utils.compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    merged = ours("tsv", base, models, {"lambda": 0.6})
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + 0.6 * peer[name], rtol=1e-4, atol=1e-5)


def test_tall_masks_equal_fusionbench() -> None:
    from fusion_bench.method.tall_mask import utils as tall_utils
    from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as sd_masks

    from neuromerge.methods.consensus import tall_masks

    base, models = state_dicts(41, 4)
    flat = lambda sd: torch.cat([sd[n].reshape(-1) for n in sorted(sd)])  # noqa: E731
    tv = torch.stack([flat(m) - flat(base) for m in models])
    peer_flat = tall_utils.generate_task_masks(tv, torch.stack([flat(m) for m in models]), flat(base),
                                               tall_mask_lambda=0.4)
    mine = tall_masks(tv, tv.sum(0), 0.4)
    assert torch.equal(peer_flat, mine)
    multi = OrderedDict((n, sum(m[n] - base[n] for m in models)) for n in base)
    for i, m in enumerate(models):
        peer_sd = sd_masks(multi, OrderedDict((n, m[n] - base[n]) for n in base),
                           OrderedDict((n, torch.zeros_like(b)) for n, b in base.items()), tall_mask_lambda=0.4)
        for n in base:
            assert torch.equal(peer_sd[n].bool(), mine[i][_slice(n)].reshape(base[n].shape))


def _slice(name: str) -> slice:
    """Position of tensor ``name`` in the sorted-key flat vector of FusionBench's ``state_dict_to_vector``."""
    start = 0
    for n in sorted(SHAPES):
        size = int(torch.Size(SHAPES[n]).numel())
        if n == name:
            return slice(start, start + size)
        start += size
    raise KeyError(name)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_equals_fusionbench(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    from fusion_bench.method.tall_mask import utils as tall_utils
    from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as sd_masks

    base, models = state_dicts(42, 4)
    task_vectors = [OrderedDict((n, m[n] - base[n]) for n in base) for m in models]
    multi = OrderedDict((n, sum(tv[n] for tv in task_vectors)) for n in base)
    zeros = OrderedDict((n, torch.zeros_like(b)) for n, b in base.items())
    masks = {f"task{i}": sd_masks(multi, tv, zeros, tall_mask_lambda=0.6) for i, tv in enumerate(task_vectors)}
    # the peer reads its TALL masks from disk; hand it the ones it just generated instead
    monkeypatch.setattr(tall_utils, "load_tall_mask", lambda remove_keys, ptm_check, config: masks)
    consensus = tall_utils.construct_consensus_mask(base, k, SimpleNamespace(), remove_keys=[])
    flat_multi = torch.cat([multi[n].reshape(-1) for n in sorted(multi)])
    flat_base = torch.cat([base[n].reshape(-1) for n in sorted(base)])
    peer = flat_base + 0.3 * consensus.float() * flat_multi
    merged = ours("consensus", base, models, {"lambda": 0.3, "tall_lambda": 0.6, "k": k})
    mine = torch.cat([merged[n].reshape(-1) for n in sorted(merged)])
    torch.testing.assert_close(mine, peer, rtol=1e-6, atol=1e-6)
