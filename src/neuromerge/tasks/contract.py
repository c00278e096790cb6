"""Layer 2: the one contract for "models + task data" (:class:`Suite`) and its data classes.

An implementation knows a backbone, its tasks' data and how to score them: it builds a module from a state dict,
batches a task's splits, gives a task's class scores (a head over pooled features, or label-word likelihoods),
pools router features, fits a linear probe and scores a backbone on a split. The built-in bench suites
(:mod:`neuromerge.bench`) implement it and ship data; a user's Hugging Face folder with a task file and experts
implements it through :class:`neuromerge.tasks.hf.HFSuite` (:func:`neuromerge.tasks.hf.open_user_model`).
Every pipeline of layer 3 (routing builders, MERGE search, data-aware merges, inspection) takes a contract object
and never knows which implementation it has.

Two views of the same contract:

- :class:`Suite`, the abstract base class every implementation subclasses (scoring, probes, experts, hooks);
- :class:`ModelAccess`, the structural :class:`~typing.Protocol` of its forward hooks (``module``, ``batches``,
  ``logits``) — what data-aware merges call; every :class:`Suite` satisfies it, and so does a small in-memory
  adapter such as :class:`neuromerge.data_aware.TensorAccess`.

Forward hooks (:class:`Batch`, :meth:`Suite.module`, :meth:`Suite.batches`, :meth:`Suite.logits`,
:meth:`Suite.pooled`, :meth:`Suite.feature_module`, :meth:`Suite.evaluate_module`) expose the backbone as an
``nn.Module`` for methods that need data or a forward pass (Fisher, RegMean, AdaMerging, routed experts).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import TaskError

StateDict = dict[str, torch.Tensor]
SplitName = Literal["train", "val", "test"]
Metric = Literal["accuracy", "perplexity"]
FeatureSource = Literal["embeddings", "final"]


@dataclass
class Split:
    """Inputs (a list of strings, or an ``(N, C, H, W)`` float tensor of images) and integer labels; ``rows``: each
    example's record index in its data file (0-based: a CSV data row, a non-empty JSONL line, an ``.npz`` image),
    in split order, when the split was cut from a file (None otherwise)."""

    inputs: Any
    labels: torch.Tensor
    rows: list[int] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TaskData:
    """One task with fixed, seeded splits. ``in_domain=False`` tasks are kept out of the merge (OOD)."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    in_domain: bool = True
    metric: Metric = "accuracy"
    #: short description of the data source (shown in reports)
    source: str = ""
    #: content hash of the splits (part of the expert cache key); set by the suite
    fingerprint: str = ""
    #: causal LMs: one word per class, scored by likelihood after :attr:`prompt` (None: a probe on pooled features)
    label_words: tuple[str, ...] | None = None
    #: causal LMs with label words: the prompt around an input, a format string with ``{text}``
    prompt: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Budget:
    """Compute budget of a run (``quick`` caps everything so a suite finishes in minutes on 2 cores)."""

    quick: bool = False
    train_steps: int = 200
    batch_size: int = 32
    eval_examples: int = 400  # per task and split (val/test), at most
    probe_steps: int = 100
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Expert:
    """A fine-tuned expert: its backbone state dict (the merged part), its task head (None for LM suites whose
    tasks are scored with label words), its own test score and training metadata."""

    task: str
    backbone: StateDict
    head: StateDict | None
    test_score: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One batch of a split for :meth:`Suite.logits` / :meth:`Suite.pooled`: ``module(**inputs)`` runs the
    backbone; ``labels`` are ``(B,)`` int64 class indices; ``mask`` is the ``(B, T)`` attention mask of token
    models (1 = real token), None for images; ``index`` holds the rows' positions in the split (batches may be
    grouped by length)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ExampleScores:
    """Per-example results of one model on one split, in split order; :attr:`score` is the split's score.

    - ``metric="accuracy"``: ``correct`` is the ``(N,)`` bool tensor ``argmax_k s_{n,k} = y_n``;
      ``score = #correct / N`` (exact, as a Python float: equal counts give equal scores).
    - ``metric="perplexity"``: ``nll`` is the ``(N,)`` float64 sum of each sequence's token negative
      log-likelihoods and ``tokens`` its ``(N,)`` number of predicted tokens;
      ``score = exp(Σ_n nll_n / Σ_n tokens_n)`` (the micro average over tokens of the suites' perplexity).

    A resample of examples (a bootstrap) recomputes the score of the resampled split with the same formula
    (:meth:`subset`)."""

    metric: Metric
    correct: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.metric == "accuracy":
            if self.correct is None:
                raise TaskError("accuracy example scores need the per-example correctness")
            self.correct = self.correct.detach().reshape(-1).to(torch.bool)
        elif self.metric == "perplexity":
            if self.nll is None or self.tokens is None or self.nll.shape != self.tokens.shape:
                raise TaskError("perplexity example scores need per-example nll and token counts of one shape")
            self.nll = self.nll.detach().reshape(-1).to(torch.float64)
            self.tokens = self.tokens.detach().reshape(-1).to(torch.int64)
        else:
            raise TaskError(f"unknown metric {self.metric!r} (accuracy, perplexity)")

    def __len__(self) -> int:
        held = self.correct if self.metric == "accuracy" else self.nll
        assert held is not None
        return int(held.shape[0])

    @property
    def score(self) -> float:
        """Accuracy ``#correct / N`` or perplexity ``exp(Σ nll / Σ tokens)``; NaN for an empty split."""
        if len(self) == 0:
            return float("nan")
        if self.metric == "accuracy":
            assert self.correct is not None
            return int(self.correct.sum()) / len(self)
        assert self.nll is not None and self.tokens is not None
        count = int(self.tokens.sum())
        if count == 0:
            raise TaskError("perplexity of sequences without a predicted token")
        return math.exp(float(self.nll.sum()) / count)

    def subset(self, index: torch.Tensor | Sequence[int]) -> ExampleScores:
        """The scores of the examples ``index`` (in that order, repeats allowed)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if self.metric == "accuracy":
            assert self.correct is not None
            return ExampleScores("accuracy", correct=self.correct[idx])
        assert self.nll is not None and self.tokens is not None
        return ExampleScores("perplexity", nll=self.nll[idx], tokens=self.tokens[idx])

    def to_list(self) -> list[bool] | list[list[float]]:
        """JSON-ready: ``[bool, …]`` for accuracy, ``[[nll, tokens], …]`` for perplexity."""
        if self.metric == "accuracy":
            assert self.correct is not None
            return [bool(c) for c in self.correct.tolist()]
        assert self.nll is not None and self.tokens is not None
        return [[float(a), int(b)] for a, b in zip(self.nll.tolist(), self.tokens.tolist(), strict=True)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_i m_i h_i / Σ_i m_i`` over the sequence (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → ``(ids, attention_mask)``, both ``(B, max_len)`` int64, sequences left-aligned (padded on
    the right with ``pad_id``)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def token_batches(seqs: Sequence[Sequence[int]], labels: torch.Tensor, batch_size: int, pad_id: int = 0
                  ) -> list[Batch]:
    """``seqs`` grouped by length (:func:`length_batches`), right-padded: ``Batch({"input_ids", "attention_mask"},
    labels, mask, index)``."""
    out = []
    for idx in length_batches(seqs, batch_size):
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        index = torch.tensor(idx, dtype=torch.long)
        out.append(Batch({"input_ids": ids, "attention_mask": mask}, labels[index], mask, index))
    return out


def length_batches(seqs: Sequence[Sequence[Any]], batch_size: int) -> Iterator[list[int]]:
    """Indices ``0 … len(seqs)-1`` sorted by length (stable) in consecutive batches of ``batch_size``: batches of
    similar lengths, so little padding is computed."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        yield order[start: start + batch_size]


