"""Which head scores a task, and the two kinds of head a folder may bring.

For one model and one task, :func:`~neuromerge.evaluation.evaluate` takes, in this order (a task scored by label
words — 3 — reads no head, so a folder's head for it is ignored):

1. ``folder`` — the evaluated folder's own head for the task: ``FOLDER/heads/<task>.safetensors`` (tensors
   ``weight`` ``(C, d)`` and ``bias`` ``(C,)``: a linear head on the mean-pooled final features, the contract's
   :attr:`~neuromerge.tasks.Expert.head`), or ``model.heads[task]`` of a loaded routed model. Written by routed
   builds and data-aware merges;
2. ``classifier`` — the expert's own sequence-classification head, when the expert is a model folder whose
   ``config.json`` names a ``*ForSequenceClassification`` architecture (:class:`ClassifierHead`);
3. ``label_words`` — a causal LM's task whose entry gives ``label_words`` (scored by label-word likelihood), or any
   task whose expert has no head (the llm suite's);
4. ``probe`` — the probe fitted on the expert's frozen features (:meth:`~neuromerge.tasks.Suite.fit_probe`).

The experts' reference row uses 2–4 (an expert folder is not the evaluated folder).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import TaskError
from ..tasks.contract import Batch, ExampleScores, StateDict, TaskData, scatter_rows

HeadSource = Literal["folder", "classifier", "label_words", "probe"]
#: folder of per-task heads inside a merged or routed folder
HEADS_DIR = "heads"
#: keyword arguments a ``*ForSequenceClassification`` passes its backbone that a plain backbone call does not need
_CONTROL = ("return_dict", "output_attentions", "output_hidden_states", "use_cache")


# ------------------------------------------------------------------------------------------------ folder heads
def head_file(folder: str | os.PathLike[str], task: str) -> Path:
    """``FOLDER/heads/<task>.safetensors``."""
    return Path(folder) / HEADS_DIR / f"{task}.safetensors"


def read_head(path: Path, task: TaskData, features: int | None = None) -> StateDict:
    """The head stored at ``path``: ``{"weight" (C, d), "bias" (C,)}`` float32 with ``C`` = the task's classes (and
    ``d`` = ``features`` when given); a :class:`TaskError` naming the file otherwise."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error types
        raise TaskError(f"cannot read the head {path} ({type(err).__name__}: {err})") from None
    return check_head(tensors, task, str(path), features)


def check_head(tensors: dict[str, torch.Tensor], task: TaskData, where: str, features: int | None = None
               ) -> StateDict:
    """``tensors`` as a linear head of ``task`` (float32 copies of ``weight`` / ``bias``); a one-line
    :class:`TaskError` for a missing tensor or a shape that does not fit."""
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or b is None:
        raise TaskError(f"head {where} needs tensors 'weight' (C, d) and 'bias' (C,); found "
                        f"{', '.join(sorted(tensors)) or 'none'}")
    c = task.num_classes
    if w.dim() != 2 or w.shape[0] != c or tuple(b.shape) != (c,):
        raise TaskError(f"head {where}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not fit task "
                        f"{task.name!r} with {c} classes (expected ({c}, d) and ({c},))")
    if features is not None and w.shape[1] != features:
        raise TaskError(f"head {where}: weight {tuple(w.shape)} reads {w.shape[1]} features, the model gives "
                        f"{features}")
    return {"weight": w.detach().float().clone(), "bias": b.detach().float().clone()}


def folder_heads(folder: str | os.PathLike[str], module: nn.Module | None, tasks: list[TaskData],
                 features: dict[str, int | None]) -> dict[str, StateDict]:
    """The evaluated folder's heads by task: ``module.heads[task]`` of a loaded routed model when it has them,
    else ``FOLDER/heads/<task>.safetensors`` when that file exists. ``features``: the width each task's head
    must read (None: unchecked)."""
    held = getattr(module, "heads", None) if module is not None else None
    held = held if isinstance(held, dict) else {}
    out: dict[str, StateDict] = {}
    for t in tasks:
        if t.name in held:
            out[t.name] = check_head(dict(held[t.name]), t, f"{t.name!r} of {folder} (model.heads)",
                                     features.get(t.name))
        elif head_file(folder, t.name).is_file():
            out[t.name] = read_head(head_file(folder, t.name), t, features.get(t.name))
    return out


# ------------------------------------------------------------------------------------------------ classifiers
def classifier_architecture(expert: str | os.PathLike[str] | None) -> str | None:
    """The ``*ForSequenceClassification`` architecture named by ``EXPERT/config.json`` (None: not a model folder,
    or no such head)."""
    if expert is None:
        return None
    cfg = Path(expert) / "config.json"
    if not cfg.is_file():
        return None
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return next((str(a) for a in archs if str(a).endswith("ForSequenceClassification")), None)


