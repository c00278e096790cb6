"""The bench glue: every data-aware method runs through run_data_method and declares what it read; registry
entries list the parameters and refuse the static engine."""

from __future__ import annotations

import pytest
import torch

from neuromerge.bench.data_methods import DATA_METHODS, resolve_params, run_data_method, runners
from neuromerge.data_aware.access import TensorAccess
from neuromerge.data_aware.wemoe import WEMoEModel
from neuromerge.errors import ConfigError
from neuromerge.tasks.contract import Budget, Expert

from .fixtures import bert_factory, bert_setup


class FakeSuite(TensorAccess):
    def merge_exclude(self) -> list[str]:
        return ["embeddings\\.word_embeddings"]


@pytest.mark.parametrize("name", sorted(DATA_METHODS))
def test_run_data_method_declares_its_data(name: str) -> None:
    _, base, experts, heads, tasks = bert_setup()
    suite = FakeSuite(bert_factory)
    pool = [Expert(task=t.name, backbone=e, head=h, test_score=1.0) for e, h, t in zip(experts, heads, tasks,
                                                                                      strict=True)]
    params = {"steps": 2} if name in ("adamerging", "adamerging++", "wemoe") else {"examples": 3}
    result, info = run_data_method(suite, base, pool, tasks, Budget(quick=True, eval_examples=5), name, params)
    spec = DATA_METHODS[name]
    assert info["split"] == spec.split and info["transductive"] is spec.transductive is info["unlabelled"]
    assert info["wall_s"] > 0 and info["method"] == name
    want = 5 if spec.transductive else 3  # transductive methods read the evaluation subset (eval_examples)
    assert info["examples"] == {"b0": want, "b1": want}
    if name == "wemoe":
        assert isinstance(result, WEMoEModel)
    else:
        torch.testing.assert_close(result["embeddings.word_embeddings.weight"],
                                   base["embeddings.word_embeddings.weight"])
    assert runners()[name][1] is spec.transductive


def test_quick_caps_budgets() -> None:
    assert resolve_params("fisher", None, quick=True).examples == 64
    assert resolve_params("fisher", {"examples": 10}, quick=True).examples == 10
    assert resolve_params("adamerging", None, quick=False).steps == 500
    assert resolve_params("adamerging", None, quick=True).steps == 50
    assert resolve_params("wemoe", None, quick=True).steps == 50
    assert resolve_params("regmean", None, quick=False).alpha == 0.9


def test_registry_lists_data_methods_and_the_static_engine_refuses_them() -> None:
    import neuromerge.data_aware.methods  # noqa: F401  (registers them)
    from neuromerge.functional import merge_state_dicts
    from neuromerge.methods import get

    cls = get("adamerging++")
    assert cls.transductive and cls.data_aware and "ties" in cls.Params.model_fields
    assert not get("fisher").transductive
    with pytest.raises(ConfigError, match=r"needs task data.*neuromerge bench"):
        merge_state_dicts("regmean", {"w": torch.zeros(2)}, [{"w": torch.ones(2)}])
