"""Task files: a YAML list of tasks (data files of labelled examples) for a user's model or a bench suite.

```yaml
tasks:
  - name: support_tickets          # unique; letters, digits, _ . -
    file: tickets.csv              # relative to the YAML file's folder; .csv / .jsonl (texts) or .npz (images)
    text_column: text              # CSV / JSONL only (default "text")
    label_column: label            # CSV / JSONL only (default "label")
    in_domain: true                # false: out of domain (kept out of the merge, scored by a fresh probe)
    classes: [billing, bug, other] # optional: class names in label-id order
    label_words: [billing, bug, other]   # causal LMs: score by label-word likelihood instead of a probe
    prompt: "Ticket: {text}\nTeam:"      # with label_words: the prompt around each text (default "{text}")
  - name: my_digits
    suite: vision                  # only for `neuromerge bench`: the suite the entry joins
    file: digits.npz               # arrays x (N, H, W) / (N, C, H, W) / (N, H, W, C) and y (N,) integer labels
```

**Which entries are read.** A user's model (:func:`load_user_tasks`: ``route build``, and every pipeline over
:func:`neuromerge.tasks.hf.open_user_model`) reads the entries its config *names* (the experts' task names),
whatever their ``suite:`` key, which it ignores; an entry needs no ``suite:`` key. Without names it reads every
entry that has no ``suite:`` key. ``neuromerge bench SUITE --task-file F`` (:func:`load_task_file` with ``suite``)
reads only the entries whose ``suite:`` is SUITE, so one file can serve several suites and user models.

**Labels** (CSV / JSONL). Without ``classes``: if every label is an integer (``3``, ``"3"``, ``3.0``) the classes
are the distinct integers in increasing order, named by their value (``{0, 2, 5}`` → ids 0, 1, 2); otherwise
every label is taken as a string and the classes are the distinct strings in alphabetical order. A non-integer
number (``0.5``) is refused (regression is not supported). With ``classes``: a label must be one of the names (or
an integer index into the list); a declared class without examples is an error. ``.npz`` labels must be
numeric integers. At least 2 classes and 3 examples per class (one per split) are needed. ``label_words`` gives
one word per class, in class order.

Splits, cleaning and caps are those of :func:`neuromerge.tasks.splits.make_splits` (60 / 20 / 20 % per class,
seeded, capped by the budget); images follow the same stratified rule. Paths resolve against the task file's
folder (:mod:`neuromerge.paths`).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import TaskError
from ..paths import looked_for, resolve_path
from ..textfile import existing_file, read_text
from .contract import Budget, TaskData
from .splits import make_splits, make_tensor_splits

#: data files of text tasks / image tasks
TEXT_INPUTS: tuple[str, ...] = (".csv", ".jsonl")
IMAGE_INPUTS: tuple[str, ...] = (".npz",)
#: an image array (N, H, W) / (N, C, H, W) / (N, H, W, C) → the model's ``(N, C, H, W)`` float inputs
ImageTransform = Callable[[Any], torch.Tensor]


class TaskEntry(BaseModel):
    """One entry of a task file (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    suite: str | None = Field(None, description="the bench suite the entry joins; not needed for a user's model")
    file: str
    text_column: str = "text"
    label_column: str = "label"
    in_domain: bool = True
    classes: list[str] | None = None
    label_words: list[str] | None = Field(None, min_length=2, description="causal LMs: one word per class")
    prompt: str | None = Field(None, description="with label_words: a format string with {text}")

    @field_validator("classes", "label_words", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(w, bool) for w in v):
            raise ValueError("a word was read as true/false (YAML reads yes / no / on / off so); quote it: 'no'")
        return v


def _err(path: Path, msg: str) -> TaskError:
    return TaskError(f"task file {path}: {msg}")


def read_entries(path: str | Path, *, suites: Collection[str] | None = None) -> list[TaskEntry]:
    """Parse and validate the YAML file (every entry). ``suites``: the known suite names a ``suite:`` key may take
    (the bench's; None: any)."""
    p = existing_file(path, "task file", TaskError)
    try:
        doc = yaml.safe_load(read_text(p, "task file", TaskError))
    except yaml.YAMLError as err:
        raise _err(p, f"not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise _err(p, "expected a mapping with a non-empty list `tasks:`")
    extra = set(doc) - {"tasks"}
    if extra:
        raise _err(p, f"unknown top-level key(s) {', '.join(sorted(map(str, extra)))}; expected only `tasks`")
    entries = []
    for i, raw in enumerate(doc["tasks"]):
        try:
            entries.append(TaskEntry.model_validate(raw))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "entry"
            raise _err(p, f"task #{i + 1}: {where}: {first['msg']}") from None
        e = entries[-1]
        if suites is not None and e.suite is not None and e.suite not in suites:
            raise _err(p, f"task {e.name!r}: unknown suite {e.suite!r}; available: {', '.join(suites)}")
        if e.prompt is not None and "{text}" not in e.prompt:
            raise _err(p, f"task {e.name!r}: prompt must contain {{text}} (where each input goes)")
        if e.prompt is not None and e.label_words is None:
            raise _err(p, f"task {e.name!r}: prompt is only used with label_words")
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _err(p, f"task name {dup!r} is used twice")
    return entries


def data_file(path: str | Path, entry: TaskEntry) -> Path:
    """The absolute data file of ``entry`` of the task file ``path`` (relative to its folder)."""
    return resolve_path(entry.file, Path(path).absolute().parent)[0]


def load_entry(path: str | Path, e: TaskEntry, budget: Budget, *, split_seed: int = 0,
               allowed: Sequence[str] = TEXT_INPUTS + IMAGE_INPUTS, owner: str = "this model",
               image_transform: ImageTransform | None = None) -> TaskData:
    """One entry of the task file ``path`` as a :class:`TaskData` capped by ``budget`` (``budget.extra``'s
    ``train_examples`` / ``ood_train_examples`` / ``val_examples``, ``budget.eval_examples`` for the test split).
    ``allowed``: the data file suffixes ``owner`` takes; ``image_transform``: how ``.npz`` images become inputs."""
    p = Path(path)
    file = data_file(p, e)
    if not file.is_file():
        raise _err(p, f"task {e.name!r}: data file {file} does not exist{looked_for(e.file, p.absolute().parent)}"
                   if not Path(e.file).is_absolute() else f"task {e.name!r}: data file {file} does not exist")
    ext = "".join(file.suffixes[-1:]).lower()
    if ext not in allowed:
        raise _err(p, f"task {e.name!r}: {owner} takes {' or '.join(allowed)} files, not {file.name}")
    x = budget.extra
    train_cap = x.get("train_examples") if e.in_domain else x.get("ood_train_examples", x.get("train_examples"))
    sizes = (train_cap, x.get("val_examples", budget.eval_examples), budget.eval_examples)
    try:
        if ext == ".npz":
            task = _image_task(e, file, sizes, split_seed, image_transform)
        else:
            texts, raw_labels = _read_table(file, e)
            labels, classes = map_labels(raw_labels, e.classes)
            task = make_splits(e.name, texts, labels, classes, seed=split_seed, sizes=sizes, in_domain=e.in_domain,
                               source=f"user file {file.name}")
        if e.label_words is not None:
            if len(e.label_words) != task.num_classes:
                raise TaskError(f"label_words has {len(e.label_words)} words for {task.num_classes} classes "
                                f"({', '.join(task.classes)})")
            task.label_words = tuple(e.label_words)
            task.prompt = e.prompt or "{text}"
    except TaskError as err:
        raise _err(p, f"task {e.name!r}: {str(err).removeprefix(f'task {e.name!r}: ')}") from None
    return task


def load_task_file(path: str | Path, suite: str, budget: Budget, *, reserved: Sequence[str] = (),
                   split_seed: int = 0, suites: Collection[str] | None = None,
                   allowed: Sequence[str] = TEXT_INPUTS + IMAGE_INPUTS,
                   image_transform: ImageTransform | None = None) -> list[TaskData]:
    """The tasks of ``path`` whose ``suite:`` is ``suite`` (a bench suite), as :class:`TaskData` capped by
    ``budget``, in file order. Other entries (another suite, or none: a user model's) are skipped; a name in
    ``reserved`` (the suite's own tasks) is an error."""
    p = Path(path)
    out = []
    for e in read_entries(p, suites=suites):
        if e.suite != suite:
            continue
        if e.name in reserved:
            raise _err(p, f"task name {e.name!r} is already a task of suite {suite!r}")
        out.append(load_entry(p, e, budget, split_seed=split_seed, allowed=allowed, owner=f"suite {suite!r}",
                              image_transform=image_transform))
    return out


def user_entries(path: str | Path, names: Sequence[str] | None = None) -> list[TaskEntry]:
    """The entries a user's model reads (module docstring), in ``names`` order; a :class:`TaskError` naming every
    missing task."""
    p = Path(path)
    entries = read_entries(p)
    if names is None:
        chosen = [e for e in entries if e.suite is None]
        if not chosen:
            raise _err(p, "no entry without a `suite:` key (name the tasks to read, or drop their `suite:`)")
        return chosen
    by_name = {e.name: e for e in entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise _err(p, f"no task {', '.join(map(repr, missing))} (found: {', '.join(by_name) or 'none'})")
    return [by_name[n] for n in names]


def load_user_tasks(path: str | Path, budget: Budget, names: Sequence[str] | None = None, *, split_seed: int = 0,
                    allowed: Sequence[str] = TEXT_INPUTS) -> list[TaskData]:
    """The tasks a user's model reads from the task file ``path`` (:func:`user_entries`), as :class:`TaskData`
    capped by ``budget``, in ``names`` order (text data by default: ``.csv`` / ``.jsonl``)."""
    return [load_entry(path, e, budget, split_seed=split_seed, allowed=allowed)
            for e in user_entries(path, names)]


def _read_table(file: Path, e: TaskEntry) -> tuple[list[Any], list[Any]]:
    """Rows of a CSV (pandas) or JSONL file → (texts, raw labels); missing columns / labels raise."""
    if file.suffix.lower() == ".csv":
        import pandas as pd

        text = read_text(file, "data file", TaskError)  # non-UTF-8 bytes: one line with the byte offset
        try:
            df = pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=True)
        except (ValueError, OSError) as err:
            raise TaskError(f"cannot read {file.name} as CSV ({err})") from None
        rows = df.to_dict(orient="records")
        columns = [str(c) for c in df.columns]
    else:
        rows, columns = [], []
        for n, line in enumerate(read_text(file, "data file", TaskError).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise TaskError(f"{file.name} line {n} is not valid JSON") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{file.name} line {n} is not a JSON object")
            rows.append(obj)
            columns += [c for c in obj if c not in columns]
    if not rows:
        raise TaskError(f"{file.name} has no rows")
    for col in (e.text_column, e.label_column):
        if col not in columns:
            raise TaskError(f"{file.name} has no column {col!r} (columns: {', '.join(columns)})")
    labels = [r.get(e.label_column) for r in rows]
    missing = next((i for i, v in enumerate(labels) if _missing(v)), None)
    if missing is not None:
        raise TaskError(f"{file.name} row {missing + 1}: missing label in column {e.label_column!r}")
    return [r.get(e.text_column) for r in rows], labels


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _as_int(v: Any) -> int | None:
    """The integer a label denotes (``3``, ``"3"``, ``3.0``), None when it is not an integer number; raises on
    a non-integer number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise TaskError(f"label {v!r} is a non-integer number (classification labels must be integers or names)")
    s = str(v).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return None
    if math.isfinite(f) and f.is_integer():
        return int(f)
    raise TaskError(f"label {s!r} is a non-integer number (classification labels must be integers or names)")


def map_labels(raw: Sequence[Any], classes: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Raw labels → ``(label ids, class names)`` (rules in the module docstring)."""
    if classes is not None:
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise TaskError("`classes` must list at least 2 distinct names")
        index = {c: i for i, c in enumerate(classes)}
        ids = []
        for v in raw:
            s = str(v).strip()
            if s in index:
                ids.append(index[s])
                continue
            k = _as_int(v)
            if k is None or not 0 <= k < len(classes):
                raise TaskError(f"label {s!r} is not one of the declared classes {list(classes)}")
            ids.append(k)
        empty = [c for i, c in enumerate(classes) if i not in set(ids)]
        if empty:
            raise TaskError(f"declared class(es) {', '.join(map(repr, empty))} have no examples (empty class)")
        return ids, list(classes)
    ints = [_as_int(v) for v in raw]
    if all(k is not None for k in ints):
        values = sorted(set(ints))  # type: ignore[type-var]
        index = {k: i for i, k in enumerate(values)}
        ids, names = [index[k] for k in ints], [str(k) for k in values]  # type: ignore[index]
    else:
        strings = [str(v).strip() for v in raw]
        names = sorted(set(strings))
        index = {c: i for i, c in enumerate(names)}
        ids = [index[s] for s in strings]
    if len(names) < 2:
        raise TaskError(f"only one class ({names[0]!r}); a task needs at least 2")
    return ids, names


def _image_task(e: TaskEntry, file: Path, sizes: Sequence[int | None], seed: int,
                image_transform: ImageTransform | None) -> TaskData:
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise TaskError(f"{file.name} must hold arrays 'x' (images) and 'y' (labels); it has "
                                 f"{', '.join(z.files) or 'none'}")
            x, y = z["x"], z["y"]
    except ValueError as err:
        raise TaskError(f"cannot read {file.name} as .npz ({err})") from None
    if y.ndim != 1 or len(y) != len(x):
        raise TaskError(f"{file.name}: y must be 1-D with one label per image ({len(x)} images, y {y.shape})")
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0)):
        raise TaskError(f"{file.name}: labels y must be integer numbers (dtype {y.dtype})")
    if x.dtype.kind not in "iuf":
        raise TaskError(f"{file.name}: images x must be numeric (dtype {x.dtype})")
    ids, names = (map_labels([int(v) for v in y], e.classes) if e.classes is not None
                  else map_labels([int(v) for v in y]))
    if image_transform is None:
        images = torch.as_tensor(x).float()
    else:
        try:
            images = image_transform(x)
        except ValueError as err:
            raise TaskError(f"{file.name}: {err}") from None
    return make_tensor_splits(e.name, images, ids, names, seed=seed, sizes=sizes, in_domain=e.in_domain,
                              source=f"user file {file.name}")

__all__ = ["IMAGE_INPUTS", "TEXT_INPUTS", "TaskEntry", "data_file", "load_entry", "load_task_file",
           "load_user_tasks", "make_tensor_splits", "map_labels", "read_entries", "user_entries"]
