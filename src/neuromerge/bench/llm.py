"""The ``llm`` suite: SmolLM2-135M-Instruct with one LoRA expert per task, tasks phrased as instructions answered by
one label word (model code in :mod:`neuromerge.bench.llm_model`, choices in ``docs/bench_llm.md``).

- **Backbone**: the packaged GGUF (Q4_1) converted once to an fp32 safetensors folder in the user cache.
- **Tasks**: in-domain ``sentiment``, ``subjectivity``, ``bbc_topic``, ``chatter_topic``; out-of-domain
  ``debate_party`` (held out of the merge, scored zero-shot by the merged model exactly like the others) and
  ``chatter_dialogues``: perplexity (``TaskData.metric = "perplexity"``, lower is better) of chatterbot
  conversations of the English topics that ``chatter_topic`` does not use, in SmolLM2's chat format.
- **Score** of a classification task: accuracy of ``argmax_k log p(w_k | prompt)`` over the label words ``w_k``.
- **Experts** (``mode="lora"``, the default): PEFT LoRA r=8, α=16 on q/k/v/o, dropout 0, AdamW on the answer-token
  loss. :attr:`Expert.backbone` holds only the 120 targeted weights with ``ΔW = (α/r)·B·A`` merged in, and
  :meth:`LLMSuite.backbone_state` the same 120 weights of the base, so merges touch 26.5 M of the 134.5 M
  parameters (everything else is the base's by construction). The adapters are cached in the user cache
  (``llm_expert/<hash>``, PEFT format) keyed by the suite fingerprint, the task's split hash, the budget and seed.
  Experts of the papers' kind (issue #18): ``mode="lora_all"`` = the same LoRA on every linear layer of the
  decoder (q/k/v/o, gate/up/down: 210 weights, 106 M parameters merged) and ``mode="full"`` = full fine-tuning
  of those 210 weights (:func:`~neuromerge.bench.llm_model.train_full`; stored whole, 425 MB per expert).
  The mode decides :meth:`LLMSuite.backbone_state` (:meth:`LLMSuite.prepare_mode`, called by the protocol).
- **Forward hooks**: :meth:`LLMSuite.module` is a full ``LlamaForCausalLM`` (its state dict holds every weight;
  :meth:`LLMSuite.backbone_state`'s 120 are the merged ones); a batch holds whole prompts (prefix + body,
  right-padded); :meth:`LLMSuite.logits` = the label words' log-probabilities at each row's last real token (one
  uncached pass; equal to the prefix-cached :func:`~neuromerge.bench.llm_model.label_log_probs` up to float
  rounding). Router features: ``"final"`` = mean over real tokens of the last hidden state, ``"embeddings"`` =
  mean over real tokens of ``model.embed_tokens``' output.
- **Evaluation** keeps one model in memory and reloads only the tensors it is given (``load_state_dict(strict=False)``;
  tensors loaded by an earlier call and absent from this one are reset to the base's; the same unchanged dict is
  not reloaded). Scoring: :func:`~neuromerge.bench.llm_model.label_log_probs` (prefix once per split, batches of
  ≤ ``extra["eval_rows"]`` (64) prompts with ≤ 5 % padding); :meth:`LLMSuite.evaluate_examples` gives the
  per-example results (:class:`~neuromerge.bench.suite.ExampleScores`) whose ``score`` :meth:`LLMSuite.evaluate`
  returns.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from . import llm_model as lm
from .cache import cached, read_meta
from .data import SOURCES, make_splits, raw_text_dataset
from .suite import (
    Batch,
    Budget,
    ExampleScores,
    Expert,
    SplitName,
    StateDict,
    Suite,
    TaskData,
    mean_pool,
    module_output,
    token_batches,
)
from .suites import BenchError

BACKBONE = "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32)"
SUITE_FORMAT = 1
IN_DOMAIN: tuple[str, ...] = ("sentiment", "subjectivity", "bbc_topic", "chatter_topic")
OUT_OF_DOMAIN: tuple[str, ...] = ("debate_party",)
PPL_TASK = "chatter_dialogues"
#: the question of each task's system turn (a task without one, e.g. a user task, gets DEFAULT_QUESTION)
QUESTIONS: dict[str, str] = {
    "sentiment": "Is the sentiment of this movie review positive or negative?",
    "subjectivity": "Is this movie text a plot summary or a review?",
    "bbc_topic": "What is the topic of this news article?",
    "chatter_topic": "What is the topic of this chat message?",
    "debate_party": "Is the speaker of this 2016 US presidential debate statement a Democrat or a Republican?",
}
DEFAULT_QUESTION = "Which category does this text belong to?"
#: class name -> label word where the class name itself is not the natural single-token answer
LABEL_WORDS: dict[str, str] = {"rotten": " negative", "fresh": " positive", "ai": " AI", "democrat": " Democrat",
                               "republican": " Republican"}
ADAPTER_FILE = "adapter_model.safetensors"
#: the trained weights of a ``mode="full"`` expert
FULL_FILE = "expert.safetensors"


def label_word(tokenizer: Any, cls: str) -> str:
    """The label word of class ``cls``: :data:`LABEL_WORDS`, else the first of `` cls``, `` Cls``, `` cls``
    lower-cased (underscores as spaces) that is a single token; a :class:`BenchError` when none is."""
    name = cls.replace("_", " ").strip()
    candidates = [LABEL_WORDS[cls]] if cls in LABEL_WORDS else []
    candidates += [f" {name}", f" {name.capitalize()}", f" {name.lower()}"]
    for word in candidates:
        if len(lm.token_ids(tokenizer, word)) == 1:
            return word
    raise BenchError(f"class {cls!r}: none of {candidates} is a single SmolLM2 token; the llm suite answers with "
                     "one label word per class (rename the class)")


def _held_out_dialogues(used_topics: set[str]) -> list[str]:
    """Chat-formatted conversations of chatterbot-corpus's English topic files not in ``used_topics``."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the data package 'chatterbot-corpus' is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    out = []
    for path in sorted(folder.glob("*.yml")):
        if path.stem in used_topics:
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [t.strip() for t in conv or [] if isinstance(t, str) and t.strip()]
            if len(turns) >= 2:
                out.append(lm.chat_text(turns))
    return out


