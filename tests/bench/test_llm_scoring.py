"""The llm suite's fast scoring (:func:`~neuromerge.bench.llm_model.label_log_probs`, :func:`sequence_nll`) against
slow references kept here only: the previous implementation (the prefix re-run for every batch of 16, right-padded
length-sorted batches) and each whole prompt run alone. A tiny random Llama (no asset needed) makes them fast."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuromerge.bench import llm_model as lm
from neuromerge.tasks.contract import length_batches, pad_right

PAD = 0


@pytest.fixture(scope="module")
def tiny() -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=PAD, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.eval().requires_grad_(False)


def _task(n: int, seed: int, prefix_len: int = 7) -> lm.EncodedTask:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 97) for _ in range(prefix_len)]
    bodies = [[rng.randrange(1, 97) for _ in range(rng.choice([3, 3, 5, 8, 8, 8, 13, 21]))] for _ in range(n)]
    return lm.EncodedTask(prefix, bodies, [5, 17, 42])


@torch.inference_mode()
def _old_label_log_probs(model: object, enc: lm.EncodedTask, batch_size: int = 16) -> torch.Tensor:
    """The scoring before issue 18: the prefix re-run for every batch (answer_log_probs), batches of
    ``batch_size`` sorted by length and right-padded."""
    out = torch.empty(len(enc.bodies), len(enc.label_ids))
    labels = torch.tensor(enc.label_ids)
    for idx in length_batches(enc.bodies, batch_size):
        ids, mask = pad_right([enc.bodies[i] for i in idx], PAD)
        out[idx] = lm.answer_log_probs(model, enc.prefix, ids, mask)[:, labels]
    return out


@torch.inference_mode()
def _alone(model: object, enc: lm.EncodedTask) -> torch.Tensor:
    """Each whole prompt alone: no cache, no padding, no mask."""
    rows = [torch.log_softmax(model(torch.tensor([enc.prompt(n)])).logits[0, -1], -1)[enc.label_ids]  # type: ignore
            for n in range(len(enc.bodies))]
    return torch.stack(rows)


@pytest.mark.parametrize(("rows", "waste"), [(64, 0.05), (4, 0.0), (3, 1.0), (1, 0.05)])
def test_label_log_probs_equal_the_old_scoring_and_each_prompt_alone(tiny: object, rows: int, waste: float) -> None:
    enc = _task(40, seed=rows)
    new = lm.label_log_probs(tiny, enc, pad_id=PAD, batch_size=rows, max_waste=waste)
    old = _old_label_log_probs(tiny, enc)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5)
    torch.testing.assert_close(new, _alone(tiny, enc), rtol=0, atol=1e-5)
    assert torch.equal(new.argmax(1), old.argmax(1))  # the same predictions
    assert bool((new < 0).all()) and bool((new.exp().sum(1) < 1).all())  # log-probs of a softmax over the vocab


def test_label_log_probs_without_prefix_and_empty(tiny: object) -> None:
    enc = _task(9, seed=3, prefix_len=0)
    torch.testing.assert_close(lm.label_log_probs(tiny, enc, pad_id=PAD), _alone(tiny, enc), rtol=0, atol=1e-5)
    assert lm.label_log_probs(tiny, lm.EncodedTask([1, 2], [], [3]), pad_id=PAD).shape == (0, 1)


def test_sequence_nll_is_each_sequences_hf_loss(tiny: object) -> None:
    rng = random.Random(1)
    seqs = [[rng.randrange(1, 97) for _ in range(rng.choice([1, 2, 6, 6, 11]))] for _ in range(17)]
    nll, count = lm.sequence_nll(tiny, seqs, pad_id=PAD, batch_size=4)
    assert count.tolist() == [len(s) - 1 for s in seqs]
    with torch.inference_mode():
        ref = [float(tiny(torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1)  # type: ignore
               if len(s) > 1 else 0.0 for s in seqs]
    torch.testing.assert_close(nll, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert lm.perplexity(tiny, seqs, pad_id=PAD, batch_size=3) == pytest.approx(
        math.exp(sum(ref) / sum(len(s) - 1 for s in seqs)), rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=60), st.integers(1, 9), st.sampled_from([0.0, 0.05, 0.3]))
def test_length_buckets_cover_once_and_bound_padding(lengths: list[int], rows: int, waste: float) -> None:
    batches = lm.length_buckets(lengths, rows, waste)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= rows
        real = sum(lengths[i] for i in b)
        padded = max(lengths[i] for i in b) * len(b)
        assert padded - real <= waste * real + 1e-9
        if waste == 0:
            assert len({lengths[i] for i in b}) == 1
    # greedy: two consecutive batches could not have been one (too many rows or too much padding)
    for a, b in itertools.pairwise(batches):
        joined = [*a, b[0]]
        real = sum(lengths[i] for i in joined)
        assert len(joined) > rows or max(lengths[i] for i in joined) * len(joined) > (1 + waste) * real
