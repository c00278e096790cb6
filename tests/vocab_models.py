"""Tiny Llama models whose tokenizers differ, built locally (the ``tokenizers`` library, WordLevel), for the
tokenizer-merge tests.

* ``base``: ``<unk> <s> </s>`` (special) and the words ``a0 … a29``;
* ``expert0``: the base's vocabulary plus ``x0 … x4`` (appended), rows of shared tokens = the base's + noise;
* ``expert1``: the base's words in another order without ``a25 … a29``, plus ``x0`` (shared with expert0, not the
  base) and ``y0 … y2``, and a chat template.

Every non-embedding tensor of an expert is the base's plus seeded noise, so task vectors are small as in a
fine-tune.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<unk>", "<s>", "</s>"]
BASE_WORDS = [f"a{i}" for i in range(30)]
EXPERT_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


def vocabularies() -> dict[str, list[str]]:
    """Token list (id order) of each model of the family."""
    g = torch.Generator().manual_seed(5)
    shuffled = [BASE_WORDS[i] for i in torch.randperm(25, generator=g).tolist()]
    return {
        "base": SPECIAL + BASE_WORDS,
        "expert0": SPECIAL + BASE_WORDS + [f"x{i}" for i in range(5)],
        "expert1": SPECIAL + shuffled + ["x0", "y0", "y1", "y2"],
    }


def save_tokenizer(tokens: list[str], path: Path, chat_template: str | None = None) -> None:
    """A WordLevel tokenizer (whitespace pre-tokenizer) with ids in ``tokens`` order, saved as a fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)


def _llama(vocab_size: int, tied: bool = False) -> torch.nn.Module:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg)


def make_vocab_family(root: Path, tied: bool = False) -> dict[str, Path]:
    """The three model folders (weights, config, tokenizer) under ``root`` (``tied``: the LM head is the input
    embedding, not stored)."""
    vocabs = vocabularies()
    torch.manual_seed(0)
    base = _llama(len(vocabs["base"]), tied)
    base_state = base.state_dict()
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    save_tokenizer(vocabs["base"], out["base"])
    base_ids = {t: i for i, t in enumerate(vocabs["base"])}
    for k, name in enumerate(("expert0", "expert1")):
        tokens = vocabs[name]
        torch.manual_seed(10 + k)
        model = _llama(len(tokens), tied)
        g = torch.Generator().manual_seed(100 + k)
        state = model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                    for i, t in enumerate(tokens):
                        if t in base_ids:
                            value[i] = base_state[key][base_ids[t]] + 0.02 * torch.randn(value.shape[1:], generator=g)
                else:
                    value.copy_(base_state[key] + 0.02 * torch.randn(value.shape, generator=g))
        out[name] = root / name
        model.save_pretrained(out[name])
        save_tokenizer(tokens, out[name], EXPERT_TEMPLATE if name == "expert1" else None)
    return out
