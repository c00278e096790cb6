"""LLM experts of the papers' kind (issue #18 §7): LoRA on every linear layer (``lora_all``) and full fine-tuning
(``full``) train exactly the intended weights — on a tiny Llama (no download, fast)."""

from __future__ import annotations

import copy

import pytest
import torch

from neuromerge.bench import llm_model as lm
from neuromerge.bench.llm import LLMSuite
from neuromerge.bench.suites import BenchError
from tests.helpers import tiny_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _task(n: int = 12) -> tuple[lm.EncodedTask, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    bodies = [torch.randint(3, 90, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
              for _ in range(n)]
    enc = lm.EncodedTask(prefix=[1, 5, 7], bodies=bodies, label_ids=[10, 11])
    targets = torch.tensor(enc.label_ids)[torch.arange(n) % 2]
    return enc, targets


def _base() -> torch.nn.Module:
    return tiny_model("llama").eval().requires_grad_(False)


def test_mode_modules():
    assert lm.MODE_MODULES["lora"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lm.MODE_MODULES["lora_all"] == lm.MODE_MODULES["full"] == LINEAR
    keys = lm.target_keys(_base(), LINEAR)
    assert len(keys) == 2 * 7 and all(k.split(".")[-2] in LINEAR and k.endswith(".weight") for k in keys)


def test_full_fine_tuning_changes_exactly_the_linear_weights(monkeypatch):
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    copies: list[torch.nn.Module] = []
    original = copy.deepcopy

    def recording_deepcopy(obj, memo=None):
        out = original(obj, memo)
        if obj is base:
            copies.append(out)
        return out

    monkeypatch.setattr(lm.copy, "deepcopy", recording_deepcopy)
    enc, targets = _task()
    trained, losses = lm.train_full(base, enc, targets, steps=4, batch_size=4,
                                    settings=lm.FullSettings(lr=1e-2), seed=0, pad_id=0)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is untouched
    linear = set(lm.target_keys(base, LINEAR))
    assert set(trained) == linear
    model = copies[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], model[k])}
    assert moved == linear  # every linear weight moved; embeddings, lm_head and norms did not
    assert all(torch.equal(trained[k], model[k]) for k in linear)


def test_full_fine_tuning_is_deterministic():
    enc, targets = _task()
    a, _ = lm.train_full(_base(), enc, targets, steps=2, batch_size=4, settings=lm.FullSettings(lr=1e-2), seed=5,
                         pad_id=0)
    b, _ = lm.train_full(_base(), enc, targets, steps=2, batch_size=4, settings=lm.FullSettings(lr=1e-2), seed=5,
                         pad_id=0)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("modules", "expected"), [(lm.TARGET_MODULES, lm.TARGET_MODULES), (LINEAR, LINEAR)])
def test_lora_trains_adapters_of_the_chosen_modules_only(modules, expected):
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    enc, targets = _task()
    settings = lm.LoraSettings(lr=5e-2)
    peft_model, _ = lm.train_lora(base, enc, targets, steps=4, batch_size=4, settings=settings, seed=0, pad_id=0,
                                  modules=modules)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == set(expected)
    from peft import get_peft_model_state_dict

    base_targets = {k: before[k] for k in lm.target_keys(base, LINEAR)}
    merged = lm.merge_lora(base_targets, get_peft_model_state_dict(peft_model), settings.scaling)
    moved = {k for k in merged if not torch.equal(merged[k], base_targets[k])}
    assert moved == set(lm.target_keys(base, expected))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_suite_modes_and_fingerprints():
    suite = LLMSuite()
    assert suite.modes == ("lora", "lora_all", "full")
    lora_print = suite.fingerprint()
    assert "expert_mode" not in lora_print  # the default mode keeps the key of existing caches
    suite.prepare_mode("full")
    assert suite.modules() == LINEAR and suite.expert_rank() is None
    full_print = suite.fingerprint()
    suite.prepare_mode("lora_all")
    assert suite.expert_rank() == 8
    assert len({repr(lora_print), repr(full_print), repr(suite.fingerprint())}) == 3
    with pytest.raises(BenchError, match="not 'qlora'"):
        suite.prepare_mode("qlora")
