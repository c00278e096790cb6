"""A user's Hugging Face model as the tasks contract: a base folder, a task file and one expert per task.

:class:`HFSuite` implements :class:`~.contract.Suite` over a local Hugging Face model folder: an encoder
(``AutoModel``) or a causal LM (``*ForCausalLM`` in ``config.json``'s architectures: ``AutoModelForCausalLM``).
Features are the mean over real tokens of the last hidden state (``"final"``) or of the embedding layer's output
(``"embeddings"``). A task is scored by a linear probe on the ``"final"`` features (:func:`~.probe.fit_linear`),
or — causal LMs, for a task whose task-file entry gives ``label_words`` — by label-word likelihood: the class
scores are the log-probabilities of each label word's first token after the task's ``prompt`` (a leading space
is added to a word unless the prompt ends with whitespace; the words' first tokens must differ).

Experts are PEFT LoRA adapter folders (``adapter_config.json``: ``θ0 + s·B·A`` over the base, read one module at a
time by :mod:`neuromerge.io.lora`) or full checkpoints of the same architecture (any model folder or
``.safetensors`` file :func:`~neuromerge.io.checkpoint.open_checkpoint` reads; tensors it lacks keep the base's).

The way in for a pipeline: :class:`UserModelConfig` (the YAML keys ``base``, ``tasks``, ``experts`` and the data
budget), :func:`check_user_model` (every problem of the paths, one line each, before anything is loaded) and
:func:`open_user_model` (a :class:`~.contract.TaskSet`: the suite, its budget, the tasks in expert order, the base
state and one expert per task with its probe head). :func:`load_user_model` does both from a raw mapping. Paths
resolve against the config file's folder (:mod:`neuromerge.paths`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..errors import NeuromergeError, TaskError, validation_lines
from ..numeric import FiniteFloat
from ..paths import config_dir, looked_for, resolve_path
from .contract import (
    Batch,
    Budget,
    Expert,
    FeatureSource,
    SplitName,
    StateDict,
    Suite,
    TaskData,
    TaskSet,
    mean_pool,
    module_output,
    token_batches,
)

#: files any of which gives a base folder a tokenizer (``tokenizer_config.json`` alone: byte-level tokenizers)
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


# ------------------------------------------------------------------------------------------------ config
class UserModelConfig(BaseModel):
    """A user's model and task data, as a YAML config gives them (route build, and the pipelines built on it).

    ``experts`` maps each task of the ``tasks`` file (:mod:`~.taskfile`: the entries are chosen by these names; no
    ``suite:`` key needed) to its expert — a PEFT LoRA adapter folder or a full checkpoint — in router order. Each
    task's data is split 60 / 20 / 20 (seeded by ``seed``), the train split capped at ``train_examples``, the
    validation and test splits at ``val_examples``."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="local Hugging Face model folder (config, weights, tokenizer) or a cached hub id")
    tasks: str = Field(description="task file (YAML) listing the data of every expert's task")
    experts: dict[str, str] = Field(min_length=1, description="task name -> PEFT LoRA adapter folder or full "
                                                              "checkpoint")
    seq_len: int = Field(64, ge=4)
    batch_size: int = Field(16, ge=1)
    train_examples: int = Field(1000, ge=1)
    val_examples: int = Field(200, ge=1)
    probe_steps: int = Field(100, ge=1)
    probe_l2: FiniteFloat = Field(1e-3, ge=0)
    seed: int = 0

    def budget(self) -> Budget:
        """The data budget: split caps, batch size, probe recipe."""
        return Budget(eval_examples=self.val_examples, batch_size=self.batch_size, probe_steps=self.probe_steps,
                      extra={"train_examples": self.train_examples, "val_examples": self.val_examples,
                             "probe_l2": self.probe_l2})


#: the keys of :class:`UserModelConfig`
USER_MODEL_KEYS = tuple(UserModelConfig.model_fields)


@dataclasses.dataclass
class UserModelCheck:
    """What :func:`check_user_model` found: problems (one line each) and the resolved paths (None where missing)."""

    problems: list[str]
    base_ref: str | None = None  # what to record: the absolute folder, or the hub id
    base: Path | None = None  # the local folder (a hub id's snapshot)
    tasks: Path | None = None
    experts: dict[str, str] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ checks
