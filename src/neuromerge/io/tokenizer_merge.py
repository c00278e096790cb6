"""Output vocabularies of models whose tokenizers differ: mergekit 0.1.5's ``tokenizer_source`` / ``tokenizer:``.

The output tokenizer is built from the models' tokenizers (Hugging Face ``transformers``, fast tokenizers):

* ``base`` — the base model's tokenizer (the first model's when there is no base);
* ``union`` — the base's tokenizer plus every token of the other models it lacks, appended in model order and, per
  model, in id order (regular tokens first, then the models' added tokens with their settings; the first model's
  settings win);
* a model path — that folder's tokenizer;

then the ``tokens:`` of a ``tokenizer:`` block not in it are appended. Every embedding-like tensor (rows indexed by
token id: input embeddings and LM head) of every model is then *permuted* to the output vocabulary by token string
(:meth:`VocabularyMerge.remap`, mergekit's ``PermutedVocabulary``), and the merge method combines the permuted rows
as it combines any tensor. A model that has the token gives its own row. For a model that lacks it, the row is a
*default* embedding, chosen per token (``assign_embedding_sources``):

* the ``tokens:`` entry when there is one — ``source: MODEL`` (that model's row of the token), ``source: {kind:
  model_token, model, token_id | token}`` (a given row of that model), ``source: {kind: zero}``; with ``force: true``
  every model, even one that has the token, takes it;
* else, if only one model has the token, that model's row; if none has it, zero (a warning);
* else, if the base has it, the base's row; else the mean of the rows of the models that have it.

``pad_to_multiple_of: k`` pads the rows to a multiple of ``k``; each model's padding rows are the mean of its
permuted rows (https://nlp.stanford.edu/~johnhew/vocab-expansion.html, as mergekit). ``vocab_size`` of the output
config becomes the padded size.

Differences with mergekit: the ids given to appended tokens follow id order (mergekit follows the order of
``get_vocab()``, a hash order that changes between runs), so the same token may have another id — rows are equal by
token; defaults are computed in float32 (mergekit in the input dtype); a model whose tokenizer cannot be loaded
uses the base's vocabulary, as mergekit, with a warning; a base tokenizer holding ids beyond its model's
``vocab_size`` is refused (mergekit strips them from BPE tokenizers).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import CompatibilityError, ConfigError

if TYPE_CHECKING:
    from ..config import TokenizerSpec

LOG = logging.getLogger(__name__)

#: tokenizer files removed from the output before the merged tokenizer is saved (a stale ``vocab.json`` or
#: ``tokenizer.model`` next to the new ``tokenizer.json`` would describe another vocabulary)
TOKENIZER_ONLY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                        "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json")


@dataclass(frozen=True)
class TokenRule:
    """Where a token's default row comes from: ``model`` (row ``row`` of checkpoint ``model``; ``row`` None = that
    model's row of the token), ``zero``, ``mean`` (of the models that have it) or ``none`` (no default: valid only
    while every model has the token and nothing forces it)."""

    kind: Literal["model", "zero", "mean", "none"]
    model: int | None = None
    row: int | None = None
    force: bool = False


@dataclass
class VocabularyMerge:
    """The output vocabulary and, per checkpoint of the pool (in :attr:`Pool.checkpoints` order), the row of each
    output token (−1: the model lacks it)."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    vocab: dict[str, int]
    size: int  # rows of the output embeddings (len(vocab) padded to pad_to_multiple_of)
    maps: torch.Tensor  # (checkpoints, len(vocab)) int64: output id → row of that checkpoint, −1 when absent
    rules: dict[int, TokenRule]  # output id → default rule, for the ids some model lacks or a rule forces
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.vocab)

    def check_rows(self, name: str, rows: Sequence[int]) -> None:
        """Refuse a tensor ``name`` whose checkpoints (``rows[i]`` rows each) lack a row a map or rule points to."""
        for i, n in enumerate(rows):
            top = int(self.maps[i].max()) if self.maps.shape[1] else -1
            if top >= n:
                raise CompatibilityError(
                    f"{name!r} of checkpoint {i} has {n} rows, but its tokenizer gives a token id {top}")
        for tid, rule in self.rules.items():
            if rule.kind == "model" and rule.row is not None and not 0 <= rule.row < rows[rule.model or 0]:
                raise ConfigError(f"tokens: row {rule.row} (token_id) given for {self._token(tid)!r} is out of "
                                  f"range for {name!r} ({rows[rule.model or 0]} rows)")

    def _token(self, tid: int) -> str:
        return next(t for t, i in self.vocab.items() if i == tid)

    def remap(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each checkpoint's rows (``tensors[i]``: rows × …) permuted to the output vocabulary (mergekit's
        ``PermutedVocabulary.execute``): the model's own row of each token it has and nothing forces, else the
        token's default row (:class:`TokenRule`); padding rows are the mean of the model's first ``len(vocab)``."""
        n_tok = self.tokens
        shape = tuple(tensors[0].shape[1:])
        dtype = tensors[0].dtype
        device = tensors[0].device
        maps = self.maps.to(device)
        forced = torch.zeros(n_tok, dtype=torch.bool, device=device)
        for tid, rule in self.rules.items():
            forced[tid] = rule.force
        defaults: dict[int, torch.Tensor] = {}
        mean_ids = torch.tensor([t for t, r in self.rules.items() if r.kind == "mean"], dtype=torch.long,
                                device=device)
        if mean_ids.numel():
            acc = torch.zeros((mean_ids.numel(), *shape), dtype=dtype, device=device)
            count = torch.zeros(mean_ids.numel(), dtype=dtype, device=device)
            for i, t in enumerate(tensors):  # summed in model order from zero, then divided (as mergekit)
                rows = maps[i, mean_ids]
                have = rows >= 0
                acc[have] += t[rows[have]]
                count += have.to(dtype)
            acc /= count.view(-1, *([1] * len(shape)))
            defaults.update(zip(mean_ids.tolist(), acc, strict=True))
        for tid, rule in self.rules.items():
            if rule.kind == "zero":
                defaults[tid] = torch.zeros(shape, dtype=dtype, device=device)
            elif rule.kind == "model":
                assert rule.model is not None
                row = rule.row if rule.row is not None else int(maps[rule.model, tid])
                defaults[tid] = tensors[rule.model][row]
        default_ids = torch.tensor(sorted(defaults), dtype=torch.long, device=device)
        default_rows = torch.stack([defaults[t] for t in sorted(defaults)]) if defaults else None
        out = []
        for i, t in enumerate(tensors):
            new = torch.zeros((self.size, *shape), dtype=dtype, device=device)
            own = (maps[i] >= 0) & ~forced
            ids = own.nonzero().flatten()
            new[ids] = t[maps[i, ids]]
            if default_rows is not None:
                take = ~own[default_ids]
                new[default_ids[take]] = default_rows[take]
            if self.size > n_tok:
                new[n_tok:] = new[:n_tok].mean(dim=0)
            out.append(new)
        return out


def _auto_tokenizer() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is in the `hf` extra
        raise ConfigError("tokenizer merging needs transformers: pip install 'neuromerge[hf]'") from err
    return transformers.AutoTokenizer


def load_tokenizer(path: str | Path) -> Any:
    """The fast tokenizer of a model folder (transformers' ``AutoTokenizer``), local files only."""
    return _auto_tokenizer().from_pretrained(str(path), use_fast=True, local_files_only=True)


def _vocab_size(config: dict | None, tokenizer: Any) -> int:
    cfg = config or {}
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return len(tokenizer.get_vocab())


def _by_id(vocab: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(vocab.items(), key=lambda kv: kv[1])


def _union(base_tok: Any, tokenizers: list[tuple[Any, int]]) -> Any:
    """mergekit's ``build_union_tokenizer``, with the appended tokens in model then id order."""
    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for tok, vocab_size in tokenizers:
        for t, idx in _by_id(tok.get_vocab()):
            if idx < vocab_size:
                out_vocab.setdefault(t)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < vocab_size and info.content not in out_added:
                out_added[info.content] = info
    res = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def _copy(tok: Any) -> Any:
    """A fresh copy of a tokenizer (saved and reloaded, so adding tokens leaves ``tok`` alone)."""
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return load_tokenizer(d)


def build_vocabulary(spec: TokenizerSpec, folders: Sequence[Path], configs: Sequence[dict | None],
                     base_index: int | None, model_index: Callable[[str], int | None]) -> VocabularyMerge:
    """Build the output tokenizer of ``spec`` for the pool's checkpoints (``folders[0]`` is the base, or the first
    model; ``base_index`` is 0 when a base model is given, None otherwise) and the rows each one gives; resolve the
    ``tokens:`` rules. ``model_index`` maps a model path of the config to its checkpoint index (None: not in the
    pool). Reads tokenizer files and configs only; no tensor."""
    warnings: list[str] = []
    tokenizers: list[Any] = []
    sizes: list[int] = []
    for i, folder in enumerate(folders):
        try:
            tok = load_tokenizer(folder)
        except Exception as err:
            if i == 0:
                raise CompatibilityError(f"cannot load the tokenizer of {folder} ({type(err).__name__}: "
                                         f"{str(err).splitlines()[0] if str(err) else ''}); the output vocabulary "
                                         "is built from it") from None
            warnings.append(f"cannot load the tokenizer of {folder}; its vocabulary is taken to be the base's")
            tok = tokenizers[0]
        tokenizers.append(tok)
        sizes.append(_vocab_size(configs[i], tok))
    base_tok, base_size = tokenizers[0], sizes[0]
    beyond = [t for t, idx in base_tok.get_vocab().items() if idx >= base_size]
    if beyond:
        raise CompatibilityError(
            f"the tokenizer of {folders[0]} has {len(beyond)} token(s) at ids >= its model's vocab_size {base_size} "
            f"(e.g. {beyond[0]!r}); stripping them is not supported: use a tokenizer that fits the model")
    if spec.source == "base":
        out = _copy(base_tok)
    elif spec.source == "union":
        out = _union(base_tok, list(zip(tokenizers, sizes, strict=True)))
    else:
        try:
            out = load_tokenizer(spec.source)
        except Exception as err:
            raise ConfigError(f"tokenizer source {spec.source!r}: cannot load a tokenizer from it "
                              f"({type(err).__name__})") from None
    token_specs = spec.tokens or {}
    present = set(out.get_vocab())
    for t in token_specs:
        if t not in present:
            out.add_tokens(t)
            present.add(t)
    vocab = dict(out.get_vocab())
    n_tok = len(vocab)
    if sorted(vocab.values()) != list(range(n_tok)):
        raise CompatibilityError(f"the output tokenizer's ids are not 0..{n_tok - 1}; it cannot index embedding rows")
    maps = torch.full((len(folders), n_tok), -1, dtype=torch.long)
    originals = [tok.get_vocab() for tok in tokenizers]
    for i, model_vocab in enumerate(originals):
        for t, new in vocab.items():
            old = model_vocab.get(t)
            if old is not None and old < sizes[i]:
                maps[i, new] = old
    rules = _rules(vocab, maps, token_specs, originals, base_index, model_index, warnings)
    size = n_tok
    k = spec.pad_to_multiple_of
    if k and size % k:
        size = (size // k + 1) * k
    return VocabularyMerge(out, vocab, size, maps, rules, spec.source, warnings)


def _rules(vocab: dict[str, int], maps: torch.Tensor, token_specs: dict[str, Any], originals: list[dict[str, int]],
           base_index: int | None, model_index: Callable[[str], int | None], warnings: list[str]
           ) -> dict[int, TokenRule]:
    """Default-row rules for the ids some model lacks or a ``tokens:`` entry forces (``assign_embedding_sources``
    then ``compute_default_embedding`` of mergekit), checked before any tensor is read."""
    has = maps >= 0
    rules: dict[int, TokenRule] = {}
    for t, tid in vocab.items():
        missing = not bool(has[:, tid].all())
        spec = token_specs.get(t)
        if spec is not None:
            if not (spec.force or missing):
                continue
            rules[tid] = _user_rule(t, tid, spec, has, originals, model_index)
            continue
        if not missing:
            continue
        n = int(has[:, tid].sum())
        if n == 1:
            rules[tid] = TokenRule("model", int(has[:, tid].nonzero()[0, 0]))
        elif n == 0:
            warnings.append(f"token {t!r} is in no model; its embedding rows are zero")
            rules[tid] = TokenRule("zero")
        elif base_index is not None and bool(has[base_index, tid]):
            rules[tid] = TokenRule("model", base_index)
        else:
            rules[tid] = TokenRule("mean")
    return rules


def _user_rule(token: str, tid: int, spec: Any, has: torch.Tensor, originals: list[dict[str, int]],
               model_index: Callable[[str], int | None]) -> TokenRule:
    src = spec.source
    where = f"tokenizer.tokens[{token!r}]"
    if src is None:
        raise ConfigError(f"{where}: {'force needs' if spec.force else 'a token some model lacks needs'} a `source` "
                          "(a model, {kind: model_token, ...} or {kind: zero})")
    if getattr(src, "kind", None) == "zero":
        return TokenRule("zero", force=spec.force)
    model = src if isinstance(src, str) else src.model
    i = model_index(model)
    if i is None:
        raise ConfigError(f"{where}: source model {model} is not one of the merged models")
    if isinstance(src, str):
        if not bool(has[i, tid]):
            raise ConfigError(f"{where}: source model {model} has no token {token!r}")
        return TokenRule("model", i, force=spec.force)
    row = src.token_id
    if row is None:
        if src.token not in originals[i]:
            raise ConfigError(f"{where}: token {src.token!r} is not in the tokenizer of {model}")
        row = originals[i][src.token]
    if row < 0:
        raise ConfigError(f"{where}: token_id must be >= 0, got {row}")
    return TokenRule("model", i, row=row, force=spec.force)


def write_tokenizer(out: Path, tokenizer: Any, chat_template: str | None) -> None:
    """Save ``tokenizer`` (with ``chat_template`` when given) into ``out``, replacing the tokenizer files there."""
    for name in TOKENIZER_ONLY_FILES:
        (out / name).unlink(missing_ok=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))


__all__ = ["TokenRule", "VocabularyMerge", "build_vocabulary", "load_tokenizer", "write_tokenizer"]
