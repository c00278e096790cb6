"""PEFT LoRA adapter folders read as full weights (``neuromerge.io.lora``), checked against PEFT's own
``merge_and_unload``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from neuromerge.engine.plan import Pool, build_plan
from neuromerge.errors import CheckpointError, CompatibilityError
from neuromerge.io.checkpoint import Checkpoint, open_checkpoint
from neuromerge.io.lora import LoraCheckpoint, lora_scaling, open_model, pattern_value
from tests.helpers import save, tiny_model


def _adapter(arch: str, folder: Path, seed: int = 1, **lora: object) -> dict[str, torch.Tensor]:
    """Save a PEFT LoRA adapter (random non-zero A and B) of the tiny ``arch`` model into ``folder``; return the
    state dict PEFT's ``merge_and_unload`` makes from it."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture
def llama_base(tmp_path: Path) -> Checkpoint:
    ckpt = open_checkpoint(save(tiny_model("llama"), tmp_path / "base"))
    yield ckpt
    ckpt.close()


def _assert_view_equals(view: LoraCheckpoint, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> int:
    changed = 0
    for name in view.base.names():
        got = view.read(name)
        want = expected[name]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-6, msg=name)
        changed += view.changed(name)
    return changed


@pytest.mark.peers
def test_llama_adapter_reads_as_peft_merge_and_unload(tmp_path: Path, llama_base: Checkpoint) -> None:
    expected = _adapter("llama", tmp_path / "ad", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"], modules_to_save=["lm_head"])
    view = open_model(tmp_path / "ad", llama_base)
    assert isinstance(view, LoraCheckpoint)
    # 2 layers × (q, v, up) + embed_tokens + lm_head (modules_to_save)
    assert _assert_view_equals(view, expected) == 2 * 3 + 2
    name = "model.layers.1.self_attn.q_proj.weight"
    assert view.info(name).dtype == torch.float32 and view.info(name).shape == llama_base.info(name).shape
    assert not torch.equal(view.read(name), llama_base.read(name))  # the adapter really changes it
    assert view.config == llama_base.config and set(view.names()) == set(llama_base.names())
    assert name in view and "nope.weight" not in view
    assert view.total_bytes == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert view.bytes_read > 0 and len(view.header_hash()) == 64


@pytest.mark.peers
def test_row_reads_are_slices_of_the_full_tensor(tmp_path: Path, llama_base: Checkpoint) -> None:
    _adapter("llama", tmp_path / "ad", r=4, lora_alpha=16, target_modules=["up_proj", "embed_tokens"])
    view = open_model(tmp_path / "ad", llama_base)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        full = view.read(name)
        for rows in [(0, 3), (5, 17), (full.shape[0] - 2, full.shape[0])]:
            assert torch.equal(view.read(name, rows), full[rows[0] : rows[1]]), (name, rows)


@pytest.mark.peers
def test_rslora_and_alpha_pattern_scaling(tmp_path: Path, llama_base: Checkpoint) -> None:
    expected = _adapter("llama", tmp_path / "rs", r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj"])
    view = open_model(tmp_path / "rs", llama_base)
    assert _assert_view_equals(view, expected) == 2
    spec = view.modules["model.layers.0.self_attn.k_proj.weight"]
    assert spec.scaling == pytest.approx(6 / math.sqrt(4)) and spec.scaling == lora_scaling(6, 4, True)
    # independent check of the formula on one tensor: W0 + α/√r · B A
    a = view.adapter.read(spec.a)
    b = view.adapter.read(spec.b)
    manual = llama_base.read("model.layers.0.self_attn.k_proj.weight") + 3.0 * (b @ a)
    torch.testing.assert_close(view.read("model.layers.0.self_attn.k_proj.weight"), manual)

    expected = _adapter("llama", tmp_path / "pat", r=2, lora_alpha=4, target_modules=["o_proj"],
                        alpha_pattern={"layers.1.self_attn.o_proj": 32})
    view = open_model(tmp_path / "pat", llama_base)
    assert _assert_view_equals(view, expected) == 2
    assert view.modules["model.layers.0.self_attn.o_proj.weight"].scaling == 2.0
    assert view.modules["model.layers.1.self_attn.o_proj.weight"].scaling == 16.0


def test_pattern_value_follows_peft_get_pattern_key() -> None:
    pats = {"layers.1.q": 7, "v": 9}
    assert pattern_value(pats, "model.layers.1.q", 1) == 7
    assert pattern_value(pats, "model.layers.11.q", 1) == 1  # must match at a dot boundary
    assert pattern_value(pats, "a.v", 1) == 9 and pattern_value(pats, "a.vv", 1) == 1


@pytest.mark.peers
def test_gpt2_fan_in_fan_out_with_trained_biases(tmp_path: Path) -> None:
    base = open_checkpoint(save(tiny_model("gpt2"), tmp_path / "base"))
    expected = _adapter("gpt2", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True, bias="lora_only")
    # PEFT trains only the adapted modules' biases with bias="lora_only"; make them differ from the base's
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(f)
    bias_key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    sd[bias_key] = sd[bias_key] + 0.5
    save_file(sd, f)
    expected["transformer.h.0.attn.c_attn.bias"] = expected["transformer.h.0.attn.c_attn.bias"] + 0.5
    view = open_model(tmp_path / "ad", base)
    assert view.modules["transformer.h.0.attn.c_attn.weight"].transposed
    assert _assert_view_equals(view, expected) >= 4
    name = "transformer.h.1.mlp.c_fc.weight"  # stored (in, out) = (32, 128); rows are input features
    full = view.read(name)
    assert torch.equal(view.read(name, (3, 11)), full[3:11])
    base.close()


@pytest.mark.peers
def test_pool_of_adapters_plans_like_full_checkpoints(tmp_path: Path, llama_base: Checkpoint) -> None:
    from neuromerge.config import load_config

    views = []
    for i in range(2):
        _adapter("llama", tmp_path / f"ad{i}", seed=i, r=2, lora_alpha=4, target_modules=["q_proj"])
        views.append(open_model(tmp_path / f"ad{i}", llama_base))
    cfg = load_config({"merge_method": "ties", "base_model": str(llama_base.path),
                       "models": [{"model": str(tmp_path / "ad0")}, {"model": str(tmp_path / "ad1")}]})
    plan = build_plan(cfg, Pool(base=llama_base, models=views, base_given=True), chunk_elements=64)
    merged = {t.name for t in plan.merged}
    assert "model.layers.0.self_attn.q_proj.weight" in merged and not plan.warnings


def test_open_model_passes_through_and_refuses_bad_adapters(tmp_path: Path, llama_base: Checkpoint) -> None:
    assert isinstance(open_model(llama_base.path, None), Checkpoint)
    folder = tmp_path / "ad"
    folder.mkdir()
    a = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2)}
    from safetensors.torch import save_file

    save_file(a, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CompatibilityError, match="set `base_model`"):
        open_model(folder, None)
    view = open_model(folder, llama_base)
    torch.testing.assert_close(view.read("model.layers.0.self_attn.q_proj.weight"),
                               llama_base.read("model.layers.0.self_attn.q_proj.weight").float()
                               + 2.0 * (a[next(iter(a)).replace("A", "B")] @ a[next(iter(a))]))

    for key, value, err, needle in [
        ("use_dora", True, CheckpointError, "use_dora"),
        ("peft_type", "IA3", CheckpointError, "IA3"),
    ]:
        (folder / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(err, match=needle):
            open_model(folder, llama_base)
    cfg_path = llama_base.path / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "_name_or_path": "org/base-model"}))
    base2 = open_checkpoint(llama_base.path)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    with pytest.raises(CompatibilityError, match="org/other"):
        open_model(folder, base2)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/base-model"}))
    assert isinstance(open_model(folder, base2), LoraCheckpoint)

    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({**a, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(31, 2)},
              folder / "adapter_model.safetensors")
    with pytest.raises(CompatibilityError, match="do not fit"):
        open_model(folder, llama_base)
    save_file({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
               "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.randn(32, 2)},
              folder / "adapter_model.safetensors")
    with pytest.raises(CompatibilityError, match=r"layers\.9"):
        open_model(folder, llama_base)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.randn(32)},
              folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not supported"):
        open_model(folder, llama_base)


@pytest.mark.peers
def test_conv_adapter_reads_as_peft_merge_and_unload(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1))
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    base = open_checkpoint(tmp_path / "base")
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    expected = peft_model.merge_and_unload().state_dict()
    view = open_model(tmp_path / "ad", base)
    assert _assert_view_equals(view, expected) == 2
    assert torch.equal(view.read("0.weight", (2, 5)), view.read("0.weight")[2:5])
    base.close()