def check_base(raw: str, base_dir: Path | None, allow_download: bool) -> tuple[str, Path | None, list[str]]:
    """``(reference to record, local folder or None, problems)`` of a config's ``base``: a local Hugging Face
    folder (config.json + a tokenizer), else an ``org/name`` id in the local hub cache, downloaded only with
    ``allow_download``."""
    from ..io.hub import cached_snapshot, hf_cache_dir, looks_like_hf_id, resolve_hf_id

    path, exists = resolve_path(raw, base_dir)
    ref = str(path)
    if not exists:
        if not looks_like_hf_id(raw):
            return raw, None, [f"base: model folder {raw} does not exist{looked_for(raw, base_dir)}"]
        snapshot = cached_snapshot(raw)
        if snapshot is None and not allow_download:
            return raw, None, [f"base: {raw} is neither a local folder{looked_for(raw, base_dir)} nor a model in "
                               f"the local Hugging Face cache ({hf_cache_dir()}); pass --allow-download to fetch it "
                               "from the hub"]
        if snapshot is None:
            try:
                snapshot = resolve_hf_id(raw, allow_download=True)
            except Exception as err:  # the hub client's many error types: one line for the user
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                return raw, None, [f"base: cannot download {raw} from the Hugging Face hub: {first}"]
        path, ref = snapshot, raw  # a hub id is recorded as the id (load_routed finds it in the cache)
    if not path.is_dir():
        return ref, None, [f"base: {path} is not a folder; give a Hugging Face model folder (config.json, weights, "
                           "tokenizer)"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"base: {path} has no config.json; give a Hugging Face model folder")
    if not any((path / name).is_file() for name in TOKENIZER_VOCAB):
        problems.append(f"base: {path} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB[:5])}, …); save it "
                        "there with tokenizer.save_pretrained")
    return ref, path, problems


def check_expert(name: str, raw: str, base_dir: Path | None) -> tuple[str, list[str]]:
    """``(absolute path, problems)`` of one expert: a PEFT adapter folder (``adapter_config.json``) or a checkpoint
    :func:`~neuromerge.io.checkpoint.open_checkpoint` reads (headers only)."""
    from ..io.checkpoint import open_checkpoint
    from ..io.lora import ADAPTER_CONFIG

    path, exists = resolve_path(raw, base_dir)
    if not exists:
        return str(path), [f"experts.{name}: expert {raw} does not exist{looked_for(raw, base_dir)}"]
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return str(path), []
    try:
        with open_checkpoint(path):
            pass
    except NeuromergeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return str(path), [f"experts.{name}: {path} is neither a PEFT LoRA adapter folder (no {ADAPTER_CONFIG}) "
                           f"nor a model checkpoint ({first})"]
    return str(path), []


def check_user_model(raw: Mapping[str, Any], base_dir: Path | None, *, allow_download: bool = False
                     ) -> UserModelCheck:
    """Every problem of a user-model config's paths, one line each, before anything is loaded: the base
    (:func:`check_base`), the task file (parsed; every expert's task present; its data file present) and each expert
    (:func:`check_expert`). Keys of a wrong type are skipped (the field validation reports them)."""
    from .taskfile import data_file, read_entries

    found = UserModelCheck([])
    if isinstance(raw.get("base"), str):
        found.base_ref, found.base, problems = check_base(raw["base"], base_dir, allow_download)
        found.problems += problems
    if isinstance(raw.get("tasks"), str):
        path, exists = resolve_path(raw["tasks"], base_dir)
        if exists:
            found.tasks = path
        else:
            found.problems.append(f"tasks: task file {raw['tasks']} does not exist"
                                  f"{looked_for(raw['tasks'], base_dir)}")
    experts = raw.get("experts") if isinstance(raw.get("experts"), Mapping) else {}
    for name, expert in experts.items():
        if isinstance(expert, str):
            found.experts[str(name)], problems = check_expert(str(name), expert, base_dir)
            found.problems += problems
    if found.tasks is not None:
        try:
            entries = {e.name: e for e in read_entries(found.tasks)}
        except TaskError as err:
            found.problems.append(f"tasks: {err}")
        else:
            for name in experts:
                e = entries.get(str(name))
                if e is None:
                    found.problems.append(f"experts.{name}: no task {str(name)!r} in {found.tasks} "
                                          f"(found: {', '.join(entries) or 'none'})")
                    continue
                data = data_file(found.tasks, e)
                if not data.is_file():
                    found.problems.append(f"tasks: task {e.name!r}: data file {data} does not exist")
    return found


def resolved_config(cfg: UserModelConfig, found: UserModelCheck) -> UserModelConfig:
    """``cfg`` with the absolute paths :func:`check_user_model` found (call only when it found no problem)."""
    return cfg.model_copy(update={"base": str(found.base), "tasks": str(found.tasks), "experts": found.experts})