class LLMSuite(Suite):
    """SmolLM2-135M-Instruct + LoRA experts on instruction-phrased text classification; OOD: debate party
    (zero-shot) and chatterbot dialogue perplexity."""

    name: ClassVar[str] = "llm"
    description: ClassVar[str] = ("SmolLM2-135M-Instruct with LoRA (q/k/v/o; or every linear layer) or fully "
                                  "fine-tuned experts; sentiment, "
                                  "subjectivity, BBC topic, chatterbot topic as label-word instructions; OOD: "
                                  "debate party (zero-shot), chatterbot dialogue perplexity")
    modes: ClassVar[tuple[str, ...]] = ("lora", "lora_all", "full")
    #: every evaluation is a forward of a 135M-parameter LM (~10 s per method on the test splits): a ``--quick``
    #: run without ``--methods`` runs these three (the full static set takes ~285 s with the experts cached)
    quick_methods: ClassVar[tuple[str, ...] | None] = ("task_arithmetic", "ties", "neuromerging")

    def __init__(self, settings: lm.LoraSettings | None = None, split_seed: int = 0, rebuild: bool = False,
                 full_settings: lm.FullSettings | None = None) -> None:
        self.settings = settings or lm.LoraSettings()
        self.full_settings = full_settings or lm.FullSettings()
        #: the expert mode whose weights :meth:`backbone_state` holds (:meth:`prepare_mode`)
        self.mode = "lora"
        self.split_seed = split_seed
        self.rebuild = rebuild
        self._folder: Path | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._base: StateDict | None = None
        #: keys currently loaded into the model that may differ from the base
        self._loaded: set[str] = set()
        #: (the last loaded backbone, its (key, tensor id, version) stamp): a repeated load of it is skipped
        self._stamp: tuple[StateDict, tuple[tuple[str, int, int], ...]] | None = None
        self._encoded: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    # -- contract ------------------------------------------------------------------------------------------

    def budget(self, quick: bool) -> Budget:
        """``--quick``: 8 steps × 8 examples per expert, texts cut at 24 tokens, 16 validation / 32 test examples
        per task, 16 dialogues of ≤ 48 tokens; normal: 24 steps, 40 tokens, 32 validation / 256 test examples
        (issue #18: at least 200 per task; ``debate_party`` has 155 in all), 32 dialogues of ≤ 64 tokens. (One
        evaluation of 32 prompts is ~1,000 tokens: ~3-6 s on 2 shared cores.)"""
        if quick:
            return Budget(quick=True, train_steps=8, batch_size=8, eval_examples=32, probe_steps=0,
                          extra={"max_text_tokens": 24, "val_examples": 16, "ppl_examples": 16, "ppl_tokens": 48,
                                 "eval_batch": 16})
        return Budget(quick=False, train_steps=24, batch_size=8, eval_examples=256, probe_steps=0,
                      extra={"max_text_tokens": 40, "val_examples": 32, "ppl_examples": 32, "ppl_tokens": 64,
                             "eval_batch": 16})

    def tasks(self, budget: Budget) -> list[TaskData]:
        """The in-domain tasks (train split = ``train_steps × batch_size`` examples, one epoch), ``debate_party``
        (no train split: scored zero-shot) and the dialogue perplexity task; val / test capped by
        ``extra["val_examples"]`` / ``eval_examples``."""
        n_train, n_test = budget.train_steps * budget.batch_size, budget.eval_examples
        n_val = int(budget.extra.get("val_examples", n_test))
        out = []
        for name in IN_DOMAIN + OUT_OF_DOMAIN:
            texts, labels, classes = raw_text_dataset(name)
            out.append(make_splits(name, texts, labels, classes, seed=self.split_seed, in_domain=name in IN_DOMAIN,
                                   sizes=(n_train if name in IN_DOMAIN else 0, n_val, n_test),
                                   source=SOURCES.get(name, "")))
        out.append(self.dialogue_task(int(budget.extra.get("ppl_examples", n_test))))
        return out

    def dialogue_task(self, n_eval: int) -> TaskData:
        """The perplexity task: held-out chatterbot conversations (one pseudo-class, no train split)."""
        used = set(raw_text_dataset("chatter_topic")[2])
        dialogues = _held_out_dialogues(used)
        task = make_splits(PPL_TASK, dialogues, [0] * len(dialogues), ["dialogue"], seed=self.split_seed,
                           sizes=(0, n_eval, n_eval), in_domain=False,
                           source="chatterbot-corpus English conversations of the topics chatter_topic leaves out, "
                                  "chat format; metric: perplexity (lower is better)")
        return dataclasses.replace(task, metric="perplexity")

    def prepare_mode(self, mode: str) -> None:
        """Select the expert mode before :meth:`backbone_state` is read: it decides which weights experts change
        (``lora``: q/k/v/o; ``lora_all`` and ``full``: every linear layer of the decoder)."""
        if mode not in self.modes:
            raise BenchError(f"suite {self.name!r} trains {', '.join(self.modes)} experts, not {mode!r}")
        if mode != self.mode:
            self.mode = mode
            self._base = None

    def modules(self) -> tuple[str, ...]:
        """The modules whose weights this mode's experts change (:data:`~.llm_model.MODE_MODULES`)."""
        return lm.MODE_MODULES[self.mode]

    def backbone_state(self) -> StateDict:
        """The base's weights that this mode's experts change (``lora``: the q/k/v/o projections; ``lora_all`` /
        ``full``: every linear layer of the decoder)."""
        return {k: v.clone() for k, v in self._base_state().items()}

    def merge_exclude(self) -> list[str]:
        return []

    def model_type(self) -> str | None:
        return "llama"

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        """LoRA expert of ``task`` (cached: ``llm_expert/<hash>`` holds the PEFT adapter and its scores)."""
        if task.metric != "accuracy" or len(task.train) == 0:
            raise BenchError(f"task {task.name!r} has no labelled train split to fine-tune an expert on")
        self.prepare_mode(mode)
        key = {"suite": self.fingerprint(), "task": task.name, "task_fingerprint": task.fingerprint, "mode": mode,
               "seed": seed, "steps": budget.train_steps, "batch_size": budget.batch_size,
               "max_text_tokens": self._max_text_tokens(budget), "eval_examples": budget.eval_examples}
        built = False

        def build(folder: Path) -> dict[str, Any]:
            nonlocal built
            built = True
            return self._train_to(folder, task, budget, seed)

        rebuild = self.rebuild or bool(budget.extra.get("rebuild", False))
        entry = cached("llm_expert", key, build, rebuild=rebuild)
        meta = read_meta(entry)
        from safetensors.torch import load_file

        info = {k: meta[k] for k in ("val_score", "final_train_loss", "train_seconds", "losses", "trained_params")
                if k in meta}
        if mode == "full":
            stored = load_file(entry / FULL_FILE)
            backbone = {k: stored[k] for k in self._base_state()}
            return Expert(task=task.name, backbone=backbone, head=None, test_score=float(meta["test_score"]),
                          meta={"mode": mode, "seed": seed, "steps": budget.train_steps,
                                "batch_size": budget.batch_size, "lr": self.full_settings.lr,
                                "modules": list(self.modules()), "expert_dir": str(entry), "cached": not built,
                                **info})
        backbone = lm.merge_lora(self._base_state(), load_file(entry / ADAPTER_FILE), self.settings.scaling)
        return Expert(task=task.name, backbone=backbone, head=None, test_score=float(meta["test_score"]),
                      meta={"mode": mode, "seed": seed, "steps": budget.train_steps, "batch_size": budget.batch_size,
                            "lr": self.settings.lr, "lora_r": self.settings.r, "lora_alpha": self.settings.alpha,
                            "modules": list(self.modules()), "adapter_dir": str(entry), "cached": not built,
                            **info})

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """No heads: tasks are scored by label words (the "pre-trained + heads" row is the base zero-shot)."""
        return None

    def fit_probe_module(self, module: nn.Module, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """No heads (see :meth:`fit_probe`)."""
        return None

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        """Accuracy of the label-word prediction on ``split`` of ``task`` (perplexity for a perplexity task) with
        the base model whose tensors named in ``backbone`` are replaced by ``backbone``'s:
        ``evaluate_examples(...).score``."""
        return self.evaluate_examples(backbone, head, task, split, budget).score

    def evaluate_examples(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                          budget: Budget) -> ExampleScores:
        """Per-example results on ``split`` (split order): ``argmax_k log p(w_k | prompt_n) = y_n``, or for a
        perplexity task each dialogue's summed NLL and number of predicted tokens."""
        if head is not None:
            raise BenchError(f"suite {self.name!r} has no task heads (label-word scoring); got a head for "
                             f"task {task.name!r}")
        if len(getattr(task, split)) == 0:
            raise BenchError(f"task {task.name!r} has an empty {split} split")
        return self._examples(self._load(backbone), task, split, budget)

    def expert_rank(self) -> int | None:
        return None if self.mode == "full" else self.settings.r

    # -- forward hooks -------------------------------------------------------------------------------------

    def module(self, backbone: StateDict) -> nn.Module:
        """A new fp32 ``LlamaForCausalLM`` (eval mode, parameters requiring gradients): the base with the tensors
        of ``backbone`` substituted. Its state dict holds every weight (a superset of :meth:`backbone_state`)."""
        return copy.deepcopy(self._load(backbone)).eval().requires_grad_(True)

    def batches(self, task: TaskData, split: SplitName, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        """Whole prompts (``prefix ‖ body``) of the first ``limit`` examples, grouped by length and right-padded
        with the pad token: ``inputs = {input_ids, attention_mask}``."""
        enc = self.encode(task, split, budget)
        n = len(enc.bodies) if limit is None else min(limit, len(enc.bodies))
        prompts = [enc.prompt(i) for i in range(n)]
        size = batch_size or int(budget.extra.get("eval_batch", 16))
        return token_batches(prompts, getattr(task, split).labels, size, self._tok().pad_token_id)

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        """``(B, K)``: ``log softmax(LM logits at the last real token)[v_k]`` for the label-word tokens ``v_k``
        (only that position is projected onto the vocabulary: ``logits_to_keep``)."""
        if head is not None:
            raise BenchError(f"suite {self.name!r} has no task heads (label-word scoring); got a head for "
                             f"task {task.name!r}")
        if task.metric != "accuracy" or batch.mask is None:
            raise BenchError(f"task {task.name!r}: label-word logits need a classification task and a masked batch")
        last = (batch.mask.sum(1) - 1).unsqueeze(1)
        out = module(**batch.inputs, logits_to_keep=last, use_cache=False).logits[:, 0]
        words = self.template(task.name, task.classes).label_words
        ids = torch.tensor([lm.single_token(self._tok(), w) for w in words], dtype=torch.long)
        return torch.log_softmax(out.float(), dim=-1)[:, ids]

    def pooled(self, module: nn.Module, batch: Batch, source: Literal["embeddings", "final"]) -> torch.Tensor:
        """Mean over real tokens of the last hidden state (``"final"``: ``hidden_states[-1]``) or of the token
        embeddings (``"embeddings"``: the forward stops after ``model.embed_tokens``), in fp32."""
        if batch.mask is None:
            raise BenchError("llm suite: a batch needs its attention mask")
        if source == "final":
            hidden = module(**batch.inputs, output_hidden_states=True, logits_to_keep=1,
                            use_cache=False).hidden_states[-1]
        elif source == "embeddings":
            hidden = module_output(module, self.feature_module(), batch.inputs)
        else:
            raise BenchError(f"llm suite: unknown feature source {source!r} (embeddings, final)")
        return mean_pool(hidden.float(), batch.mask)

    def feature_module(self) -> str:
        return "model.embed_tokens"

    def evaluate_module_examples(self, module: nn.Module, head: StateDict | None, task: TaskData,
                                 split: SplitName, budget: Budget) -> ExampleScores:
        """Per-example correctness (:meth:`Suite.evaluate_module_examples`), or for a perplexity task its
        per-dialogue NLL under ``module`` exactly as :meth:`evaluate_examples` computes it."""
        if task.metric != "perplexity":
            return super().evaluate_module_examples(module, head, task, split, budget)
        with torch.no_grad():
            return self._ppl_examples(module, task, split, budget)

    def fingerprint(self) -> dict[str, Any]:
        # the mode-specific entries appear only outside the default mode, so that caches of lora experts stay valid
        mode = {} if self.mode == "lora" else {"expert_mode": self.mode, "modules": list(self.modules()),
                                               **({"full": dataclasses.asdict(self.full_settings)}
                                                  if self.mode == "full" else {})}
        return {"suite": self.name, "format": SUITE_FORMAT, "backbone": BACKBONE, "conversion": lm.conversion_key(),
                **mode, "lora": dataclasses.asdict(self.settings), "lora_targets": list(lm.TARGET_MODULES),
                "optimizer": "AdamW, linear warm-up then cosine decay", "loss": "answer label-word token only",
                "prompt": {"system": "{question} Answer with one word: {words}.", "user": "{text}",
                           "assistant": lm.ANSWER_PREFIX, "format": "SmolLM2 chat template (<|im_start|>role)"},
                "questions": QUESTIONS, "default_question": DEFAULT_QUESTION, "label_words": LABEL_WORDS,
                "split_seed": self.split_seed, "packages": lm.package_versions()}

    # -- helpers -------------------------------------------------------------------------------------------

    def template(self, name: str, classes: Sequence[str], max_text_tokens: int = 48) -> lm.PromptTemplate:
        """The prompt of task ``name`` with classes ``classes`` (their label words in class order)."""
        words = tuple(label_word(self._tok(), c) for c in classes)
        return lm.PromptTemplate(QUESTIONS.get(name, DEFAULT_QUESTION), words, max_text_tokens)

    def encode(self, task: TaskData, split: SplitName, budget: Budget) -> lm.EncodedTask:
        """Token ids of ``split``'s prompts (memoised per task content, split and truncation)."""
        width = self._max_text_tokens(budget)
        key = (task.name, task.fingerprint or id(task), tuple(task.classes), split, width)
        hit = self._encoded.get(key)
        if hit is None:
            hit = lm.encode_prompts(self._tok(), self.template(task.name, task.classes, width),
                                   getattr(task, split).inputs)
            self._encoded[key] = hit
            while len(self._encoded) > 32:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(key)
        return hit

    def _examples(self, model: Any, task: TaskData, split: SplitName, budget: Budget) -> ExampleScores:
        """:meth:`evaluate_examples` on the loaded ``model``."""
        if task.metric == "perplexity":
            return self._ppl_examples(model, task, split, budget)
        enc = self.encode(task, split, budget)
        scores = lm.label_log_probs(model, enc, pad_id=self._tok().pad_token_id,
                                    batch_size=int(budget.extra.get("eval_rows", lm.MAX_ROWS)))
        return ExampleScores("accuracy", correct=scores.argmax(1) == getattr(task, split).labels)

    def _ppl_examples(self, model: Any, task: TaskData, split: SplitName, budget: Budget) -> ExampleScores:
        """Per-dialogue NLL and token count of ``split``'s texts cut at ``ppl_tokens`` tokens under ``model``."""
        nll, count = lm.sequence_nll(model, self.dialogue_tokens(task, split, budget),
                                     pad_id=self._tok().pad_token_id,
                                     batch_size=max(1, int(budget.extra.get("eval_batch", 16)) // 2))
        return ExampleScores("perplexity", nll=nll, tokens=count)

    def dialogue_tokens(self, task: TaskData, split: SplitName, budget: Budget) -> list[list[int]]:
        """Token ids of a perplexity split's texts cut at ``ppl_tokens`` (memoised like :meth:`encode`)."""
        width = int(budget.extra.get("ppl_tokens", 64))
        key = ("ppl", task.name, task.fingerprint or id(task), split, width)
        hit = self._encoded.get(key)
        if hit is None:
            texts = list(getattr(task, split).inputs)
            ids = self._tok()(texts, add_special_tokens=False)["input_ids"] if texts else []
            hit = [list(x)[:width] for x in ids]
            self._encoded[key] = hit
            while len(self._encoded) > 32:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(key)
        return hit

    @staticmethod
    def _max_text_tokens(budget: Budget) -> int:
        return int(budget.extra.get("max_text_tokens", 48))

    def folder(self) -> Path:
        """The converted model folder (converted on first use)."""
        if self._folder is None:
            self._folder = lm.converted_dir(rebuild=self.rebuild)
        return self._folder

    def model(self) -> Any:
        if self._model is None:
            self._model = lm.load_model(self.folder())
        return self._model

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = lm.load_tokenizer(self.folder())
        return self._tokenizer

    def _base_state(self) -> StateDict:
        if self._base is None:
            model = self._load({})
            state = model.state_dict()
            self._base = {k: state[k].detach().clone() for k in lm.target_keys(model, self.modules())}
        return self._base

    def _base_tensors(self, keys: set[str]) -> StateDict:
        """Base values of ``keys``: the targeted ones from memory, any other from the converted safetensors."""
        from safetensors import safe_open

        out = {k: self._base[k] for k in keys if self._base is not None and k in self._base}
        rest = keys - set(out)
        if rest:
            with safe_open(str(self.folder() / "model.safetensors"), framework="pt") as f:
                names = set(f.keys())
                for k in rest:
                    # tied embeddings: ``lm_head.weight`` is stored as ``model.embed_tokens.weight``
                    out[k] = f.get_tensor(k if k in names else "model.embed_tokens.weight")
        return out

    def _load(self, backbone: StateDict) -> Any:
        """The shared model holding the base with ``backbone``'s tensors substituted."""
        model = self.model()
        known = set(model.state_dict())
        unknown = sorted(set(backbone) - known)
        if unknown:
            raise BenchError(f"backbone tensors {unknown[:3]} are not SmolLM2 weights ({len(unknown)} unknown)")
        stamp = tuple((k, id(v), v._version) for k, v in backbone.items())
        if self._stamp is not None and self._stamp[0] is backbone and self._stamp[1] == stamp:
            return model  # the same tensors, unchanged since they were loaded (e.g. the next task of a grid point)
        restore = self._base_tensors(self._loaded - set(backbone))
        with torch.no_grad():
            model.load_state_dict({**restore, **backbone}, strict=False)
        self._loaded = set(backbone)
        self._stamp = (backbone, stamp)
        return model

    def _train_to(self, folder: Path, task: TaskData, budget: Budget, seed: int) -> dict[str, Any]:
        """Train the expert of ``self.mode``, save it into ``folder`` (LoRA: the PEFT adapter; full: the trained
        weights, safetensors) and score it."""
        start = time.perf_counter()
        base = self._load(self._base_state())
        enc = self.encode(task, "train", budget)
        targets = torch.tensor(enc.label_ids)[task.train.labels]
        pad = self._tok().pad_token_id
        if self.mode == "full":
            from safetensors.torch import save_file

            backbone, losses = lm.train_full(base, enc, targets, steps=budget.train_steps,
                                             batch_size=budget.batch_size, settings=self.full_settings, seed=seed,
                                             pad_id=pad, modules=self.modules())
            seconds = time.perf_counter() - start
            save_file(backbone, str(folder / FULL_FILE))
            trained = sum(v.numel() for v in backbone.values())
        else:
            peft_model, losses = lm.train_lora(base, enc, targets, steps=budget.train_steps,
                                               batch_size=budget.batch_size, settings=self.settings, seed=seed,
                                               pad_id=pad, modules=self.modules())
            peft_model.save_pretrained(str(folder))
            (folder / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: not part of the expert
            seconds = time.perf_counter() - start
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(peft_model)
            trained = sum(v.numel() for v in adapter.values())
            backbone = lm.merge_lora(self._base_state(), adapter, self.settings.scaling)
            del peft_model
        scores = {s: self.evaluate(backbone, None, task, s, budget) for s in ("val", "test")}
        tail = losses[-3:]
        return {"test_score": scores["test"], "val_score": scores["val"], "losses": losses,
                "final_train_loss": sum(tail) / max(1, len(tail)), "train_seconds": round(seconds, 2),
                "trained_params": trained}
