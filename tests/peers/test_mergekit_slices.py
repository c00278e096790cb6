"""Peer-equality tests of mergekit ``slices`` and ``passthrough``: neuromerge vs mergekit 0.1.5 on the same config
dict and the same tiny model folders (4 layers each, made locally), at fp32 tolerance (tests/peers/test_mergekit.py).

Covered: a frankenmerge (two models' layer ranges, passthrough) on Llama / Mistral / GPT-2 / tied Llama, a
depth-upscaling config (one model's overlapping ranges), gradient SLERP in slice form, parameter precedence (source
over slice over config) with linear, TIES per slice, passthrough's ``scale``; the output config's layer count and a
``from_pretrained`` load. Pinned differences (docs/peers.md): per-layer config lists (``layer_types``) are assembled
here where mergekit's output config does not validate, and a tied donor config with a written LM head.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import save
from tests.peers.test_mergekit import assert_same_model, run_mergekit, run_ours

pytestmark = pytest.mark.peers

LAYERS = 4


def _model(arch: str, seed: int, *, tie: bool = False) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8,
                                                  max_window_layers=2))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=32,
                                                bos_token_id=0, eos_token_id=0))
    raise ValueError(arch)


@pytest.fixture
def pair(tmp_path: Path):
    """``pair(arch, tie=False)`` → two unrelated models of ``arch`` (seeds 0, 1) with 4 layers each."""

    def make(arch: str = "llama", tie: bool = False) -> tuple[str, str]:
        root = tmp_path / f"{arch}-{tie}"
        return tuple(str(save(_model(arch, i, tie=tie), root / f"m{i}")) for i in range(2))  # type: ignore[return-value]

    return make


def both(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "mergekit")


def frankenmerge(a: str, b: str) -> dict[str, Any]:
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4]}]},
    ]}


def out_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("mistral", False), ("gpt2", True), ("llama", True)])
def test_frankenmerge_equals_mergekit(pair, tmp_path: Path, arch: str, tie: bool) -> None:
    import transformers as tf
    from safetensors.torch import load_file

    a, b = pair(arch, tie)
    ours, theirs = both(frankenmerge(a, b), tmp_path)
    assert_same_model(ours, theirs)
    # the layers are the sources' own, at their new indices: layer 3 of the output is layer 1 of b
    src_b = load_file(Path(b) / "model.safetensors")
    key = "h.{}.mlp.c_fc.weight" if arch == "gpt2" else "model.layers.{}.mlp.up_proj.weight"
    prefix = "transformer." if arch == "gpt2" and "transformer." + key.format(3) in ours else ""
    assert torch.equal(ours[prefix + key.format(3)], src_b[prefix + key.format(1)])
    assert not torch.equal(ours[prefix + key.format(3)], ours[prefix + key.format(1)])
    assert (not tie) == any("lm_head" in n for n in ours)  # a tied model writes no head, as mergekit
    cfg, theirs_cfg = out_config(tmp_path / "ours"), out_config(tmp_path / "mergekit")
    n_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert cfg[n_key] == theirs_cfg[n_key] == 6
    assert cfg.get("tie_word_embeddings", True) == tie or arch == "gpt2"
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.get_text_config().num_hidden_layers == 6
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and bool(torch.isfinite(logits).all())


def test_depth_upscaling_equals_mergekit(pair, tmp_path: Path) -> None:
    a, _ = pair("mistral")
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": a, "layer_range": [1, 4]}]},
    ]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    from safetensors.torch import load_file

    src = load_file(Path(a) / "model.safetensors")
    for out_layer, src_layer in ((0, 0), (1, 1), (2, 2), (3, 1), (4, 2), (5, 3)):  # layers 1 and 2 are repeated
        assert torch.equal(ours[f"model.layers.{out_layer}.self_attn.q_proj.weight"],
                           src[f"model.layers.{src_layer}.self_attn.q_proj.weight"])
    assert out_config(tmp_path / "ours")["num_hidden_layers"] == 6


def test_gradient_slerp_slice_form_equals_mergekit(pair, tmp_path: Path) -> None:
    a, b = pair("llama")
    cfg = {"merge_method": "slerp", "base_model": a, "dtype": "float32",
           "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    from safetensors.torch import load_file

    src_a = load_file(Path(a) / "model.safetensors")
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], src_a["model.layers.0.self_attn.q_proj.weight"])


def test_slices_of_different_ranges_with_a_gradient_per_slice_equal_mergekit(pair, tmp_path: Path) -> None:
    """Two slices of two sources each, a gradient over each slice's own layers, a 1-layer slice (t = 1)."""
    a, b = pair("llama")
    cfg = {"merge_method": "slerp", "base_model": a, "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [1, 4]}],
         "parameters": {"t": [0.1, 0.9]}},
        {"sources": [{"model": a, "layer_range": [3, 4]}, {"model": b, "layer_range": [0, 1]}],
         "parameters": {"t": [0.2, 0.6]}},
    ], "parameters": {"t": 0.5}}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert out_config(tmp_path / "ours")["num_hidden_layers"] == 4


