"""Peer equality of tokenizer merging (``tokenizer_source``, ``tokenizer: {tokens, pad_to_multiple_of}``,
``chat_template``) against mergekit 0.1.5, on tiny Llama models whose vocabularies differ (tests/vocab_models.py:
tokenizers built locally, nothing downloaded).

mergekit gives the tokens a union appends ids in ``get_vocab()`` order, a hash order that changes between
processes (docs/peers.md), so embedding rows are compared *by token*: the row of token ``t`` in our output against
the row of ``t`` in mergekit's, at fp32 tolerance; the padding rows (the same mean row) are compared too, and every
other tensor by name. The two output vocabularies must hold the same tokens with the same special-token settings,
and the output configs the same ``vocab_size``.
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.peers.test_mergekit import atol_for, load_dir, run_mergekit, run_ours
from tests.vocab_models import make_vocab_family

pytestmark = pytest.mark.peers

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    return make_vocab_family(tmp_path / "family")


def _config(family: dict[str, Path], method: str = "task_arithmetic", base: bool = True, **extra: Any
            ) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "dtype": "float32",
                           "models": [{"model": str(family["expert0"]), "parameters": {"weight": 0.7}},
                                      {"model": str(family["expert1"]), "parameters": {"weight": 0.4}}]}
    if base:
        cfg["base_model"] = str(family["base"])
        cfg["parameters"] = {"lambda": 1.0}
    else:
        cfg["models"].insert(0, {"model": str(family["base"]), "parameters": {"weight": 0.5}})
    cfg.update(extra)
    return cfg


def _vocab(folder: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def _special(folder: Path) -> dict[str, bool]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return {info.content: info.special for info in tok.added_tokens_decoder.values()}


def merge_both_by_token(cfg: dict[str, Any], tmp_path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Run both tools on ``cfg`` and assert the outputs equal (rows of vocabulary tensors by token); return our
    output vocabulary and tensors."""
    ours = run_ours(copy.deepcopy(cfg), tmp_path / "ours")
    theirs = run_mergekit(copy.deepcopy(cfg), tmp_path / "mergekit")
    v_ours, v_theirs = _vocab(tmp_path / "ours"), _vocab(tmp_path / "mergekit")
    assert set(v_ours) == set(v_theirs)
    if "base_model" in cfg:  # without one, mergekit's union starts from an arbitrary model's tokenizer (a set)
        assert _special(tmp_path / "ours") == _special(tmp_path / "mergekit")
    import json

    sizes = [json.loads((tmp_path / d / "config.json").read_text())["vocab_size"] for d in ("ours", "mergekit")]
    assert sizes[0] == sizes[1]
    assert sorted(ours) == sorted(theirs)
    order_theirs = [v_theirs[t] for t in sorted(v_ours, key=v_ours.__getitem__)]
    n = len(v_ours)
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name in VOCAB_TENSORS:
            assert a.shape[0] == sizes[0]
            torch.testing.assert_close(a[:n], b[order_theirs], rtol=1e-5, atol=atol_for(b), msg=name)
            torch.testing.assert_close(a[n:], b[n:], rtol=1e-5, atol=atol_for(b), msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol_for(b), msg=name)
    return v_ours, ours


@pytest.mark.parametrize("source", ["union", "base", "expert1"])
def test_tokenizer_source_equals_mergekit(family: dict[str, Path], tmp_path: Path, source: str) -> None:
    src = str(family[source]) if source == "expert1" else source
    vocab, ours = merge_both_by_token(_config(family, tokenizer_source=src), tmp_path)
    expected = {"union": 41, "base": 33, "expert1": 32}[source]
    assert len(vocab) == expected
    if source != "base":  # a token the base lacks got rows (the shared x0 from both experts, y0 from expert1)
        assert {"x0", "y0"} <= set(vocab)
        assert ours["model.embed_tokens.weight"][vocab["y0"]].abs().sum() > 0


def test_tied_embeddings_equal_mergekit(tmp_path: Path) -> None:
    """Tied Llama models (no stored LM head): the input embedding is permuted once and the output stays tied."""
    import transformers

    family = make_vocab_family(tmp_path / "tied", tied=True)
    vocab, ours = merge_both_by_token(_config(family, tokenizer={"source": "union", "pad_to_multiple_of": 8}),
                                      tmp_path)
    assert "lm_head.weight" not in ours
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == 48 == len(vocab) + 7


def test_union_without_base_averages_like_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    """No base model: a token two models have and one lacks takes their mean (no base preference)."""
    merge_both_by_token(_config(family, method="linear", base=False, tokenizer_source="union"), tmp_path)


def test_union_ties_equals_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(family, method="ties", tokenizer={"source": "union"}, parameters={"density": 0.5, "lambda": 1.0,
                                                                             "scope": "tensor"})
    merge_both_by_token(cfg, tmp_path)


