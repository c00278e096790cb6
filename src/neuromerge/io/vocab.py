"""Tokenizer vocabularies of model folders, compared before embedding rows are merged by index.

The merge combines row ``i`` of every model's input / output embedding, so row ``i`` must stand for the same token
in every model. A folder's vocabulary is read (JSON and text only, no tokenizer library) from the first of

* ``tokenizer.json`` (Hugging Face *tokenizers*: ``model.vocab`` — a token → id map for BPE / WordPiece / WordLevel,
  a list of ``[token, score]`` pairs, ids by position, for Unigram — plus ``added_tokens``),
* ``vocab.json`` (token → id, GPT-2-style slow tokenizers), ``vocab.txt`` (one token per line, id = line number,
  BERT-style),

with ``added_tokens.json`` (token → id) on top. A folder with none of them (or a bare weights file, or a
SentencePiece ``tokenizer.model`` only, which is binary) is not compared.

Two vocabularies are *compatible* when every id both define names the same token: one may extend the other with
added tokens (the rows ``vocab: shared`` takes from the model that has them). Identical files are not parsed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: vocabulary files, in the order they are read (the first present wins; ``added_tokens.json`` is added on top)
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
ADDED_TOKENS = "added_tokens.json"


def _digest(folder: Path) -> str | None:
    """SHA-256 over the vocabulary files present (None when there are none)."""
    h = hashlib.sha256()
    found = False
    for name in (*VOCAB_FILES, ADDED_TOKENS):
        f = folder / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest() if found else None


def read_vocab(folder: Path) -> dict[int, str] | None:
    """id → token of the tokenizer in ``folder`` (see the module docstring), or None when it has no readable
    vocabulary (then nothing can be compared). Unparseable files count as absent."""
    if not folder.is_dir():
        return None
    vocab: dict[int, str] | None = None
    try:
        for name in VOCAB_FILES:
            f = folder / name
            if not f.is_file():
                continue
            if name == "vocab.txt":
                lines = f.read_text(encoding="utf-8").split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                vocab = dict(enumerate(lines))
            elif name == "vocab.json":
                vocab = _from_token_ids(json.loads(f.read_text(encoding="utf-8")))
            else:
                vocab = _from_tokenizer_json(json.loads(f.read_text(encoding="utf-8")))
            if vocab is not None:
                break
        added = folder / ADDED_TOKENS
        if added.is_file():
            extra = _from_token_ids(json.loads(added.read_text(encoding="utf-8")))
            if extra:
                vocab = {**(vocab or {}), **extra}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return vocab or None


def _from_token_ids(doc: object) -> dict[int, str] | None:
    if not isinstance(doc, dict):
        return None
    return {int(i): str(tok) for tok, i in doc.items() if isinstance(i, int)}


def _from_tokenizer_json(doc: object) -> dict[int, str] | None:
    if not isinstance(doc, dict):
        return None
    model = doc.get("model") or {}
    raw = model.get("vocab") if isinstance(model, dict) else None
    vocab: dict[int, str] = {}
    if isinstance(raw, dict):
        vocab = _from_token_ids(raw) or {}
    elif isinstance(raw, list):  # Unigram: [[token, score], ...], id = position
        vocab = {i: str(entry[0]) for i, entry in enumerate(raw) if isinstance(entry, list) and entry}
    for tok in doc.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int) and "content" in tok:
            vocab[int(tok["id"])] = str(tok["content"])
    return vocab or None


def first_difference(a: dict[int, str], b: dict[int, str]) -> tuple[int, str, str] | None:
    """The smallest id both vocabularies define with different tokens, as ``(id, token in a, token in b)``; None
    when they agree on every shared id (one may extend the other)."""
    for i in sorted(a.keys() & b.keys()):
        if a[i] != b[i]:
            return i, a[i], b[i]
    return None


def vocab_mismatch(base: Path, other: Path) -> tuple[int, str, str] | None:
    """:func:`first_difference` of the vocabularies of the folders ``base`` and ``other`` (None when either has
    none, or the files are identical)."""
    if not (base.is_dir() and other.is_dir()):
        return None
    da, db = _digest(base), _digest(other)
    if da is None or db is None or da == db:
        return None
    va, vb = read_vocab(base), read_vocab(other)
    if va is None or vb is None:
        return None
    return first_difference(va, vb)


__all__ = ["first_difference", "read_vocab", "vocab_mismatch"]
