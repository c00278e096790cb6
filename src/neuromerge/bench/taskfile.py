"""User tasks without code: a YAML file of tasks that join a suite.

```yaml
tasks:
  - name: support_tickets          # unique, not one of the suite's own task names
    suite: text                    # text | llm take .csv / .jsonl; vision takes .npz
    file: tickets.csv              # relative to the YAML file's folder
    text_column: text              # CSV / JSONL only (default "text")
    label_column: label            # CSV / JSONL only (default "label")
    in_domain: true                # false: out of domain (kept out of the merge, scored by a fresh probe)
    classes: [billing, bug, other] # optional: class names in label-id order
  - name: my_digits
    suite: vision
    file: digits.npz               # arrays x (N, H, W) / (N, C, H, W) / (N, H, W, C) and y (N,) integer labels
```

**Labels** (CSV / JSONL). Without ``classes``: if every label is an integer (``3``, ``"3"``, ``3.0``) the classes
are the distinct integers in increasing order, named by their value (``{0, 2, 5}`` → ids 0, 1, 2); otherwise
every label is taken as a string and the classes are the distinct strings in alphabetical order. A non-integer
number (``0.5``) is refused (regression is not supported). With ``classes``: a label must be one of the names (or
an integer index into the list); a declared class without examples is an error. ``.npz`` labels must be
numeric integers. At least 2 classes and 3 examples per class (one per split) are needed.

Splits, cleaning and caps are those of :func:`neuromerge.bench.data.make_splits` (60 / 20 / 20 % per class,
seeded, capped by the suite's budget); images follow the same stratified rule.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..textfile import read_text
from . import data
from .suite import Budget, Split, TaskData
from .suites import BenchError, available_suites

#: suite -> the kind of data files it takes
SUITE_INPUTS: dict[str, tuple[str, ...]] = {"text": (".csv", ".jsonl"), "llm": (".csv", ".jsonl"),
                                            "vision": (".npz",)}


class TaskEntry(BaseModel):
    """One entry of a task file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    suite: str
    file: str
    text_column: str = "text"
    label_column: str = "label"
    in_domain: bool = True
    classes: list[str] | None = None


def _err(path: Path, msg: str) -> BenchError:
    return BenchError(f"task file {path}: {msg}")


def read_entries(path: str | Path) -> list[TaskEntry]:
    """Parse and validate the YAML file (all suites)."""
    p = Path(path)
    if p.is_dir():
        raise BenchError(f"task file {p} is a folder, expected a YAML file")
    if not p.is_file():
        raise BenchError(f"task file {p} does not exist")
    try:
        doc = yaml.safe_load(read_text(p, "task file", BenchError))
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
        if entries[-1].suite not in available_suites():
            raise _err(p, f"task {entries[-1].name!r}: unknown suite {entries[-1].suite!r}; available: "
                          f"{', '.join(available_suites())}")
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _err(p, f"task name {dup!r} is used twice")
    return entries


def load_task_file(path: str | Path, suite: str, budget: Budget, *, reserved: Sequence[str] = (),
                   split_seed: int = 0) -> list[TaskData]:
    """The tasks of ``path`` that join ``suite``, as :class:`TaskData` capped by ``budget``. An entry for
    another suite is skipped; a name in ``reserved`` (the suite's own tasks) is an error."""
    p = Path(path)
    out = []
    for e in read_entries(p):
        if e.suite != suite:
            continue
        if e.name in reserved:
            raise _err(p, f"task name {e.name!r} is already a task of suite {suite!r}")
        file = (p.parent / e.file) if not Path(e.file).is_absolute() else Path(e.file)
        if not file.is_file():
            raise _err(p, f"task {e.name!r}: data file {file} does not exist")
        ext = "".join(file.suffixes[-1:]).lower()
        allowed = SUITE_INPUTS.get(suite, (".csv", ".jsonl", ".npz"))
        if ext not in allowed:
            raise _err(p, f"task {e.name!r}: suite {suite!r} takes {' or '.join(allowed)} files, not {file.name}")
        x = budget.extra
        train_cap = x.get("train_examples") if e.in_domain else x.get("ood_train_examples", x.get("train_examples"))
        sizes = (train_cap, x.get("val_examples", budget.eval_examples), budget.eval_examples)
        try:
            if ext == ".npz":
                out.append(_image_task(e, file, sizes, split_seed))
            else:
                texts, raw_labels = _read_table(file, e)
                labels, classes = map_labels(raw_labels, e.classes)
                out.append(data.make_splits(e.name, texts, labels, classes, seed=split_seed, sizes=sizes,
                                            in_domain=e.in_domain, source=f"user file {file.name}"))
        except BenchError as err:
            raise _err(p, f"task {e.name!r}: {str(err).removeprefix(f'task {e.name!r}: ')}") from None
    return out


