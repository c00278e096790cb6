"""Tokenizer merging (``tokenizer_source``, ``tokenizer:``, ``chat_template``; neuromerge.io.tokenizer_merge):
the permuted rows against a direct per-token formula in float64, invariance under a relabelling of a model's
vocabulary, the written tokenizer's round trip and ``from_pretrained`` load, ``--dry-run``'s vocabulary line, and
the refused forms. Peer equality with mergekit: tests/peers/test_mergekit_tokenizer.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.config import TokenizerSpec, load_config
from neuromerge.errors import ConfigError, NeuromergeError
from neuromerge.io.tokenizer_merge import build_vocabulary
from tests.vocab_models import EXPERT_TEMPLATE, make_vocab_family, save_tokenizer, vocabularies

runner = CliRunner()
EMBED = "model.embed_tokens.weight"


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    return make_vocab_family(tmp_path / "family")


def _config(family: dict[str, Path], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                           "parameters": {"lambda": 1.0},
                           "models": [{"model": str(family["expert0"])}, {"model": str(family["expert1"])}]}
    cfg.update(extra)
    return cfg


def _tokens(folder: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


# ------------------------------------------------------------------------------------ the rows, by formula
def _expected_rows(vocab: dict[str, int], model_vocabs: list[dict[str, int]], tensors: list[torch.Tensor],
                   base: int | None, tokens: dict[str, dict], rows: int) -> list[torch.Tensor]:
    """mergekit's rules written out token by token (float64): own row, else the token's default."""
    out = []
    for m, t in enumerate(tensors):
        new = torch.zeros(rows, t.shape[1], dtype=torch.float64)
        for tok, i in vocab.items():
            have = [k for k, v in enumerate(model_vocabs) if tok in v]
            spec = tokens.get(tok, {})
            if tok in model_vocabs[m] and not spec.get("force"):
                new[i] = t[model_vocabs[m][tok]]
            elif spec:
                src = spec["source"]
                new[i] = 0 if src == "zero" else tensors[src][model_vocabs[src][tok]]
            elif len(have) == 1:
                new[i] = tensors[have[0]][model_vocabs[have[0]][tok]]
            elif not have:
                new[i] = 0
            elif base is not None and base in have:
                new[i] = tensors[base][model_vocabs[base][tok]]
            else:
                new[i] = sum(tensors[k][model_vocabs[k][tok]] for k in have) / len(have)
        new[len(vocab):] = new[:len(vocab)].mean(0)
        out.append(new)
    return out


@pytest.mark.parametrize("base", [0, None])
@pytest.mark.parametrize("source", ["union", "base", "expert1"])
def test_remap_equals_the_per_token_formula(family: dict[str, Path], base: int | None, source: str) -> None:
    folders = [family["base"], family["expert0"], family["expert1"]]
    vocabs = vocabularies()
    model_vocabs = [{t: i for i, t in enumerate(vocabs[n])} for n in ("base", "expert0", "expert1")]
    tokens = {"a3": {"source": 1, "force": True}, "x1": {"source": "zero"}}
    spec = TokenizerSpec.model_validate({
        "source": str(family[source]) if source == "expert1" else source, "pad_to_multiple_of": 16,
        "tokens": {"a3": {"source": str(folders[1]), "force": True}, "x1": {"source": {"kind": "zero"}}}})
    keys = {str(f): i for i, f in enumerate(folders)}
    vm = build_vocabulary(spec, folders, [None] * 3, base, keys.get)
    assert vm.size % 16 == 0 and vm.size >= vm.tokens
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(len(v), 5, generator=g, dtype=torch.float64) for v in model_vocabs]
    got = vm.remap(tensors)
    want = _expected_rows(vm.vocab, model_vocabs, tensors, base, tokens, vm.size)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_relabelled_vocabulary_merges_the_same(family: dict[str, Path], tmp_path: Path) -> None:
    """An expert whose token ids are shuffled, with its embedding rows shuffled alike, is the same model: with
    ``tokenizer_source`` the merge is unchanged, token by token (without it, the differing ids are refused)."""
    shuffled = tmp_path / "shuffled"
    tokens = vocabularies()["expert0"]
    perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(3))
    state = load_file(family["expert0"] / "model.safetensors")
    for name in (EMBED, "lm_head.weight"):
        state[name] = state[name][perm].contiguous()
    shuffled.mkdir()
    save_file(state, shuffled / "model.safetensors", metadata={"format": "pt"})
    (shuffled / "config.json").write_text((family["expert0"] / "config.json").read_text())
    save_tokenizer([tokens[i] for i in perm.tolist()], shuffled)
    outs = []
    for i, expert in enumerate((family["expert0"], shuffled)):
        cfg = _config(family, models=[{"model": str(expert)}], tokenizer_source="union")
        neuromerge.merge(cfg, tmp_path / f"o{i}", threads=1, progress=False)
        outs.append((load_file(tmp_path / f"o{i}" / "model.safetensors"), _tokens(tmp_path / f"o{i}")))
    (a, va), (b, vb) = outs
    assert set(va) == set(vb)  # the appended tokens come in the expert's id order: compared by token
    order = [vb[t] for t in sorted(va, key=va.__getitem__)]
    for name in a:
        torch.testing.assert_close(a[name], b[name][order] if name in (EMBED, "lm_head.weight") else b[name],
                                   rtol=0, atol=0)
    with pytest.raises(NeuromergeError, match="tokenizer_source"):
        neuromerge.merge(_config(family, models=[{"model": str(shuffled)}]), tmp_path / "o2", threads=1,
                         progress=False)


# ---------------------------------------------------------------------------- the output folder, the CLI
def test_written_tokenizer_round_trips_and_loads(family: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(family, tokenizer={"source": "union", "pad_to_multiple_of": 8},
                                          chat_template="chatml")))
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    tok = transformers.AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    want = {t for v in vocabularies().values() for t in v}
    assert set(vocab) == want and sorted(vocab.values()) == list(range(len(want)))
    base_ids = {t: i for i, t in enumerate(vocabularies()["base"])}
    assert all(vocab[t] == i for t, i in base_ids.items())  # a union keeps the base's ids
    text = "a0 x0 y2 a29 a3"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [vocab[w] for w in text.split()]
    assert tok.decode(ids) == text
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                       tokenize=False)
    assert not (out / "vocab.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    rows = -(-len(want) // 8) * 8
    assert model.config.vocab_size == rows == model.get_input_embeddings().weight.shape[0]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), rows) and torch.isfinite(logits).all()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["summary"]["vocabulary"]["tokens"] == len(want)


def test_dry_run_reports_the_output_vocabulary(family: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(family, tokenizer={"source": "union", "pad_to_multiple_of": 8})))
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--dry-run", "--headers-only"])
    assert res.exit_code == 0, res.output
    assert "vocabulary       41 tokens (union), 48 embedding rows; 2 tensors permuted by token" in res.output
    assert not (tmp_path / "o").exists()


def test_paths_relative_to_the_config(family: dict[str, Path], tmp_path: Path) -> None:
    """Model paths under ``tokenizer:`` (the source, the tokens' sources) resolve against the config's folder, as
    the models' paths do."""
    root = family["base"].parent
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 1.0},
           "models": [{"model": "expert0"}, {"model": "./expert1"}],
           "tokenizer": {"source": "expert1", "tokens": {
               "a26": {"source": "expert0", "force": True},
               "x2": {"source": {"kind": "model_token", "model": "base", "token": "a1"}}}}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    neuromerge.merge(root / "c.yaml", tmp_path / "o", threads=1, progress=False)
    vocab = _tokens(tmp_path / "o")
    assert set(vocab) == set(vocabularies()["expert1"]) | {"a26", "x2"}
    out = load_file(tmp_path / "o" / "model.safetensors")[EMBED]
    e0 = load_file(family["expert0"] / "model.safetensors")[EMBED]
    torch.testing.assert_close(out[vocab["a26"]], e0[vocabularies()["expert0"].index("a26")], rtol=0, atol=0)