def test_parameter_precedence_source_slice_config_equals_mergekit(pair, tmp_path: Path) -> None:
    a, b = pair("llama")
    cfg = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0, "normalize": True}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8]}},
                     {"model": b, "layer_range": [2, 4]}], "parameters": {"weight": 0.5}},
        {"sources": [{"model": a, "layer_range": [1, 4]},
                     {"model": b, "layer_range": [0, 3], "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}}],
         "parameters": {"weight": [{"filter": "self_attn", "value": 3.0}]}},
    ]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)


def test_ties_per_slice_equals_mergekit(pair, tmp_path: Path) -> None:
    a, b = pair("llama")
    cfg = {"merge_method": "ties", "base_model": a, "dtype": "float32",
           "parameters": {"scope": "tensor", "weight": 1.0},
           "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]},
                     {"model": b, "layer_range": [2, 4], "parameters": {"density": 0.5, "weight": 0.7}}]},
        {"sources": [{"model": a, "layer_range": [1, 4]}, {"model": b, "layer_range": [0, 3],
                                                           "parameters": {"density": 0.3}}]},
    ]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)


def test_passthrough_scale_equals_mergekit(pair, tmp_path: Path) -> None:
    a, b = pair("llama")
    cfg = frankenmerge(a, b)
    cfg["slices"][1]["parameters"] = {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj",
                                                                                    "value": 0.25}]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    from safetensors.torch import load_file

    src_b = load_file(Path(b) / "model.safetensors")
    torch.testing.assert_close(ours["model.layers.4.self_attn.o_proj.weight"],
                               0.5 * src_b["model.layers.2.self_attn.o_proj.weight"], rtol=0, atol=0)


def test_passthrough_of_one_whole_model_equals_mergekit(pair, tmp_path: Path) -> None:
    a, _ = pair("llama")
    cfg = {"merge_method": "passthrough", "dtype": "float32", "models": [{"model": a}]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)


def test_layer_types_are_assembled_where_mergekit_writes_no_valid_config(pair, tmp_path: Path) -> None:
    """Qwen2 (sliding window on layers ≥ 2): the output's ``layer_types`` are the sources' own, per layer. mergekit
    keeps the donor's 4-entry list for 6 layers, which transformers refuses when the config is saved."""
    import transformers as tf

    a, b = pair("qwen2")
    cfg = frankenmerge(a, b)
    run_ours(copy.deepcopy(cfg), tmp_path / "ours")
    types = out_config(tmp_path / "ours")["layer_types"]
    assert types == ["full_attention", "full_attention", "sliding_attention",  # a's layers 0..2
                     "full_attention", "sliding_attention", "sliding_attention"]  # b's layers 1..3
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert list(model.config.layer_types) == types
    with pytest.raises(Exception, match="layer_types"):
        run_mergekit(cfg, tmp_path / "mergekit")


