"""``neuromerge route build`` with a full-checkpoint expert next to a PEFT adapter, for every routed method
(issue #17 item 3): MIN-Merging keeps the adapter's exact rank-r factors and approximates the full checkpoint by a
truncated SVD of each changed module's ΔW (discarded energy reported); Twin, EMR and WEMoE work on full deltas; the
non-routed tensors a full checkpoint changes (embeddings, norms, biases) go into the saved backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from neuromerge.routing import load_routed
from neuromerge.routing.cli import find_builder
from tests.search.test_user_model_search import IDS, full_checkpoint

from .test_routed_methods import FAST, ROUTER_FAST, hf_fixture

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny BERT, expert t0 a LoRA adapter (rank 2 on query / value), expert t1 a full checkpoint (every
    parameter moved)."""
    root = tmp_path_factory.mktemp("mixed")
    cfg, merged = hf_fixture(root, ("query", "value", "intermediate.dense"))
    full_checkpoint(root / "full1", merged[1])
    cfg = {k: v for k, v in cfg.items() if k != "params"}
    return root, {**cfg, "experts": {"t0": str(root / "ad0"), "t1": str(root / "full1")}}


PARAMS = {
    "min_merging": {**FAST, "enhancement": False, "core_delta": -1.0},
    "twin": ROUTER_FAST,
    "emr": ROUTER_FAST,
    "wemoe": {"steps": 3, "batch_size": 4},
}


@pytest.mark.parametrize("method", list(PARAMS))
def test_route_build_accepts_a_full_checkpoint_expert(mixed: tuple[Path, dict[str, Any]], method: str,
                                                      tmp_path: Path) -> None:
    _, cfg = mixed
    out = find_builder(method)({**cfg, "params": PARAMS[method]}, tmp_path / method, force=False)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["tasks"] == ["t0", "t1"]
    meta = manifest["extra"]["meta"]
    if method == "min_merging":
        # the adapter: its exact rank-2 factors; the full checkpoint: rank-16 SVD of every changed linear
        assert meta["factor_ranks"] == {"t0": 2, "t1": 16} and meta["factors_exact"] is False
        assert meta["discarded_energy"]["t0"] == 0.0 and 0.0 < meta["discarded_energy"]["t1"] < 1.0
        experts = {e["name"]: e for e in manifest["experts"]}
        assert {v["rank"] for v in experts["t0"]["modules"].values()} == {2}
        assert {v["rank"] for v in experts["t1"]["modules"].values()} == {16}
        assert len(experts["t1"]["modules"]) > len(experts["t0"]["modules"])  # attention out, MLP, pooler too
    if method == "twin":
        # rank-10 % exclusive vectors of θ_t − θ*: the full checkpoint's (full-rank) update loses the most
        assert set(meta["discarded_energy"]) == {"t0", "t1"}
        assert 0.0 < meta["discarded_energy"]["t1"] < 1.0
    if method in ("min_merging", "emr"):  # the full checkpoint's norms / embeddings averaged into the backbone
        assert manifest["base"]["embedded"] is True
    model = load_routed(out)
    mask = (IDS != 0).long()
    with torch.no_grad():
        hidden = model(input_ids=IDS, attention_mask=mask).last_hidden_state
    assert hidden.shape[:2] == IDS.shape and torch.isfinite(hidden).all()