@pytest.mark.parametrize("value", ["auto", "chatml"])
def test_chat_template_without_tokenizer_source(family: dict[str, Path], tmp_path: Path, value: str) -> None:
    """``chat_template`` alone: the base's vocabulary, with the template (``auto``: the only model with one)."""
    import shutil

    import transformers

    twin = tmp_path / "twin"  # the base's weights and vocabulary, with a chat template
    shutil.copytree(family["base"], twin)
    save_tokenizer(vocabularies()["base"], twin, EXPERT_TEMPLATE)
    cfg = _config(family, models=[{"model": str(twin)}], chat_template=value)
    neuromerge.merge(cfg, tmp_path / "o", threads=1, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok.get_vocab() == _tokens(family["base"])
    if value == "auto":
        assert tok.chat_template == EXPERT_TEMPLATE
    else:
        assert tok.chat_template.startswith("{% for message in messages %}{{ '<|im_start|>'")


# -------------------------------------------------------------------------------------------- refusals
def _refused(family: dict[str, Path], tmp_path: Path, match: str, **extra: Any) -> None:
    with pytest.raises(NeuromergeError, match=match):
        neuromerge.merge(copy.deepcopy(_config(family, **extra)), tmp_path / "o", threads=1, progress=False)
    assert not (tmp_path / "o").exists()


def test_refused_forms(family: dict[str, Path], tmp_path: Path) -> None:
    e0, e1 = str(family["expert0"]), str(family["expert1"])
    _refused(family, tmp_path, "not both", tokenizer_source="union", tokenizer={"source": "base"})
    _refused(family, tmp_path, "force needs a `source`", tokenizer={"tokens": {"a1": {"force": True}}})
    _refused(family, tmp_path, "a token some model lacks needs a `source`", tokenizer={"tokens": {"x1": {}}})
    _refused(family, tmp_path, "is not one of the merged models",
             tokenizer={"tokens": {"x1": {"source": str(tmp_path)}}})
    _refused(family, tmp_path, f"source model {e1} has no token 'a27'",
             tokenizer={"tokens": {"a27": {"source": e1, "force": True}}})
    _refused(family, tmp_path, "'zz' is not in the tokenizer",
             tokenizer={"tokens": {"x1": {"source": {"kind": "model_token", "model": e0, "token": "zz"}}}})
    _refused(family, tmp_path, "out of range",
             tokenizer={"tokens": {"x1": {"source": {"kind": "model_token", "model": e0, "token_id": 99}}}})
    _refused(family, tmp_path, "exactly one of token_id or token",
             tokenizer={"tokens": {"x1": {"source": {"kind": "model_token", "model": e0}}}})
    _refused(family, tmp_path, "is not a template name", chat_template="nosuch")
    _refused(family, tmp_path, "excluded from merging", tokenizer_source="union", exclude=["lm_head"])
    _refused(family, tmp_path, "cannot load a tokenizer", tokenizer_source=str(tmp_path))
    _refused(family, tmp_path, "pad_to_multiple_of", tokenizer={"pad_to_multiple_of": 0})


def test_lora_output_keeps_the_base_vocabulary(family: dict[str, Path]) -> None:
    cfg = _config(family, tokenizer_source="union", output={"format": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="output format lora keeps the base's vocabulary"):
        load_config(cfg)