def test_untied_head_after_a_tied_donor_is_kept(pair, tmp_path: Path) -> None:
    """First slice from a tied model (our config donor), last from an untied one: both tools write the untied
    model's ``lm_head``. mergekit's config is its donor's, an arbitrary one of the models (the first of a set), so
    its ``tie_word_embeddings`` may be ``true`` (``from_pretrained`` then ties the head to the embeddings, dropping
    it); neuromerge writes ``false`` so that the head written is the head loaded."""
    import transformers as tf
    from safetensors.torch import load_file

    tied, _ = pair("llama", True)
    _, untied = pair("llama", False)
    cfg = frankenmerge(tied, untied)
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert out_config(tmp_path / "ours")["tie_word_embeddings"] is False
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    head = load_file(Path(untied) / "model.safetensors")["lm_head.weight"]
    assert torch.equal(model.lm_head.weight.detach(), head)


def test_tied_source_gives_its_embeddings_as_the_head_like_mergekit(pair, tmp_path: Path) -> None:
    """A slice merging an untied and a tied model: the head is merged from the untied model's ``lm_head`` and the
    tied model's input embeddings (the last slice's view lists only its layers and final tensors, yet the tied
    model's embeddings are read for its head), as mergekit does."""
    _, untied = pair("llama", False)
    tied, _ = pair("llama", True)
    cfg = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": untied, "layer_range": [0, 3]}, {"model": tied, "layer_range": [0, 3]}]},
        {"sources": [{"model": untied, "layer_range": [1, 4]}, {"model": tied, "layer_range": [1, 4]}]},
    ]}
    ours, theirs = both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    from safetensors.torch import load_file

    u, t = load_file(Path(untied) / "model.safetensors"), load_file(Path(tied) / "model.safetensors")
    torch.testing.assert_close(ours["lm_head.weight"], (u["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_no_head_written_means_a_tied_config(pair, tmp_path: Path) -> None:
    """The reverse: first slice from an untied model (our donor: ``tie_word_embeddings: false``), last from a tied
    one, which has no ``lm_head`` to give. Both tools write no head; neuromerge's config says tied, so the model
    loads with its head = the embeddings written (an untied config would leave the head randomly initialised)."""
    import transformers as tf

    _, untied = pair("llama", False)
    tied, _ = pair("llama", True)
    ours, theirs = both(frankenmerge(untied, tied), tmp_path)
    assert_same_model(ours, theirs)
    assert "lm_head.weight" not in ours
    assert out_config(tmp_path / "ours")["tie_word_embeddings"] is True
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(model.lm_head.weight.detach(), ours["model.embed_tokens.weight"])



@pytest.mark.parametrize("method", ["linear", "passthrough"])
def test_tokenizer_union_over_slices_equals_mergekit(tmp_path: Path, method: str) -> None:
    """``tokenizer_source: union`` with slices: one output vocabulary over every model of the config; the
    embeddings (first slice) and the head (last slice) are permuted to it from their own slices' models. Rows of
    the vocabulary tensors are compared by token (tests/peers/test_mergekit_tokenizer.py)."""
    from tests.peers.test_mergekit_tokenizer import merge_both_by_token
    from tests.vocab_models import make_vocab_family

    fam = make_vocab_family(tmp_path / "family")
    e0, e1 = str(fam["expert0"]), str(fam["expert1"])
    if method == "linear":
        slices = [{"sources": [{"model": e0, "layer_range": [0, 1], "parameters": {"weight": 0.7}},
                               {"model": e1, "layer_range": [1, 2], "parameters": {"weight": 0.3}}]},
                  {"sources": [{"model": e1, "layer_range": [0, 2]}, {"model": e0, "layer_range": [0, 2]}]}]
    else:
        slices = [{"sources": [{"model": e0, "layer_range": [0, 2]}]},
                  {"sources": [{"model": e1, "layer_range": [1, 2]}]}]
    cfg = {"merge_method": method, "dtype": "float32", "tokenizer_source": "union", "slices": slices,
           **({"parameters": {"weight": 1.0}} if method == "linear" else {})}
    vocab, ours = merge_both_by_token(cfg, tmp_path)
    assert {"x0", "y0"} <= set(vocab)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == ours[
        "model.embed_tokens.weight"].shape[0]
