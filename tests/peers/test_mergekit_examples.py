"""The mergekit parity run: every case of ``tests/peers/mergekit_examples.py`` (our own equivalents of mergekit
0.1.5's ``examples/`` and test-suite configs, plus variants) through both tools on tiny local models, asserting the
case's outcome (``equal`` / ``documented`` / ``random``; the module docstring there). ``docs/peers.md`` (*mergekit
configs: parity run*) lists the cases; ``pytest tests/peers/test_mergekit_examples.py -v`` reproduces it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import perturb, save
from tests.peers.mergekit_examples import CASES, LOW_PRECISION_C, Case, Config, Models
from tests.peers.test_mergekit import RTOL, assert_same_model, atol_for, load_dir, run_mergekit, run_ours
from tests.peers.test_mergekit_tokenizer import CONVERSATIONS, merge_both_by_token
from tests.vocab_models import make_vocab_family

pytestmark = pytest.mark.peers

StateDict = dict[str, torch.Tensor]
LOW = {"float16": (torch.float16, 2.0**-11), "bfloat16": (torch.bfloat16, 2.0**-8)}
PEERS_MD = Path(__file__).resolve().parents[2] / "docs" / "peers.md"
#: the largest |ours − mergekit| / (u · max|θ_out|) seen per low-precision case (reported in docs/peers.md)
SEEN: dict[str, tuple[float, float]] = {}
#: methods with a discrete decision that rounding can flip (a magnitude trim or top-k, `ram`'s |τ| > ε test,
#: `karcher`'s stopping rule), and the fraction of entries allowed beyond the bound for them at low precision
DISCRETE = ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl",
            "karcher")
TRIM_FLIPS = 0.01


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A 5-layer tiny Llama base, three experts perturbed from it (``a``, ``b``, ``c``), bfloat16 copies of two
    (``a16``, ``b16``), two unrelated 4-layer GPT-2 models (``gpt2``, ``gpt2b``), a 2-layer base and two experts of
    Qwen2, Mistral and Granite (``qwen2-base``, ``qwen2-a``, ``qwen2-b``, …) and the vocabulary family of
    tests/vocab_models.py (``v-base``, ``v-e0``, ``v-e1``: tokenizers that differ)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("mergekit-examples")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg)
    out = {"base": str(save(base, root / "base"))}
    for i, name in enumerate("abc"):
        perturb(model := copy.deepcopy(base), seed=300 + i, scale=0.05)
        out[name] = str(save(model, root / name))
        if name in "ab":
            out[f"{name}16"] = str(save(copy.deepcopy(model), root / f"{name}16", torch.bfloat16))
    for i, name in enumerate(("gpt2", "gpt2b")):
        torch.manual_seed(10 + i)
        gpt = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32))
        out[name] = str(save(gpt, root / name))
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    for arch, make in (("qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))),
                       ("mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**small))),
                       ("granite", lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**small)))):
        torch.manual_seed(20)
        model = make()
        out[f"{arch}-base"] = str(save(model, root / arch / "base"))
        for i, name in enumerate("ab"):
            perturb(expert := copy.deepcopy(model), seed=400 + i, scale=0.05)
            out[f"{arch}-{name}"] = str(save(expert, root / arch / name))
    vocab = make_vocab_family(root / "vocab")
    out.update({"v-base": str(vocab["base"]), "v-e0": str(vocab["expert0"]), "v-e1": str(vocab["expert1"])})
    return out


def _fp32(cfg: Config) -> Config:
    return {**copy.deepcopy(cfg), "dtype": "float32"}


def _both(cfg: Config, tmp_path: Path, tag: str) -> tuple[StateDict, StateDict]:
    return (run_ours(copy.deepcopy(cfg), tmp_path / f"ours-{tag}"),
            run_mergekit(copy.deepcopy(cfg), tmp_path / f"mergekit-{tag}", seed=11))


def _first_model(cfg: Config) -> StateDict:
    first = cfg["slices"][0]["sources"][0]["model"] if "slices" in cfg else cfg["models"][0]["model"]
    return load_dir(Path(first))


def _differs(ours: StateDict, theirs: StateDict) -> list[str]:
    assert sorted(ours) == sorted(theirs)
    return [n for n in theirs if not torch.allclose(ours[n].float(), theirs[n].float(), rtol=RTOL,
                                                    atol=atol_for(theirs[n].float()))]


def _moved_fraction(merged: StateDict, base: StateDict) -> float:
    changed = sum(int((merged[n].float() != b.float()).sum()) for n, b in base.items())
    return changed / sum(b.numel() for b in base.values())


def _check_low_precision(case: Case, cfg: Config, ours32: StateDict, tmp_path: Path) -> None:
    """``cfg`` in its own low-precision dtype: ours is the fp32 result rounded once; mergekit (which computes in
    that dtype) agrees within ``C · u · max|θ_out|`` per tensor, except, for the methods of :data:`DISCRETE`, at
    most :data:`TRIM_FLIPS` of the entries (e.g. those near a trim threshold, kept by one tool and dropped by the
    other because mergekit ranks the rounded task vectors)."""
    dtype, u = LOW[cfg["dtype"]]
    ours, theirs = _both(cfg, tmp_path, "low")
    assert sorted(ours) == sorted(theirs) == sorted(ours32)
    worst, outside, total = 0.0, 0, 0
    for name, ref in ours32.items():
        assert ours[name].dtype == theirs[name].dtype == dtype, name
        assert torch.equal(ours[name], ref.to(dtype)), f"{name}: not the fp32 result rounded once"
        units = (ours[name].double() - theirs[name].double()).abs() / (u * (float(ref.abs().max()) or 1.0))
        outside += int((units > LOW_PRECISION_C).sum())
        total += units.numel()
        inside = units[units <= LOW_PRECISION_C]
        worst = max(worst, float(inside.max()) if inside.numel() else 0.0)
    SEEN[case.id] = (worst, outside / total)
    allowed = TRIM_FLIPS if cfg["merge_method"] in DISCRETE else 0.0
    assert outside / total <= allowed, f"{case.id}: {outside}/{total} entries beyond {LOW_PRECISION_C} units"


def _check_random(cfg: Config, tmp_path: Path) -> None:
    """Independent masks: same names / shapes / dtypes, the fraction of entries moved from the base agrees within
    0.03 (≥ 5σ of two binomials over the model's ~14k entries), and the masks themselves differ; with
    ``density: 1`` (no drop) and mergekit's ``rescale`` / ``normalize`` the two are equal."""
    ours, theirs = _both(cfg, tmp_path, "random")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape and ours[name].dtype == theirs[name].dtype, name
    base = load_dir(Path(cfg["base_model"]))
    f_ours, f_theirs = _moved_fraction(ours, base), _moved_fraction(theirs, base)
    assert 0.05 < f_theirs < 0.99 and abs(f_ours - f_theirs) < 0.03, (f_ours, f_theirs)
    assert _differs(ours, theirs)
    dense = copy.deepcopy(cfg)
    params = {k: v for k, v in dense.get("parameters", {}).items() if k != "epsilon"}  # ε needs density < 1
    dense["parameters"] = {**params, "density": 1.0, "rescale": True, "normalize": False, "lambda": 1.0}
    for entry in dense["models"]:
        entry.get("parameters", {}).pop("density", None)
    ours1, theirs1 = _both(dense, tmp_path, "dense")
    assert_same_model(ours1, theirs1)


def _check_by_token(cfg: Config, tmp_path: Path) -> None:
    """Equal by token (tests/peers/test_mergekit_tokenizer.py), a real vocabulary change, the same chat template
    rendering."""
    import transformers

    _, ours = merge_both_by_token(cfg, tmp_path)
    base = load_dir(Path(cfg.get("base_model") or cfg["models"][0]["model"]))
    assert any(not torch.equal(ours[n], t) for n, t in base.items() if n in ours and ours[n].shape == t.shape)
    if "chat_template" in cfg:
        toks = [transformers.AutoTokenizer.from_pretrained(tmp_path / d) for d in ("ours", "mergekit")]
        assert toks[0].chat_template
        for conv in CONVERSATIONS:
            assert (toks[0].apply_chat_template(conv, tokenize=False)
                    == toks[1].apply_chat_template(conv, tokenize=False))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mergekit_config(case: Case, models: Models, tmp_path: Path) -> None:
    cfg = case.build(models)
    low = cfg.get("dtype") in LOW
    if case.outcome == "random":
        _check_random(_fp32(cfg) if low else cfg, tmp_path)
        assert case.row in PEERS_MD.read_text()
        return
    if case.outcome == "refused":
        from neuromerge.errors import NeuromergeError

        with pytest.raises(NeuromergeError):
            run_ours(copy.deepcopy(cfg), tmp_path / "ours")
        assert not (tmp_path / "ours" / "config.json").exists()
        with pytest.raises(ValueError, match="size mismatch"):
            run_mergekit(copy.deepcopy(cfg), tmp_path / "mergekit")
        return
    if case.outcome == "by_token":
        _check_by_token(cfg, tmp_path)
        return
    assert case.outcome in ("equal", "documented"), case.outcome
    if case.outcome == "documented":
        assert case.row and case.row in PEERS_MD.read_text(), case.row
        assert case.knob is not None
        if case.differs_in == "dtype":
            ours, theirs = _both(cfg, tmp_path, "original")
            want = LOW[cfg["dtype"]][0]
            assert all(t.dtype == want for t in ours.values())
            assert any(t.dtype != want for t in theirs.values()), "documented dtype difference not seen"
        else:
            ours, theirs = _both(_fp32(cfg), tmp_path, "original")
            assert _differs(ours, theirs), "documented as different, yet equal"
        if case.explain is not None:
            assert_same_model(run_ours(_fp32(case.explain(cfg)), tmp_path / "ours-explain"), theirs)
        cfg = case.knob(cfg)
        low = cfg.get("dtype") in LOW
    ours32, theirs32 = _both(_fp32(cfg), tmp_path, "fp32")
    assert_same_model(ours32, theirs32)
    if case.moves:
        first = _first_model(cfg)
        assert any(n in ours32 and ours32[n].shape == t.shape and not torch.allclose(ours32[n], t.float())
                   for n, t in first.items()), "the merge left the first model unchanged"
    if low:
        _check_low_precision(case, cfg, ours32, tmp_path)


def test_every_case_is_listed_in_peers_md() -> None:
    """docs/peers.md's parity table names every case with its outcome, and the count."""
    text = PEERS_MD.read_text()
    section = text[text.index("### mergekit configs: parity run"):]
    for case in CASES:
        assert re.search(rf"\| `{re.escape(case.id)}` \|[^\n]*\| {case.outcome} ", section), case.id
    assert f"{len(CASES)} configs" in section


def test_mega_multi_document_is_mergekit_multi_only(models: Models, tmp_path: Path) -> None:
    """``examples/mega.yml`` holds two YAML documents (a chain for ``mergekit-multi``): mergekit 0.1.5's
    ``mergekit-yaml`` cannot read it (one document per file); ours refuses it with one clear error too. Its two
    stages run as ``mega-stage1`` / ``mega-stage2``."""
    import yaml
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from neuromerge.cli import app

    stage1 = next(c for c in CASES if c.id == "mega-stage1").build(models)
    stage2 = next(c for c in CASES if c.id == "mega-stage2").build(models)
    path = tmp_path / "mega.yml"
    path.write_text(yaml.safe_dump_all([{**stage1, "out_path": str(tmp_path / "s1")},
                                        {**stage2, "out_path": str(tmp_path / "s2")}]))
    res = CliRunner().invoke(mergekit_yaml, [str(path), str(tmp_path / "mk")])
    assert res.exit_code != 0 and "single document" in str(res.exception)
    from typer.testing import CliRunner as TyperRunner

    ours = TyperRunner().invoke(app, ["mergekit-yaml", str(path), str(tmp_path / "nm")])
    assert ours.exit_code != 0
    assert not (tmp_path / "nm" / "config.json").exists()
    print(ours.output)


def test_report_low_precision_agreement() -> None:
    """Prints the largest disagreement (in units of the dtype's rounding) and the flipped fraction per case."""
    for name, (worst, flipped) in sorted(SEEN.items()):
        print(f"{name}: {worst:.2f} u, {flipped:.4%} flipped")
