"""Layer 2 on a user's model: a Hugging Face folder + a task file (entries without ``suite:``) + experts that are
PEFT adapters or full checkpoints, as one contract object (:func:`neuromerge.tasks.hf.open_user_model`); causal LMs
scored by label-word likelihood; config-relative paths (:mod:`neuromerge.paths`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from neuromerge.errors import TaskError
from neuromerge.paths import config_dir, looked_for, resolve_path, resolve_str
from neuromerge.tasks import ModelAccess, Suite, TaskSet
from neuromerge.tasks.contract import Budget
from neuromerge.tasks.hf import HFSuite, UserModelConfig, load_user_model, open_user_model, validate_user_model
from neuromerge.tasks.taskfile import load_task_file, load_user_tasks, read_entries

from ..routing.test_routed_methods import hf_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WORDS = [f"w{i}" for i in range(30)]


def _rows(n: int = 30, shift: int = 0) -> str:
    return "\n".join(json.dumps({"text": " ".join(WORDS[(7 * i + j + shift) % 30] for j in range(4)),
                                 "label": ["yes", "no"][i % 2]}) for i in range(n)) + "\n"


# ------------------------------------------------------------------------------------------------ paths
def test_paths_resolve_against_the_config_folder_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "m").mkdir()
    (tmp_path / "cwd" / "m").mkdir(parents=True)
    (tmp_path / "cwd" / "only-here").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    here = config_dir(tmp_path / "cfg" / "x.yaml")
    assert here == tmp_path / "cfg"
    assert resolve_path("m", here) == (tmp_path / "cfg" / "m", True)  # both exist: the config's folder wins
    assert resolve_path("only-here", here) == (tmp_path / "cwd" / "only-here", True)  # older configs still load
    assert resolve_path("gone", here) == (tmp_path / "cfg" / "gone", False)
    assert resolve_path(str(tmp_path / "cfg" / "m"), None) == (tmp_path / "cfg" / "m", True)
    assert resolve_str("m", here) == str(tmp_path / "cfg" / "m") and resolve_str("org/name", here) == "org/name"
    assert looked_for("gone", here) == f" (looked for {tmp_path / 'cfg' / 'gone'} and {tmp_path / 'cwd' / 'gone'})"
    assert looked_for(str(tmp_path / "gone"), here) == ""


# ------------------------------------------------------------------------------------------------ task files
def test_task_entries_for_a_user_model_need_no_suite(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text(_rows())
    (tmp_path / "data" / "b.jsonl").write_text(_rows(shift=3))
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n"
        "  - {name: a, file: data/a.jsonl}\n"
        "  - {name: b, suite: text, file: data/b.jsonl}\n"
        "  - {name: c, file: data/a.jsonl, label_words: ['no', 'yes'], prompt: 'Q: {text} A:'}\n")
    budget = Budget(eval_examples=6, extra={"train_examples": 10, "val_examples": 6})
    a, b = load_user_tasks(tmp_path / "tasks.yaml", budget, ["a", "b"])  # chosen by name; `suite:` ignored
    assert (a.name, b.name, a.classes, len(a.train), len(a.val)) == ("a", "b", ["no", "yes"], 10, 6)
    assert a.label_words is None
    assert [t.name for t in load_user_tasks(tmp_path / "tasks.yaml", budget)] == ["a", "c"]  # the suite-less ones
    c = load_user_tasks(tmp_path / "tasks.yaml", budget, ["c"])[0]
    assert c.label_words == ("no", "yes") and c.prompt == "Q: {text} A:"
    # the same splits as the bench's reader gives a `suite: text` entry
    [bench_b] = load_task_file(tmp_path / "tasks.yaml", "text", budget)
    assert bench_b.fingerprint == b.fingerprint
    with pytest.raises(TaskError, match=r"no task 'zz' \(found: a, b, c\)"):
        load_user_tasks(tmp_path / "tasks.yaml", budget, ["zz"])


@pytest.mark.parametrize(("entry", "message"), [
    ("{name: a, file: a.jsonl, label_words: [x, y, z]}", "label_words has 3 words for 2 classes"),
    ("{name: a, file: a.jsonl, label_words: [x, y], prompt: 'no slot'}", r"prompt must contain \{text\}"),
    ("{name: a, file: a.jsonl, prompt: '{text}'}", "prompt is only used with label_words"),
    ("{name: a, file: a.jsonl, label_words: [no, yes]}", "read as true/false"),
])
def test_label_word_entries_are_checked(tmp_path: Path, entry: str, message: str) -> None:
    (tmp_path / "a.jsonl").write_text(_rows())
    (tmp_path / "t.yaml").write_text(f"tasks:\n  - {entry}\n")
    with pytest.raises(TaskError, match=message):
        load_user_tasks(tmp_path / "t.yaml", Budget(eval_examples=4), ["a"])
    assert read_entries  # the reader is the library's


# ------------------------------------------------------------------------------------------------ HF folder
def test_a_user_model_is_a_contract_object_with_adapter_or_full_experts(tmp_path: Path) -> None:
    raw, merged = hf_fixture(tmp_path)
    (tmp_path / "tasks.yaml").write_text(  # no `suite:` keys
        "tasks:\n  - {name: t0, file: t0.jsonl}\n  - {name: t1, file: t1.jsonl}\n")
    merged[1].save_pretrained(tmp_path / "full1")  # expert t1 as a full checkpoint folder
    raw = {k: v for k, v in raw.items() if k != "params"}
    (tmp_path / "cfg.yaml").write_text("")
    lora = load_user_model({**raw, "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "ad1"}},
                           source=tmp_path / "cfg.yaml")
    full = load_user_model({**raw, "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "full1"}},
                           source=tmp_path / "cfg.yaml")
    for ts in (lora, full):
        assert isinstance(ts, TaskSet) and isinstance(ts.suite, Suite) and isinstance(ts.suite, ModelAccess)
        assert ts.task_names == ["t0", "t1"] and [e.task for e in ts.experts] == ["t0", "t1"]
        assert all(e.head is not None for e in ts.experts)
    assert lora.suite.expert_rank() == 2 and full.suite.expert_rank() is None  # a full expert: no LoRA rank
    assert full.experts[1].meta["kind"] == "full" and lora.experts[1].meta["kind"] == "lora"
    for k, v in lora.experts[1].backbone.items():
        torch.testing.assert_close(full.experts[1].backbone[k], v, atol=1e-5, rtol=1e-5)
    acc = full.suite.evaluate(full.experts[0].backbone, full.experts[0].head, full.tasks[0], "val", full.budget)
    assert 0.0 <= acc <= 1.0

    # MERGE's objective takes the same object
    from neuromerge.search.merge_problem import MergeProblem

    problem = MergeProblem.from_taskset(full, quantize=False)  # fp32 library: "all separate" is the experts
    assert problem.task_names == ["t0", "t1"] and len(problem.components) >= 2
    assert problem.evaluate(problem.space.all_separate()) == pytest.approx(100.0)


def test_user_model_problems_are_listed_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("loaded before validation")

    monkeypatch.setattr(HFSuite, "__init__", forbidden)
    (tmp_path / "t.yaml").write_text("tasks:\n  - {name: a, file: a.jsonl}\n")
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(TaskError) as info:
        validate_user_model({"base": "nobase", "tasks": "t.yaml", "experts": {"a": "notmodel", "b": "x"},
                             "seq_len": 1}, source=tmp_path / "c.yaml")
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{tmp_path / 'c.yaml'}: ") for line in lines), lines
    text = "\n".join(lines)
    for part in ("seq_len: Input should be greater than or equal to 4", "base: model folder nobase does not exist",
                 "experts.a: ", "is neither a PEFT LoRA adapter folder", "experts.b: expert x does not exist",
                 "no task 'b'", f"task 'a': data file {tmp_path / 'a.jsonl'} does not exist"):
        assert part in text, (part, text)


def _tiny_llama(folder: Path) -> None:
    """A 1-layer Llama with a word-level tokenizer (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "Q:", "A:", *WORDS, "yes", "no"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def test_causal_lm_scores_label_words_or_a_probe(tmp_path: Path) -> None:
    _tiny_llama(tmp_path / "llama")
    (tmp_path / "a.jsonl").write_text(_rows())
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - {name: words, file: a.jsonl, label_words: ['no', 'yes'], prompt: 'Q: {text} A:'}\n"
        "  - {name: probe, file: a.jsonl}\n")
    experts = {"words": "llama", "probe": "llama"}
    cfg, _ = validate_user_model({"base": "llama", "tasks": "t.yaml", "experts": experts, "seq_len": 8,
                                  "probe_steps": 5}, source=tmp_path / "c.yaml")
    assert isinstance(cfg, UserModelConfig)
    ts = open_user_model(cfg)  # the base itself as a full-checkpoint expert
    suite = ts.suite
    assert isinstance(suite, HFSuite) and suite.causal and suite.model_type() == "llama"
    words, probe = ts.tasks
    assert ts.experts[0].head is None and ts.experts[1].head is not None  # label words: no probe
    module = suite.module(ts.base)
    batch = suite.batches(words, "val", ts.budget, limit=4)[0]
    assert batch.inputs["input_ids"].shape[1] <= 8
    got = suite.logits(module, None, words, batch)
    ids = suite.label_word_ids(words)
    tok = suite.tokenizer
    assert ids == [tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")]
    with torch.no_grad():
        logits = module(**batch.inputs).logits
    last = batch.mask.sum(1) - 1
    want = logits[torch.arange(len(batch)), last].float().log_softmax(-1)[:, ids]
    torch.testing.assert_close(got.detach(), want)
    for text_ids in batch.inputs["input_ids"]:  # the prompt's end survives truncation
        real = [int(i) for i in text_ids if int(i) != 0]
        assert real[-1] == tok.convert_tokens_to_ids("A:")
    acc = suite.evaluate(ts.base, None, words, "test", ts.budget)
    assert 0.0 <= acc <= 1.0
    assert suite.logits(module, ts.experts[1].head, probe, suite.batches(probe, "val", ts.budget)[0]).shape[1] == 2
    with pytest.raises(TaskError, match="needs a probe head"):
        suite.logits(module, None, probe, suite.batches(probe, "val", ts.budget)[0])