def _read_table(file: Path, e: TaskEntry) -> tuple[list[Any], list[Any]]:
    """Rows of a CSV (pandas) or JSONL file → (texts, raw labels); missing columns / labels raise."""
    if file.suffix.lower() == ".csv":
        import pandas as pd

        text = read_text(file, "data file", BenchError)  # non-UTF-8 bytes: one line with the byte offset
        try:
            df = pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=True)
        except (ValueError, OSError) as err:
            raise BenchError(f"cannot read {file.name} as CSV ({err})") from None
        rows = df.to_dict(orient="records")
        columns = [str(c) for c in df.columns]
    else:
        rows, columns = [], []
        for n, line in enumerate(read_text(file, "data file", BenchError).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise BenchError(f"{file.name} line {n} is not valid JSON") from None
            if not isinstance(obj, dict):
                raise BenchError(f"{file.name} line {n} is not a JSON object")
            rows.append(obj)
            columns += [c for c in obj if c not in columns]
    if not rows:
        raise BenchError(f"{file.name} has no rows")
    for col in (e.text_column, e.label_column):
        if col not in columns:
            raise BenchError(f"{file.name} has no column {col!r} (columns: {', '.join(columns)})")
    labels = [r.get(e.label_column) for r in rows]
    missing = next((i for i, v in enumerate(labels) if _missing(v)), None)
    if missing is not None:
        raise BenchError(f"{file.name} row {missing + 1}: missing label in column {e.label_column!r}")
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
        raise BenchError(f"label {v!r} is a non-integer number (classification labels must be integers or names)")
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
    raise BenchError(f"label {s!r} is a non-integer number (classification labels must be integers or names)")


def map_labels(raw: Sequence[Any], classes: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Raw labels → ``(label ids, class names)`` (rules in the module docstring)."""
    if classes is not None:
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise BenchError("`classes` must list at least 2 distinct names")
        index = {c: i for i, c in enumerate(classes)}
        ids = []
        for v in raw:
            s = str(v).strip()
            if s in index:
                ids.append(index[s])
                continue
            k = _as_int(v)
            if k is None or not 0 <= k < len(classes):
                raise BenchError(f"label {s!r} is not one of the declared classes {list(classes)}")
            ids.append(k)
        empty = [c for i, c in enumerate(classes) if i not in set(ids)]
        if empty:
            raise BenchError(f"declared class(es) {', '.join(map(repr, empty))} have no examples (empty class)")
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
        raise BenchError(f"only one class ({names[0]!r}); a task needs at least 2")
    return ids, names


def _image_task(e: TaskEntry, file: Path, sizes: Sequence[int | None], seed: int) -> TaskData:
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise BenchError(f"{file.name} must hold arrays 'x' (images) and 'y' (labels); it has "
                                 f"{', '.join(z.files) or 'none'}")
            x, y = z["x"], z["y"]
    except ValueError as err:
        raise BenchError(f"cannot read {file.name} as .npz ({err})") from None
    if y.ndim != 1 or len(y) != len(x):
        raise BenchError(f"{file.name}: y must be 1-D with one label per image ({len(x)} images, y {y.shape})")
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0)):
        raise BenchError(f"{file.name}: labels y must be integer numbers (dtype {y.dtype})")
    if x.dtype.kind not in "iuf":
        raise BenchError(f"{file.name}: images x must be numeric (dtype {x.dtype})")
    ids, names = (map_labels([int(v) for v in y], e.classes) if e.classes is not None
                  else map_labels([int(v) for v in y]))
    try:
        from .vision_data import to_model_images

        images = to_model_images(x)
    except (ImportError, ValueError) as err:
        if isinstance(err, ValueError):
            raise BenchError(f"{file.name}: {err}") from None
        images = torch.as_tensor(x).float()
    return make_tensor_splits(e.name, images, ids, names, seed=seed, sizes=sizes, in_domain=e.in_domain,
                              source=f"user file {file.name}")


def make_tensor_splits(name: str, inputs: torch.Tensor, labels: Sequence[int], classes: Sequence[str], *,
                       seed: int, sizes: Sequence[int | None] | None, in_domain: bool = True,
                       source: str = "") -> TaskData:
    """Stratified seeded splits of a tensor dataset, as :func:`data.make_splits` does for texts."""
    counts = [list(labels).count(c) for c in range(len(classes))]
    few = [classes[c] for c, n in enumerate(counts) if n < 3]
    if few:
        raise BenchError(f"task {name!r}: class(es) {', '.join(map(repr, few))} have fewer than 3 examples "
                         "(one per split needed)")
    parts = data.stratified_indices(list(labels), len(classes), seed=seed, name=name)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    splits, h = [], hashlib.sha256(name.encode() + "\x1f".join(classes).encode())
    for k, per_class in enumerate(parts):
        if sizes is not None and sizes[k] is not None:
            keep = data.stratified_cap([len(q) for q in per_class], int(sizes[k]))
            per_class = [q[:n] for q, n in zip(per_class, keep, strict=True)]
        idx = torch.tensor(sorted(i for q in per_class for i in q), dtype=torch.long)
        split = Split(inputs[idx].contiguous(), y[idx])
        h.update(split.inputs.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
        splits.append(split)
    return TaskData(name=name, classes=list(classes), train=splits[0], val=splits[1], test=splits[2],
                    in_domain=in_domain, source=source, fingerprint=h.hexdigest())