def validate_user_model(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                        allow_download: bool = False) -> tuple[UserModelConfig, str]:
    """``(config with absolute paths, base reference to record)``; a :class:`TaskError` listing every problem
    (fields, then paths), one per line, each prefixed by the config file (``source``) or ``config``. Only the
    :class:`UserModelConfig` keys are read (a pipeline validates its own keys)."""
    where = f"{source}: " if source is not None else "config: "
    mine = {k: v for k, v in raw.items() if k in USER_MODEL_KEYS}
    problems: list[str] = []
    cfg = None
    try:
        cfg = UserModelConfig.model_validate(mine)
    except ValidationError as err:
        problems += validation_lines(err)
    found = check_user_model(raw, config_dir(source), allow_download=allow_download)
    problems += found.problems
    if problems or cfg is None:
        raise TaskError("\n".join(where + p for p in problems))
    return resolved_config(cfg, found), str(found.base_ref)


# ------------------------------------------------------------------------------------------------ opening
def open_user_model(cfg: UserModelConfig, *, names: Sequence[str] | None = None) -> TaskSet:
    """The :class:`~.contract.TaskSet` of a validated config (:func:`validate_user_model`: absolute paths): an
    :class:`HFSuite` over ``cfg.base``, the budget, the tasks of ``names`` (default: the experts' names, in their
    order) from the task file, the base state and one :class:`~.contract.Expert` per task (its backbone state and
    a probe head fitted on its ``"final"`` features — None for a label-word task; ``test_score`` NaN: not measured).
    Every expert is read before the first probe is fitted."""
    from .taskfile import load_user_tasks

    names = list(cfg.experts) if names is None else list(names)
    missing = [n for n in names if n not in cfg.experts]
    if missing:
        raise TaskError(f"no expert for task(s) {', '.join(missing)} (experts: {', '.join(cfg.experts)})")
    suite = HFSuite(cfg.base, cfg.seq_len, cfg.batch_size)
    budget = cfg.budget()
    tasks = load_user_tasks(cfg.tasks, budget, names, split_seed=cfg.seed)
    base = suite.backbone_state()
    states = [suite.expert_state(base, cfg.experts[t.name]) for t in tasks]  # every expert read before any probe
    experts = [Expert(t.name, state, suite.fit_probe(state, t, budget, cfg.seed), float("nan"),
                      meta={"path": cfg.experts[t.name], "kind": "full" if rank is None else "lora", "rank": rank})
               for t, (state, rank) in zip(tasks, states, strict=True)]
    ranks = [r for _, r in states]
    suite.rank = max(ranks) if ranks and all(r is not None for r in ranks) else None  # type: ignore[type-var]
    return TaskSet(suite, budget, [t for t in tasks if t.in_domain], base,
                   [e for t, e in zip(tasks, experts, strict=True) if t.in_domain],
                   ood=[t for t in tasks if not t.in_domain], seed=cfg.seed)


def load_user_model(raw: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None,
                    allow_download: bool = False) -> TaskSet:
    """:func:`validate_user_model` then :func:`open_user_model`: a config mapping (``source``: its file, relative
    paths resolve against its folder) as a ready :class:`~.contract.TaskSet`."""
    cfg, _ = validate_user_model(raw, source=source, allow_download=allow_download)
    return open_user_model(cfg)