def test_tokens_force_and_sources_equal_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    tokens = {
        "a3": {"source": str(family["expert0"]), "force": True},          # every model takes expert0's a3
        "x0": {"source": {"kind": "zero"}},                                  # models lacking x0 get zero rows
        "y1": {"source": {"kind": "model_token", "model": str(family["base"]), "token": "a7"}},
        "newtok": {"source": {"kind": "model_token", "model": str(family["expert1"]), "token_id": 4},
                   "force": True},                                          # a token no model has, added
        "a26": {"source": {"kind": "zero"}, "force": True},
    }
    cfg = _config(family, tokenizer={"source": "union", "tokens": tokens})
    vocab, ours = merge_both_by_token(cfg, tmp_path)
    assert "newtok" in vocab
    # forced rows are every model's (base included), so any task-vector merge returns them unchanged
    emb = ours["model.embed_tokens.weight"]
    e0 = load_dir(family["expert0"])["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["a3"]], e0[_vocab(family["expert0"])["a3"]])
    assert not emb[vocab["a26"]].any()
    e1 = load_dir(family["expert1"])["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["newtok"]], e1[4])


@pytest.mark.parametrize("multiple", [8, 64])
def test_pad_to_multiple_of_equals_mergekit(family: dict[str, Path], tmp_path: Path, multiple: int) -> None:
    cfg = _config(family, tokenizer={"source": "union", "pad_to_multiple_of": multiple})
    vocab, ours = merge_both_by_token(cfg, tmp_path)
    rows = ours["model.embed_tokens.weight"].shape[0]
    assert rows % multiple == 0 and rows - multiple < len(vocab) <= rows


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "alpaca", "exaone", "auto", "literal"])
def test_chat_template_renders_like_mergekit(family: dict[str, Path], tmp_path: Path, template: str) -> None:
    """The written template renders every test conversation as mergekit's output does (ours are our own Jinja
    for mergekit's named formats)."""
    import transformers

    value = "{% for m in messages %}{{ m['content'] }}|{% endfor %}" if template == "literal" else template
    cfg = _config(family, tokenizer_source="base", chat_template=value)
    run_ours(copy.deepcopy(cfg), tmp_path / "ours")
    run_mergekit(copy.deepcopy(cfg), tmp_path / "mergekit")
    toks = [transformers.AutoTokenizer.from_pretrained(tmp_path / d) for d in ("ours", "mergekit")]
    assert toks[0].chat_template
    for conv in CONVERSATIONS:
        for prompt in (False, True):
            a, b = (t.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt) for t in toks)
            assert a == b


CONVERSATIONS = [
    [{"role": "user", "content": " hi there "}],
    [{"role": "system", "content": "be nice "}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello\n"}, {"role": "user", "content": "q?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def test_named_templates_render_like_mergekits_files() -> None:
    """Our Jinja for each name renders as mergekit's file of that name, more conversations than above."""
    import transformers
    from mergekit._data import chat_templates

    from neuromerge.io.chat_templates import NAMED_TEMPLATES
    from tests.vocab_models import SPECIAL

    tmp = transformers.PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer(
            __import__("tokenizers").models.WordLevel({t: i for i, t in enumerate(SPECIAL)}, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    names = {p.name.removesuffix(".jinja") for p in importlib.resources.files(chat_templates).iterdir()
             if p.name.endswith(".jinja")}
    assert names == set(NAMED_TEMPLATES)
    convs = [*CONVERSATIONS, [{"role": "system", "content": "s1"}, {"role": "system", "content": " s2 "},
                              {"role": "user", "content": "x"}, {"role": "user_context", "content": "ctx"},
                              {"role": "assistant", "content": "y"}]]
    for name, ours in NAMED_TEMPLATES.items():
        theirs = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
        for conv in convs:
            for prompt in (False, True):
                try:
                    want = tmp.apply_chat_template(conv, chat_template=theirs, tokenize=False,
                                                   add_generation_prompt=prompt)
                except Exception as err:  # mistral refuses roles it does not know: ours must refuse the same
                    with pytest.raises(type(err)):
                        tmp.apply_chat_template(conv, chat_template=ours, tokenize=False, add_generation_prompt=prompt)
                    continue
                assert tmp.apply_chat_template(conv, chat_template=ours, tokenize=False,
                                               add_generation_prompt=prompt) == want, (name, conv, prompt)


def test_load_dir_sanity(family: dict[str, Path]) -> None:
    """The family's experts really have other vocabularies (the tests above would be vacuous otherwise)."""
    assert load_dir(family["expert0"])["model.embed_tokens.weight"].shape[0] == 38
    assert _vocab(family["expert1"])["a0"] != _vocab(family["base"])["a0"]