def scatter_rows(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(values, index)`` pieces of a split (e.g. per length-grouped batch) → one tensor in split order
    (``out[index] = values``); every row ``0 … N-1`` must be given exactly once."""
    index = torch.cat([i for _, i in parts])
    values = torch.cat([v for v, _ in parts])
    if sorted(index.tolist()) != list(range(len(index))):
        raise TaskError("batches do not cover the split's rows exactly once")
    out = torch.empty_like(values)
    out[index] = values
    return out


def find_submodule(module: nn.Module, name: str) -> nn.Module:
    """``module.get_submodule(name)``, or inside a wrapper the shallowest submodule whose qualified name ends
    with ``"." + name`` (e.g. ``base.embeddings`` for ``embeddings``); a :class:`TaskError` if none or several."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        pass
    hits = [(n.count("."), n, m) for n, m in module.named_modules() if n.endswith("." + name)]
    top = [h for h in hits if h[0] == min((h[0] for h in hits), default=0)]
    if len(top) != 1:
        found = ", ".join(n for _, n, _ in top) or "none"
        raise TaskError(f"no unique submodule {name!r} in {type(module).__name__} (found: {found})")
    return top[0][2]


def module_output(module: nn.Module, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output of submodule ``name`` (:func:`find_submodule`) during ``module(**inputs)``. The pass stops
    right there (a forward hook raises after recording the output), so only the layers up to ``name`` run;
    hooks registered on that submodule before this call (e.g. a router's) still run first. Differentiable."""
    out = output_of(module, find_submodule(module, name), inputs)
    if out is None:
        raise TaskError(f"submodule {name!r} did not run in the forward pass of {type(module).__name__}")
    return out[0] if isinstance(out, tuple) else out


class _Reached(Exception):
    """Raised by :func:`output_of`'s hook to stop a forward pass once the wanted output exists."""


def output_of(model: nn.Module, submodule: nn.Module, kwargs: dict[str, Any]) -> Any:
    """The output of ``submodule`` during ``model(**kwargs)``; the pass stops right there (a forward hook raises
    after recording it), so only the layers up to ``submodule`` run. Hooks registered on ``submodule`` earlier still
    run first. Returns None when ``submodule`` did not run."""
    seen: list[Any] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        seen.append(out)
        raise _Reached

    handle = submodule.register_forward_hook(hook)
    try:
        model(**kwargs)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


@runtime_checkable
class BatchLike(Protocol):
    """A batch as :class:`Batch`: ``module(**inputs)`` runs; ``mask`` is the ``(B, T)`` attention mask of token
    models (1 = real token) or None."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor | None


@runtime_checkable
class ModelAccess(Protocol):
    """The forward hooks of the contract, as a structural type (every :class:`Suite` satisfies it): what a
    data-aware merge needs.

    ``module(backbone)``: a *new* backbone module in eval mode, fp32, loaded with ``backbone`` (its state_dict keys
    are the backbone's). ``batches(task, split, budget, limit=, batch_size=)``: the first ``limit`` examples of a
    split, deterministic. ``logits(module, head, task, batch)``: ``(B, C)`` class scores of ``task``,
    differentiable; ``module`` may be a wrapper forwarding ``**kwargs`` to the backbone.
    """

    def module(self, backbone: StateDict) -> nn.Module: ...

    def batches(self, task: Any, split: Any, budget: Any, *, limit: int | None = None,
                batch_size: int | None = None) -> Sequence[BatchLike]: ...

    def logits(self, module: nn.Module, head: StateDict | None, task: Any, batch: BatchLike) -> torch.Tensor: ...


class Suite(ABC):
    """Models + task data: a backbone, its tasks and how to score them (module docstring). The bench's built-in
    suites are registered in ``neuromerge.bench.suites``; a user's model folder is :class:`~.hf.HFSuite`."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: expert fine-tuning modes this suite supports; the first is the default for static merges
    modes: ClassVar[tuple[str, ...]] = ("full", "lora")
    #: methods of a ``--quick`` run that names none (None: every registered static method, as a normal run)
    quick_methods: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def budget(self, quick: bool) -> Budget:
        """The default budget for a normal or ``--quick`` run."""

    @abstractmethod
    def tasks(self, budget: Budget) -> list[TaskData]:
        """Every task (in-domain and out-of-domain) with its fixed seeded splits, subsampled per the budget."""

    @abstractmethod
    def backbone_state(self) -> StateDict:
        """The pre-trained backbone's state dict (the part that is merged)."""

    def merge_exclude(self) -> list[str]:
        """Regexes of backbone tensors that are never merged (kept from the pre-trained backbone)."""
        return []

    def model_type(self) -> str | None:
        """``config.json``'s model_type of the backbone (tensor layouts for neuron-wise methods)."""
        return None

    @abstractmethod
    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        """Fine-tune the backbone (+ a head) on ``task``'s train split; ``test_score`` on its test split."""

    @abstractmethod
    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """A fresh head trained on frozen ``backbone`` features of ``task``'s train split (the "pre-trained +
        heads" row and the out-of-domain probe). None for suites without heads."""

    @abstractmethod
    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        """Score of ``backbone`` + ``head`` on a split (accuracy in [0, 1], or perplexity); equal to
        ``evaluate_examples(...).score`` where the suite implements :meth:`evaluate_examples`."""

    def evaluate_examples(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                          budget: Budget) -> ExampleScores | None:
        """Per-example results of ``backbone`` + ``head`` on a split (:class:`ExampleScores`, split order), whose
        ``score`` is :meth:`evaluate`'s. Default: :meth:`evaluate_module_examples` of :meth:`module`
        (``backbone``); None for a suite without forward hooks that does not override it (it gives scores only:
        the bench then has no per-example data for it)."""
        if type(self).module is Suite.module:
            return None
        return self.evaluate_module_examples(self.module(backbone), head, task, split, budget)

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the task data and the budget that determines an expert (backbone id, versions,
        training hyper-parameters). Part of the expert cache key."""
        return {"suite": self.name}

    def expert_rank(self) -> int | None:
        """LoRA rank ``r`` of this suite's ``mode="lora"`` experts (their ``ΔW`` has rank ≤ r); None when the suite
        has no LoRA mode."""
        return None

    # -------------------------------------------------------------------------------------------- forward hooks
    def _no_hooks(self) -> Exception:
        return TaskError(f"suite {self.name!r} has no forward hooks")

    def module(self, backbone: StateDict) -> nn.Module:
        """A NEW backbone module in eval mode, fp32, holding ``backbone`` (parameters require gradients)."""
        raise self._no_hooks()

    def batches(self, task: TaskData, split: SplitName, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        """The first ``limit`` examples of ``split`` (all when None) in batches (deterministic)."""
        raise self._no_hooks()

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        """``(B, C)`` class scores of ``task`` on ``batch`` (differentiable). ``module`` may be a wrapper that
        forwards ``**kwargs`` to the backbone and returns the backbone's output type."""
        raise self._no_hooks()

    def pooled(self, module: nn.Module, batch: Batch, source: FeatureSource) -> torch.Tensor:
        """``(B, d)`` router features: ``"final"`` = pooled last hidden state / final feature map,
        ``"embeddings"`` = pooled output of :meth:`feature_module` (the cheap source). Differentiable."""
        raise self._no_hooks()

    def feature_module(self) -> str:
        """Qualified name (in :meth:`module`) of the module whose pooled output is the ``"embeddings"`` source."""
        raise self._no_hooks()

    def probe_batches(self, task: TaskData, budget: Budget) -> list[Batch]:
        """The train batches an out-of-domain probe of a module reads (the same examples :meth:`fit_probe`
        reads); default: the first ``budget.extra["probe_examples"]`` (all when unset)."""
        n = budget.extra.get("probe_examples")
        return self.batches(task, "train", budget, limit=None if n is None else int(n))

    def fit_head(self, feats: torch.Tensor, labels: torch.Tensor, task: TaskData, budget: Budget, seed: int
                 ) -> StateDict | None:
        """A linear head ``{"weight", "bias"}`` fitted on frozen ``(N, d)`` features (the suite's probe recipe,
        shared by :meth:`fit_probe` and :meth:`fit_probe_module`). None for suites without heads."""
        return None

    def fit_probe_module(self, module: nn.Module, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """The out-of-domain probe of a routed or otherwise non-state-dict ``module``: :meth:`fit_head` on its
        ``"final"`` pooled features of the :meth:`probe_batches` (no gradients, eval mode,
        the module's training flag restored). Same recipe as :meth:`fit_probe`; only the features' source
        differs."""
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                parts = [(self.pooled(module, b, "final").float(), b.labels)
                         for b in self.probe_batches(task, budget)]
        finally:
            module.train(was_training)
        if not parts:
            return None
        return self.fit_head(torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]), task, budget, seed)

    def evaluate_module(self, module: nn.Module, head: StateDict | None, task: TaskData, split: SplitName,
                        budget: Budget) -> float:
        """Accuracy ``#{argmax logits = label} / N`` over ``batches(task, split, budget,
        limit=budget.eval_examples)``: ``evaluate_module_examples(...).score``."""
        return self.evaluate_module_examples(module, head, task, split, budget).score

    def evaluate_module_examples(self, module: nn.Module, head: StateDict | None, task: TaskData, split: SplitName,
                                 budget: Budget) -> ExampleScores:
        """Per-example correctness ``argmax logits = label`` over ``batches(task, split, budget,
        limit=budget.eval_examples)`` (in split order: batches may be grouped by length), without gradients,
        ``module`` in eval mode (its training flag restored). The module is used as given: no BatchNorm
        re-estimation (see :meth:`evaluate` of the vision suite)."""
        was_training = module.training
        module.eval()
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen = 0
        try:
            with torch.no_grad():
                for batch in self.batches(task, split, budget, limit=budget.eval_examples):
                    pred = self.logits(module, head, task, batch).argmax(-1)
                    index = batch.index if batch.index is not None else torch.arange(seen, seen + len(batch))
                    parts.append((pred == batch.labels, index))
                    seen += len(batch)
        finally:
            module.train(was_training)
        if not parts:
            raise TaskError(f"task {task.name!r} has an empty {split} split")
        return ExampleScores("accuracy", correct=scatter_rows(parts))


@dataclass
class TaskSet:
    """A contract object ready for a pipeline: the :class:`Suite`, its :class:`Budget`, the in-domain ``tasks``
    (in expert / router order), the pre-trained ``base`` state and one :class:`Expert` per in-domain task (aligned
    with ``tasks``); ``ood``: out-of-domain tasks (never merged); ``mode`` / ``seed``: how the experts were made
    (a bench suite's fine-tuning mode; empty for given experts).

    Made by :func:`neuromerge.tasks.hf.open_user_model` for a user's model, by the bench for a built-in suite
    (:func:`neuromerge.tasks.named.resolve_suite`), or by hand from any :class:`Suite` and its experts."""

    suite: Suite
    budget: Budget
    tasks: list[TaskData]
    base: StateDict
    experts: list[Expert]
    ood: list[TaskData] = field(default_factory=list)
    mode: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.tasks):
            raise TaskError(f"{len(self.experts)} experts for {len(self.tasks)} in-domain tasks")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