# ------------------------------------------------------------------------------------------------ the suite
class HFSuite(Suite):
    """The contract over a local Hugging Face model folder with text tasks (module docstring)."""

    name: ClassVar[str] = "hf"
    description: ClassVar[str] = "a Hugging Face model folder with user text tasks"
    #: name of the registered feature function (``neuromerge.routing.runtime.FEATURE_FNS``) computing the
    #: ``"final"`` features from a routed model's inputs, so a saved routed model can name it
    final_feature: ClassVar[str | None] = "final_hidden_mean"

    def __init__(self, path: str | os.PathLike[str], seq_len: int = 64, batch_size: int = 16) -> None:
        import transformers as tf

        self.path = str(path)
        try:  # a local folder (validation resolved any hub id): never a hub look-up from here
            cfg = tf.AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.causal = any(str(a).endswith("ForCausalLM") for a in (cfg.architectures or []))
            cls = tf.AutoModelForCausalLM if self.causal else tf.AutoModel
            self._template = cls.from_pretrained(self.path, dtype=torch.float32, local_files_only=True).eval()
            self.tokenizer = tf.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskError(f"cannot load the base model and tokenizer from {self.path}: {first}") from None
        self.model_type_ = getattr(cfg, "model_type", None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.tokenizer.eos_token_id or 0)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank: int | None = None  # the adapters' LoRA rank, set once they are read (None: a full expert)
        self._tokens: dict[tuple, list[list[int]]] = {}
        self._words: dict[tuple, list[int]] = {}
        #: ``(task name, split) → n``: the first ``n`` examples of the split that :meth:`batches` handed out so far
        #: (what a build read: recorded in a routed folder's manifest, ``inputs``)
        self.reads: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------------------------ the ABC
    def budget(self, quick: bool) -> Budget:
        return Budget(quick=quick)

    def expert_rank(self) -> int | None:
        return self.rank

    def model_type(self) -> str | None:
        return self.model_type_

    def fingerprint(self) -> dict[str, Any]:
        return {"suite": self.name, "base": self.path, "seq_len": self.seq_len}

    def tasks(self, budget: Budget) -> list[TaskData]:
        raise TaskError("HFSuite tasks come from a task file (neuromerge.tasks.taskfile.load_user_tasks)")

    def backbone_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self._template.state_dict().items()}

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        raise TaskError("a user model's experts are given (adapters or checkpoints), not trained here")

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        if self.scores_words(task):
            return None
        from .probe import fit_linear

        model = self.module(backbone)
        with torch.no_grad():
            feats = torch.cat([self.pooled(model, b, "final") for b in self.batches(task, "train", budget)])
            labels = torch.cat([b.labels for b in self.batches(task, "train", budget)])
        return fit_linear(feats, labels, task.num_classes, steps=budget.probe_steps,
                          l2=float(budget.extra.get("probe_l2", 1e-3)))

    def fit_head(self, feats: torch.Tensor, labels: torch.Tensor, task: TaskData, budget: Budget, seed: int
                 ) -> StateDict | None:
        if self.scores_words(task):
            return None
        from .probe import fit_linear

        return fit_linear(feats, labels, task.num_classes, steps=budget.probe_steps,
                          l2=float(budget.extra.get("probe_l2", 1e-3)))

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        return self.evaluate_module(self.module(backbone), head, task, split, budget)

    def evaluate_examples(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                          budget: Budget) -> torch.Tensor | None:
        return self.evaluate_module_examples(self.module(backbone), head, task, split, budget)

    # ------------------------------------------------------------------------------------ forward hooks
    def module(self, backbone: StateDict) -> nn.Module:
        import copy

        m = copy.deepcopy(self._template)
        m.load_state_dict(backbone, strict=True)
        return m.eval()

    def scores_words(self, task: TaskData) -> bool:
        """Whether ``task`` is scored by label-word likelihood (a causal LM and an entry with ``label_words``)."""
        return self.causal and task.label_words is not None

    def batches(self, task: TaskData, split: SplitName, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        words = self.scores_words(task)
        key = (task.fingerprint or task.name, split, task.prompt if words else None)
        if key not in self._tokens:
            texts = [str(x) for x in getattr(task, split).inputs]
            if words:
                self._tokens[key] = [self._prompt_ids(str(task.prompt), t) for t in texts]
            else:
                enc = self.tokenizer(texts, truncation=True, max_length=self.seq_len) if texts else {"input_ids": []}
                self._tokens[key] = [list(s) for s in enc["input_ids"]]
        seqs = self._tokens[key] if limit is None else self._tokens[key][:limit]
        self.reads[(task.name, split)] = max(self.reads.get((task.name, split), 0), len(seqs))
        return token_batches(seqs, getattr(task, split).labels, batch_size or self.batch_size, self.pad_id)

    def _prompt_ids(self, prompt: str, text: str) -> list[int]:
        """Token ids of ``prompt`` with ``{text}`` replaced by ``text``, the text truncated so the whole prompt fits
        ``seq_len`` tokens (the prompt's end, where the label word follows, is kept)."""
        before, after = prompt.split("{text}", 1)
        head = self.tokenizer(before)["input_ids"] if before else self.tokenizer("")["input_ids"]
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        tail = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        room = max(0, self.seq_len - len(head) - len(tail))
        return list(head) + list(body[:room]) + list(tail)

    def label_word_ids(self, task: TaskData) -> list[int]:
        """The first token of each label word after ``task.prompt`` (module docstring); a :class:`TaskError` when
        two words share it."""
        words = tuple(task.label_words or ())
        key = (words, task.prompt)
        if key not in self._words:
            space = "" if (task.prompt or "").endswith((" ", "\n", "\t")) else " "
            ids = []
            for w in words:
                toks = self.tokenizer(space + w if not w.startswith(" ") else w, add_special_tokens=False)["input_ids"]
                if not toks:
                    raise TaskError(f"task {task.name!r}: label word {w!r} has no token")
                ids.append(int(toks[0]))
            if len(set(ids)) != len(ids):
                raise TaskError(f"task {task.name!r}: label words {list(words)} do not start with distinct tokens; "
                                "choose words whose first tokens differ")
            self._words[key] = ids
        return self._words[key]

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        if self.scores_words(task):
            if batch.mask is None:
                raise TaskError("HFSuite batches carry an attention mask")
            out = module(**batch.inputs)
            scores = out.logits if hasattr(out, "logits") else out[0]
            last = batch.mask.sum(1).clamp_min(1) - 1
            rows = scores[torch.arange(scores.shape[0]), last].float().log_softmax(-1)
            return rows[:, self.label_word_ids(task)]
        if head is None:
            raise TaskError(f"task {task.name!r} needs a probe head")
        return self.pooled(module, batch, "final") @ head["weight"].T + head["bias"]

    def pooled(self, module: nn.Module, batch: Batch, source: FeatureSource) -> torch.Tensor:
        if batch.mask is None:
            raise TaskError("HFSuite batches carry an attention mask")
        if source == "final":
            out = module(**batch.inputs, output_hidden_states=True)
            hidden = getattr(out, "last_hidden_state", None)
            hidden = out.hidden_states[-1] if hidden is None else hidden
        else:
            hidden = module_output(module, self.feature_module(), batch.inputs)
        return mean_pool(hidden.float(), batch.mask)

    def feature_module(self) -> str:
        if self.causal:
            return "model.embed_tokens"
        return "embeddings"

    # ------------------------------------------------------------------------------------ experts
    def expert_state(self, base: StateDict, expert: str | os.PathLike[str]) -> tuple[StateDict, int | None]:
        """``(state, LoRA rank or None)`` of an expert over this model: a PEFT LoRA adapter folder gives
        ``θ0 + s·B·A`` (:class:`~neuromerge.io.lora.LoraCheckpoint`) and its rank; any other checkpoint its tensors
        (names matched with or without the model's prefix, e.g. ``bert.``; a tensor it lacks keeps the base's; a
        shape that differs is an error) and None."""
        from ..io.checkpoint import open_checkpoint
        from ..io.lora import is_adapter_folder, open_lora

        path = Path(expert)
        if is_adapter_folder(path):
            with open_checkpoint(self.path) as ckpt, open_lora(path, ckpt) as lora:
                names = set(lora.names())
                prefix = _name_prefix(names, list(base))
                state = dict(base)
                for k, w0 in base.items():
                    name = prefix + k if prefix + k in names else k
                    if name in names and lora.changed(name):
                        state[k] = lora.read(name).to(w0.dtype).reshape(w0.shape)
                rank = max((int(lora.adapter.info(s.a).shape[0]) for s in lora.modules.values()), default=0)
            return state, rank
        with open_checkpoint(path) as ckpt:
            names = set(ckpt.names())
            prefix = _name_prefix(names, list(base))
            state = dict(base)
            found = 0
            for k, w0 in base.items():
                name = prefix + k if prefix + k in names else k
                if name not in names:
                    continue
                t = ckpt.read(name)
                if tuple(t.shape) != tuple(w0.shape):
                    raise TaskError(f"expert {path}: {name} has shape {tuple(t.shape)}, the base {tuple(w0.shape)}")
                state[k] = t.to(w0.dtype)
                found += 1
        if not found:
            raise TaskError(f"expert {path} shares no tensor name with the base {self.path}")
        return state, None


def _name_prefix(names: set[str], keys: Sequence[str]) -> str:
    """The prefix the checkpoint adds to the module's state-dict keys (``""``, ``"bert."``, …)."""
    for k in keys:
        if k in names:
            return ""
        hit = next((n for n in names if n.endswith("." + k)), None)
        if hit is not None:
            return hit[: -len(k)]
    return ""


__all__ = ["TOKENIZER_VOCAB", "USER_MODEL_KEYS", "HFSuite", "UserModelCheck", "UserModelConfig", "check_base",
           "check_expert", "check_user_model", "load_user_model", "open_user_model", "resolved_config",
           "validate_user_model"]