_GENERIC_LABEL = re.compile(r"^LABEL_(\d+)$")


def label_order(id2label: dict[Any, Any], task: TaskData, where: str) -> list[int] | None:
    """Which classifier output scores each class of ``task``: None when they are in the same order (the
    classifier's labels are the task's class names in order, or generic ``LABEL_i`` / integer names), else the
    output index of each task class (its labels are the task's class names in another order). A
    :class:`TaskError` when the classifier has another number of labels or other names."""
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
    classes = list(task.classes)
    if len(names) != len(classes):
        raise TaskError(f"expert {where}: its classifier has {len(names)} labels ({', '.join(names)}), task "
                        f"{task.name!r} has {len(classes)} classes ({', '.join(classes)})")
    if names == classes:
        return None
    if sorted(names) == sorted(classes):
        return [names.index(c) for c in classes]
    generic = all(_GENERIC_LABEL.match(n) or n.lstrip("-").isdigit() for n in names)
    if generic:
        return None
    raise TaskError(f"expert {where}: its classifier's labels ({', '.join(names)}) are not the classes of task "
                    f"{task.name!r} ({', '.join(classes)}); name them alike (config.json id2label or the task "
                    "file's classes)")


class _AsBackbone(nn.Module):
    """Stands in for a ``*ForSequenceClassification``'s backbone: calls ``inner`` (any backbone module, a routed
    model included) with keyword inputs only — positional inputs named after ``like.forward``'s parameters, ``None``
    values and output-control flags dropped — so a routed model's router sees the inputs as it does when scored
    with a probe. When ``inner`` is not of ``like``'s class (a causal LM for a ``*Model`` backbone), its last
    hidden state is returned as the backbone's output."""

    def __init__(self, inner: nn.Module, like: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.names = [p for p in inspect.signature(like.forward).parameters if p not in ("self", "args", "kwargs")]
        plain = getattr(inner, "base", inner)
        self.same = isinstance(inner, type(like)) or isinstance(plain, type(like))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kw = dict(zip(self.names, args, strict=False))
        kw.update(kwargs)
        kw = {k: v for k, v in kw.items() if v is not None and k not in _CONTROL}
        if self.same:
            return self.inner(**kw)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        out = self.inner(**kw, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)  # a causal LM's hidden_states[-1] is after the final norm
        return BaseModelOutputWithPast(last_hidden_state=out.hidden_states[-1] if hidden is None else hidden)


class ClassifierHead:
    """An expert's ``*ForSequenceClassification`` head applied to any backbone module: the expert's model is loaded
    once (fp32, eval); :meth:`logits` swaps its backbone (``model.<base_model_prefix>``) for the scored module for
    one forward pass, so the head reads the scored backbone's output exactly as it read its own (BERT: the pooler
    output; RoBERTa: the first token; decoders: the last real token)."""

    def __init__(self, folder: str | os.PathLike[str], task: TaskData) -> None:
        import transformers as tf

        self.folder = str(folder)
        try:
            self.model = tf.AutoModelForSequenceClassification.from_pretrained(
                self.folder, dtype=torch.float32, local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskError(f"cannot load the classifier of expert {self.folder}: {first}") from None
        self.architecture = type(self.model).__name__
        self.prefix = self.model.base_model_prefix
        self.order = label_order(dict(self.model.config.id2label or {}), task, self.folder)

    def logits(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """``(B, C)`` class scores of ``batch`` by this head on ``module``'s output (task class order)."""
        own = getattr(self.model, self.prefix)
        setattr(self.model, self.prefix, _AsBackbone(module, own))
        try:
            out = self.model(**batch.inputs).logits.float()
        finally:
            setattr(self.model, self.prefix, own)
        return out if self.order is None else out[:, self.order]

    def accuracy(self, module: nn.Module, batches: list[Batch]) -> float:
        """``#{argmax logits = label} / N`` over ``batches``: ``examples(module, batches).score``."""
        return self.examples(module, batches).score

    def examples(self, module: nn.Module, batches: list[Batch]) -> ExampleScores:
        """Per-example correctness ``argmax logits = label`` over ``batches``, in split order (each batch's
        ``index``; consecutive rows when a batch has none), no gradients, ``module`` in eval mode (its training
        flag restored)."""
        was_training = module.training
        module.eval()
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen = 0
        try:
            with torch.no_grad():
                for b in batches:
                    index = b.index if b.index is not None else torch.arange(seen, seen + len(b))
                    parts.append((self.logits(module, b).argmax(-1) == b.labels, index))
                    seen += len(b)
        finally:
            module.train(was_training)
        if not seen:
            raise TaskError("an empty split cannot be scored")
        return ExampleScores("accuracy", correct=scatter_rows(parts))


__all__ = ["HEADS_DIR", "ClassifierHead", "HeadSource", "check_head", "classifier_architecture", "folder_heads",
           "head_file", "label_order", "read_head"]
