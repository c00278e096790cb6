"""NearSwap vs mergekit 0.1.5's ``nearswap`` on the same config and tiny model folders (helpers and tolerances of
``test_mergekit.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.test_mergekit import assert_moved, assert_same_model, load_dir, merge_both

pytestmark = pytest.mark.peers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("t", [1e-4, 0.02])
def test_nearswap_equals_mergekit(make_family, tmp_path: Path, arch: str, t: float) -> None:
    base, experts = make_family(arch, n_experts=1)
    config = {"merge_method": "nearswap", "base_model": str(base), "models": [{"model": str(experts[0])}],
              "parameters": {"t": t}, "dtype": "float32"}
    ours, theirs = merge_both(config, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(base), min_fraction=0.1)
