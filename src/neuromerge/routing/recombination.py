"""MERGE: modular expert recombination — configurations, the module library and the chain-routed model.

MERGE (Qiu, Wu, Feng, Tan, arXiv 2602.06552; no public code; docs/methods/spec.md §2, reconstruction steps 2, 3 and 6):

- A **configuration** gives, for each component ``c`` (:mod:`.components`), a partition ``P_c`` of the tasks
  (canonical label vector: groups numbered by first occurrence) and optionally a merge operator and its
  coefficient λ.
- The **library** holds, for each group ``S ∈ P_c``, the module ``M_{c,S} = θ0^c + op({τ_t^c : t ∈ S})`` (computed
  by :func:`neuromerge.functional.merge_state_dicts` on the component's tensors; a singleton group is the expert's
  own component ``θ_t^c``), stored once: every distinct tensor (by content hash) is written once, ≥ 2-D float
  tensors as int8 + per-output-channel fp32 scales after percentile clipping (:mod:`neuromerge.tensors.quant`),
  1-D float tensors as float32, others as they are. ``Library.storage_bytes()`` is the exact size of the library's
  safetensors file (header included), the search's second objective.
- Task ``t`` runs its **chain** ``{M_{c, S_c(t)}}_c``: :meth:`Library.chain` assembles it from the dequantized
  tensors, each dequantized once and cached, so a chain is a dict of references (no arithmetic).
- :class:`ChainRoutedModel`: a router predicts each sample's task from features of the frozen backbone; the batch
  is grouped by chain (tasks whose chains are the same modules run together) and each group runs the backbone
  module with its chain's tensors (``torch.func.functional_call``), outputs re-assembled in the input order.

Semantics choices:

- The operator's coefficient is its ``lam`` (λ of Task Arithmetic, TIES, Breadcrumbs); ``None`` keeps the
  method's default (Task Arithmetic: 0.3). Averaging (``linear``) has no λ: its coefficient is ignored.
- Global statistics of an operator (TIES' global top-k threshold) are computed over the component's tensors.
- ``exclude`` regexes (e.g. BatchNorm running statistics) are not merged: merged groups keep the base's tensors,
  singleton groups the expert's.
- Per-task tensors (:meth:`Library.set_task_tensors`, e.g. BatchNorm statistics re-estimated for the task's chain)
  replace chain tensors for that task only; they are stored as float32 and counted in the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neuromerge.errors import CheckpointError, CompatibilityError, ConfigError
from neuromerge.search.encoding import canonicalize as canonical_labels  # restricted growth string
from neuromerge.search.encoding import groups as label_groups  # groups of task indices, canonical order
from neuromerge.tensors.quant import combine_errors, dequantize, quant_error, quantizable, quantize_per_channel

from .components import components as ordered_components

StateDict = Mapping[str, torch.Tensor]
Labels = tuple[int, ...]
FeatureFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]

LIBRARY_FORMAT = "neuromerge-merge-library"
LIBRARY_VERSION = 1
INDEX_KEY = "neuromerge_library"
LIBRARY_FILE = "library.safetensors"
METHOD = "merge"
DEFAULT_PERCENTILE = 99.9


# ------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Configuration:
    """Per component: a partition of the tasks (canonicalized), a merge operator and its coefficient.

    ``operators`` / ``coefficients`` may be one value for every component or a ``{component: value}`` map
    (missing components get ``default_operator`` / None = the operator's default λ).
    """

    partitions: Mapping[str, Labels]
    operators: Mapping[str, str] | str = "task_arithmetic"
    coefficients: Mapping[str, float | None] | float | None = None

    def __post_init__(self) -> None:
        parts = {c: canonical_labels(p) for c, p in self.partitions.items()}
        if not parts:
            raise ConfigError("a configuration needs at least one component")
        sizes = {len(p) for p in parts.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ConfigError(f"every partition must cover the same (non-zero) number of tasks, got {sorted(sizes)}")
        ops = self.operators
        ops_map = {c: ops for c in parts} if isinstance(ops, str) else {c: ops.get(c, "task_arithmetic") for c in parts}
        co = self.coefficients
        co_map = {c: co.get(c) for c in parts} if isinstance(co, Mapping) else dict.fromkeys(parts, co)
        object.__setattr__(self, "partitions", parts)
        object.__setattr__(self, "operators", ops_map)
        object.__setattr__(self, "coefficients", {c: None if v is None else float(v) for c, v in co_map.items()})

    @property
    def n_tasks(self) -> int:
        return len(next(iter(self.partitions.values())))

    @classmethod
    def uniform(cls, components: Sequence[str], labels: Sequence[int], operator: str = "task_arithmetic",
                coefficient: float | None = None) -> Configuration:
        """The same partition, operator and coefficient for every component."""
        return cls({c: tuple(labels) for c in components}, operator, coefficient)

    @classmethod
    def all_merged(cls, components: Sequence[str], n_tasks: int, operator: str = "task_arithmetic",
                   coefficient: float | None = None) -> Configuration:
        return cls.uniform(components, [0] * n_tasks, operator, coefficient)

    @classmethod
    def all_separate(cls, components: Sequence[str], n_tasks: int) -> Configuration:
        return cls.uniform(components, list(range(n_tasks)))

    @classmethod
    def from_search(cls, space: Any, config: Any) -> Configuration:
        """From a :class:`neuromerge.search.SearchSpace` and one of its configurations (operator / coefficient
        indices → names / values)."""
        comps = list(space.components)
        return cls(dict(zip(comps, config.partitions, strict=True)),
                   {c: space.operators[i] for c, i in zip(comps, config.operators, strict=True)},
                   {c: float(space.coefficients[i]) for c, i in zip(comps, config.coefficients, strict=True)})

    def to_dict(self) -> dict[str, Any]:
        return {"partitions": {c: list(p) for c, p in self.partitions.items()}, "operators": dict(self.operators),
                "coefficients": dict(self.coefficients)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Configuration:
        return cls({c: tuple(p) for c, p in d["partitions"].items()}, dict(d["operators"]), dict(d["coefficients"]))


# ------------------------------------------------------------------------------------------- stored tensors

_ST_DTYPES: dict[torch.dtype, str] = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
                                      torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
                                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
#: safetensors writes tensors sorted by dtype (this order, observed with safetensors 0.8) and then by name
_ST_RANK = {dt: i for i, dt in enumerate(_ST_DTYPES)}


def safetensors_size(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                     metadata: Mapping[str, str] | None = None) -> int:
    """Exact size in bytes of the safetensors file ``safetensors.torch.save_file`` writes for tensors of these
    dtypes and shapes: 8-byte header length + JSON header (tensors sorted by dtype then name, compact JSON,
    space-padded to a multiple of 8) + data."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, (dtype, shape) in sorted(specs.items(), key=lambda kv: (_ST_RANK[kv[1][0]], kv[0])):
        if dtype not in _ST_DTYPES:
            raise ConfigError(f"cannot size a safetensors entry of dtype {dtype}")
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8 + offset


def content_key(t: torch.Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes; BLAKE2b, 20 hex digits): equal keys ⇔ equal tensors."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Encoded:
    """One stored tensor: ``parts`` (safetensors suffix → tensor: ``""`` raw, or ``".q"`` int8 + ``".scale"``
    fp32), the original dtype, and the quantization error (None when stored exactly)."""

    parts: dict[str, torch.Tensor]
    dtype: torch.dtype
    error: dict[str, float] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.parts[".q" if ".q" in self.parts else ""].shape)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the values come back in before the cast to :attr:`dtype` (float32 for int8 + scales)."""
        return torch.float32 if ".q" in self.parts else self.parts[""].dtype

    def decode(self) -> torch.Tensor:
        if ".q" in self.parts:
            return dequantize(self.parts[".q"], self.parts[".scale"], self.dtype)
        return self.parts[""].to(self.dtype)


def encode(t: torch.Tensor, quantize: bool, percentile: float) -> Encoded:
    """Storage form of ``t``: int8 + scales for quantizable tensors (when ``quantize``), float32 for other float
    tensors (when ``quantize``; their own dtype otherwise), as-is for the rest."""
    t = t.detach().cpu()
    if quantize and quantizable(t):
        q, scale = quantize_per_channel(t, percentile)
        return Encoded({".q": q, ".scale": scale}, t.dtype, quant_error(t, q, scale))
    raw = t.float() if quantize and t.is_floating_point() else t
    return Encoded({"": raw.contiguous().clone()}, t.dtype)


# ------------------------------------------------------------------------------------------------ library


@dataclass
class Library:
    """The stored modules of one configuration (see the module docstring).

    ``names[c]``: the component's tensor names; ``groups[c][g]``: content keys (in ``names[c]`` order) of the
    module of group ``g`` of ``config.partitions[c]``; ``store``: key → :class:`Encoded`; ``task_tensors``:
    per-task replacements ``{task index: {name: key}}``.
    """

    tasks: tuple[str, ...]
    config: Configuration
    names: dict[str, list[str]]
    groups: dict[str, list[list[str]]]
    store: dict[str, Encoded]
    quantized: bool
    percentile: float
    task_tensors: dict[int, dict[str, str]] = field(default_factory=dict)
    _decoded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- chains ------------------------------------------------------------------------------------------
    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise ConfigError(f"unknown task {task!r}; the library has {list(self.tasks)}")
            return self.tasks.index(task)
        if not 0 <= int(task) < len(self.tasks):
            raise ConfigError(f"task index {task} out of range for {len(self.tasks)} tasks")
        return int(task)

    def tensor(self, key: str) -> torch.Tensor:
        """The dequantized tensor of ``key`` (decoded once, then the same object)."""
        t = self._decoded.get(key)
        if t is None:
            t = self._decoded[key] = self.store[key].decode()
        return t

    def chain_keys(self, task: int | str) -> dict[str, str]:
        """``{name: content key}`` of task's chain (per-task tensors applied)."""
        t = self.task_index(task)
        out: dict[str, str] = {}
        for c, labels in self.config.partitions.items():
            out.update(zip(self.names[c], self.groups[c][labels[t]], strict=True))
        out.update(self.task_tensors.get(t, {}))
        return out

    def chain(self, task: int | str) -> dict[str, torch.Tensor]:
        """Task's chain as a state dict of references to the cached dequantized tensors."""
        return {n: self.tensor(k) for n, k in self.chain_keys(task).items()}

    def chain_id(self, task: int | str) -> tuple[Any, ...]:
        """Equal for tasks whose chains are the same tensors: the group per component (+ the task when it has
        per-task tensors)."""
        t = self.task_index(task)
        ids = tuple(labels[t] for labels in self.config.partitions.values())
        return (*ids, t) if t in self.task_tensors else ids

    def clear_cache(self) -> None:
        """Drop the dequantized tensors (they are decoded again on demand)."""
        self._decoded.clear()

    def n_modules(self) -> int:
        """Number of (component, group) modules."""
        return sum(len(g) for g in self.groups.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every tensor a chain holds."""
        return {n: self.store[k].shape for c, ns in self.names.items() for n, k in zip(ns, self.groups[c][0],
                                                                                      strict=True)}

    def set_task_tensors(self, task: int | str, tensors: StateDict) -> None:
        """Replace chain tensors of ``task`` by ``tensors`` (stored exactly, float32 for floats), e.g. BatchNorm
        statistics re-estimated on the task for its chain."""
        t = self.task_index(task)
        known = {n for ns in self.names.values() for n in ns}
        extra = sorted(set(tensors) - known)
        if extra:
            raise ConfigError(f"per-task tensors name unknown tensors: {', '.join(extra[:10])}")
        keys = {}
        for n, v in tensors.items():
            v = v.detach().cpu()
            k = keys[n] = "x" + content_key(v)  # exact copies: never shared with a quantized tensor
            self.store.setdefault(k, Encoded({"": (v.float() if v.is_floating_point() else v).contiguous()}, v.dtype))
        self.task_tensors[t] = keys
        self._decoded.clear()

    # -- storage -----------------------------------------------------------------------------------------
    def _used_keys(self) -> list[str]:
        used = {k for gs in self.groups.values() for g in gs for k in g}
        used |= {k for m in self.task_tensors.values() for k in m.values()}
        return sorted(used)

    def index(self) -> dict[str, Any]:
        """The JSON index stored in the file's metadata."""
        changed = {k: str(e.dtype).removeprefix("torch.") for k in self._used_keys()
                   if (e := self.store[k]).stored_dtype != e.dtype}
        return {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION, "tasks": list(self.tasks),
                "config": self.config.to_dict(), "quantized": self.quantized, "percentile": self.percentile,
                "names": self.names, "groups": self.groups, "dtypes": changed,
                "task_tensors": {str(t): m for t, m in self.task_tensors.items()}}

    def _metadata(self) -> dict[str, str]:
        return {"format": "pt", INDEX_KEY: json.dumps(self.index(), separators=(",", ":"), sort_keys=True)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the file stores: ``{key + suffix: tensor}`` for every used key."""
        return {k + s: t for k in self._used_keys() for s, t in self.store[k].parts.items()}

    def storage_bytes(self) -> int:
        """Exact size of the file :meth:`save` writes (header and index included)."""
        specs = {k + s: (t.dtype, tuple(t.shape)) for k in self._used_keys() for s, t in self.store[k].parts.items()}
        return safetensors_size(specs, self._metadata())

    def quant_report(self) -> dict[str, float]:
        """Aggregated quantization error of the stored tensors (:func:`neuromerge.tensors.quant.combine_errors`)
        plus ``bytes`` and ``modules``; errors are measured when the tensors are encoded (absent after load)."""
        errs = [e for k in self._used_keys() if (e := self.store[k].error) is not None]
        return {**combine_errors(errs), "bytes": float(self.storage_bytes()), "modules": float(self.n_modules())}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the library (safetensors, index in the metadata); checks the size equals :meth:`storage_bytes`."""
        path = Path(path)
        save_file(self.tensors(), str(path), metadata=self._metadata())
        expected, found = self.storage_bytes(), path.stat().st_size
        if expected != found:  # pragma: no cover - a change in safetensors' layout
            raise RuntimeError(f"library size {found} B differs from the computed {expected} B")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Library:
        """Read a library written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            doc = json.loads(meta[INDEX_KEY])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a MERGE library ({e.__class__.__name__})") from None
        except Exception as e:  # safetensors' own error types
            raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {e})") from None
        if doc.get("format") != LIBRARY_FORMAT or doc.get("version") != LIBRARY_VERSION:
            raise CheckpointError(f"{path}: unknown library format {doc.get('format')!r} v{doc.get('version')!r}")
        store: dict[str, Encoded] = {}
        for name, t in raw.items():
            key, dot, suffix = name.partition(".")
            store.setdefault(key, Encoded({}, torch.float32)).parts[dot + suffix] = t
        for key, enc in store.items():
            dt = doc["dtypes"].get(key)
            enc.dtype = getattr(torch, dt) if dt else enc.stored_dtype
        return cls(tuple(doc["tasks"]), Configuration.from_dict(doc["config"]), doc["names"], doc["groups"], store,
                   bool(doc["quantized"]), float(doc["percentile"]),
                   {int(t): m for t, m in doc["task_tensors"].items()})


# ----------------------------------------------------------------------------------------------- building


def operator_parameters(op: str, coefficient: float | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parameters of ``op`` for :func:`merge_state_dicts`: ``extra`` plus ``lam = coefficient`` when the operator
    has a λ and a coefficient is given."""
    from neuromerge.methods import get

    params = dict(extra or {})
    if coefficient is not None and "lam" in get(op).Params.model_fields:
        params["lam"] = coefficient
    return params


ModuleCache = MutableMapping[tuple[Any, ...], list[tuple[str, Encoded]]]


def merge_group(base: StateDict, experts: Sequence[StateDict], names: Sequence[str], group: Sequence[int], op: str,
                coefficient: float | None, *, ops: Mapping[str, Mapping[str, Any]] | None = None,
                exclude: Sequence[str] | None = None, model_type: str | None = None) -> dict[str, torch.Tensor]:
    """``M_{c,S}`` in full precision: the expert's own tensors for a singleton ``S``, else
    ``merge_state_dicts(op, θ0^c, [θ_t^c : t ∈ S])`` over the component's ``names``."""
    if len(group) == 1:
        return {n: experts[group[0]][n] for n in names}
    from neuromerge.functional import merge_state_dicts

    sub_base = {n: base[n] for n in names}
    models = [{n: experts[t][n] for n in names} for t in group]
    params = operator_parameters(op, coefficient, (ops or {}).get(op))
    return merge_state_dicts(op, sub_base, models, parameters=params,
                             exclude=list(exclude) if exclude is not None else None, model_type=model_type)


def build_library(base: StateDict, experts: Sequence[StateDict], components: Mapping[str, str],
                  config: Configuration, ops: Mapping[str, Mapping[str, Any]] | None = None, *,
                  tasks: Sequence[str] | None = None, quantize: bool = True, percentile: float = DEFAULT_PERCENTILE,
                  exclude: Sequence[str] | None = None, model_type: str | None = None,
                  cache: ModuleCache | None = None) -> Library:
    """The library of ``config`` (module docstring).

    ``components``: ``{tensor name: component}`` (:func:`.components.component_map`) covering ``base``'s keys;
    ``ops``: extra parameters per operator (e.g. ``{"ties": {"density": 0.2}}``); ``quantize=False`` stores the
    tensors exactly. ``exclude``: regexes of tensors merged groups keep from the base (None: the merge config's
    default, as :func:`neuromerge.functional.merge_state_dicts`; the bench passes ``suite.merge_exclude()``).
    ``cache`` (any mutable mapping, e.g. a bounded LRU) memoizes encoded modules across
    configurations, keyed by ``(component, group, operator, coefficient)``.
    """
    n_tasks = len(experts)
    if config.n_tasks != n_tasks:
        raise ConfigError(f"the configuration has {config.n_tasks} tasks but {n_tasks} experts were given")
    tasks = tuple(tasks) if tasks is not None else tuple(f"task{t}" for t in range(n_tasks))
    if len(tasks) != n_tasks:
        raise ConfigError(f"{len(tasks)} task names for {n_tasks} experts")
    missing = sorted(set(base) - set(components))
    if missing:
        raise ConfigError(f"the component map misses {len(missing)} tensors, e.g. {missing[:5]}")
    comps = ordered_components({n: components[n] for n in base})
    if set(comps) != set(config.partitions):
        raise ConfigError(f"configuration components {sorted(config.partitions)} differ from the model's {comps}")
    for i, e in enumerate(experts):
        if set(e) != set(base):
            raise CompatibilityError(f"expert {i} has other tensors than the base ({len(set(e) ^ set(base))} differ)")
    names = {c: [n for n in base if components[n] == c] for c in comps}
    store: dict[str, Encoded] = {}
    groups: dict[str, list[list[str]]] = {}
    for c in comps:
        op, coef = config.operators[c], config.coefficients[c]  # type: ignore[index]
        groups[c] = []
        for group in label_groups(config.partitions[c]):
            merged = len(group) > 1
            ck = (c, tuple(group), op if merged else None, coef if merged else None, quantize, percentile)
            encoded = cache.get(ck) if cache is not None else None
            if encoded is None:
                module = merge_group(base, experts, names[c], group, op, coef, ops=ops, exclude=exclude,
                                     model_type=model_type)
                encoded = [(content_key(module[n]), encode(module[n], quantize, percentile)) for n in names[c]]
                if cache is not None:
                    cache[ck] = encoded
            for k, enc in encoded:
                store.setdefault(k, enc)
            keys = [k for k, _ in encoded]
            groups[c].append(keys)
    return Library(tasks, Configuration({c: config.partitions[c] for c in comps},
                                        {c: config.operators[c] for c in comps},  # type: ignore[index]
                                        {c: config.coefficients[c] for c in comps}),  # type: ignore[index]
                   names, groups, store, quantize, percentile)


# ------------------------------------------------------------------------------------------ routed model


def _gather(parts: list[tuple[torch.Tensor, Any]]) -> Any:
    """Re-assemble per-group outputs in the original sample order (tensors along dim 0; dicts, HF ModelOutputs,
    tuples and lists field by field; None stays None)."""
    from neuromerge.routing.runtime import RoutingError

    first = parts[0][1]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if any(o.dim() == 0 or o.shape[0] != len(i) for i, o in parts):
            raise RoutingError("an output tensor is not per-sample along dim 0; cannot re-assemble the groups")
        order = torch.cat([i for i, _ in parts]).to(first.device)
        return torch.cat([o for _, o in parts])[torch.argsort(order)]
    if isinstance(first, Mapping):
        fields = {k: _gather([(i, o[k]) for i, o in parts]) for k in first}
        return type(first)(**fields) if type(first) is not dict else fields
    if isinstance(first, tuple | list):
        items = [_gather([(i, o[j]) for i, o in parts]) for j in range(len(first))]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    raise RoutingError(f"cannot re-assemble an output of type {type(first).__name__} across routed groups")


class ChainRoutedModel(nn.Module):
    """``backbone`` run per sample with the chain of its (predicted or forced) task.

    ``router`` (:class:`neuromerge.routing.router.Router`, ``n_out`` = number of tasks) reads features of the
    frozen backbone (its own parameters): the pooled output of ``feature_module`` (a first pass that stops right
    after that module: mean over real tokens / spatial mean, :func:`neuromerge.routing.runtime.pool_features`) or
    ``feature_fn(backbone, kwargs) → (B, d)``. The batch is then grouped by chain and each group runs
    ``functional_call(backbone, library.chain(task), kwargs[group])``. Keyword inputs only; tensors whose dim 0
    is the batch size are split, other arguments are passed to every group.
    """

    def __init__(self, backbone: nn.Module, library: Library, router: nn.Module | None = None, *,
                 feature_module: str | None = None, feature_fn: FeatureFn | None = None,
                 mask_kwarg: str = "attention_mask") -> None:
        super().__init__()
        if router is not None and feature_module is None and feature_fn is None:
            raise ConfigError("a router needs a feature source: feature_module or feature_fn")
        n_out = getattr(router, "n_out", None)
        if router is not None and n_out is not None and n_out != len(library.tasks):
            raise CompatibilityError(f"the router has {n_out} outputs but the library has {len(library.tasks)} tasks")
        state = backbone.state_dict()
        wrong = sorted(n for n, shape in library.shapes().items() if n not in state or tuple(state[n].shape) != shape)
        if wrong:
            raise CompatibilityError(f"library tensors missing from the backbone or of another shape: "
                                     f"{', '.join(wrong[:10])}")
        self.backbone = backbone
        self.library = library
        self.router = router
        self.feature_module = feature_module if feature_fn is None else None
        self.feature_fn = feature_fn
        self.mask_kwarg = mask_kwarg
        self.last_tasks: torch.Tensor | None = None
        #: per-task linear heads ``{task: {"weight" (C, d), "bias" (C,)}}`` (set by ``load_routed``; empty here)
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self._forced: torch.Tensor | None = None
        #: chain tensors cast to the backbone's dtype / device: ``(content key, dtype, device) → tensor``, valid for
        #: the backbone layout ``_cast_layout`` (rebuilt when the backbone is converted or moved)
        self._cast: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._cast_layout: tuple[Any, ...] | None = None
        self._targets: dict[str, tuple[torch.dtype, torch.device]] = {}
        if self.feature_module is not None:
            try:
                backbone.get_submodule(self.feature_module)
            except AttributeError:
                raise ConfigError(f"feature module {self.feature_module!r} not found in the backbone") from None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.library.tasks

    def _layout(self) -> tuple[Any, ...]:
        """A cheap fingerprint of the backbone's dtype and device: those of its first parameter (else buffer)."""
        ref = next(iter(self.backbone.parameters()), None)
        if ref is None:
            ref = next(iter(self.backbone.buffers()), None)
        return (None,) if ref is None else (ref.dtype, ref.device)

    def chain(self, task: int) -> dict[str, torch.Tensor]:
        """Task's chain in the backbone's dtype and device: floating tensors follow the backbone tensor they replace
        (``model.to(torch.bfloat16)`` / ``model.to("cuda")`` reach the library's float32 tensors too); the cast
        copies are made once per content key and reused by every chain that holds them."""
        layout = self._layout()
        if layout != self._cast_layout:
            self._cast.clear()
            self._targets = {n: (t.dtype, t.device) for n, t in self.backbone.state_dict(keep_vars=True).items()}
            self._cast_layout = layout
        out: dict[str, torch.Tensor] = {}
        for name, key in self.library.chain_keys(task).items():
            t = self.library.tensor(key)
            dtype, device = self._targets.get(name, (t.dtype, t.device))
            if not t.is_floating_point() or not dtype.is_floating_point:
                dtype = t.dtype
            if t.dtype != dtype or t.device != device:
                ck = (key, dtype, device)
                cast = self._cast.get(ck)
                if cast is None:
                    cast = self._cast[ck] = t.to(device=device, dtype=dtype)
                t = cast
            out[name] = t
        return out

    # -- routing -----------------------------------------------------------------------------------------
    def features(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Router features ``(B, d)`` of the frozen backbone."""
        from neuromerge.routing.runtime import RoutingError, output_of, pool_features

        if self.feature_fn is not None:
            return self.feature_fn(self.backbone, kwargs)
        out = output_of(self.backbone, self.backbone.get_submodule(self.feature_module), kwargs)  # type: ignore[arg-type]
        if out is None:
            raise RoutingError(f"feature module {self.feature_module!r} did not run in the backbone's forward")
        mask = kwargs.get(self.mask_kwarg)
        return pool_features(out, mask if isinstance(mask, torch.Tensor) else None)

    def predict(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Predicted task index per sample ``(B,)`` (argmax of the router's logits)."""
        from neuromerge.routing.runtime import RoutingError

        if self.router is None:
            raise RoutingError("this chain-routed model has no router; call it under force(task_ids)")
        feats = self.features(kwargs)
        ref = next(self.router.parameters())
        return self.router(feats.to(device=ref.device, dtype=ref.dtype)).argmax(dim=-1).cpu()

    @contextlib.contextmanager
    def force(self, task_ids: torch.Tensor | Sequence[int] | int) -> Iterator[ChainRoutedModel]:
        """Oracle routing: use these task indices (one per sample, or one for all) inside the block."""
        prev, self._forced = self._forced, torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        try:
            yield self
        finally:
            self._forced = prev

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The backbone's output, each sample computed with its task's chain."""
        from neuromerge.routing.runtime import RoutingError

        if args:
            raise RoutingError("ChainRoutedModel takes keyword inputs only (e.g. input_ids=..., pixel_values=...)")
        n = next((int(v.shape[0]) for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
        if n is None:
            raise RoutingError("ChainRoutedModel needs at least one batched tensor input")
        with torch.no_grad():
            tasks = self._forced if self._forced is not None else self.predict(kwargs)
        if tasks.numel() == 1:
            tasks = tasks.expand(n)
        if tasks.numel() != n:
            raise RoutingError(f"{tasks.numel()} task ids for a batch of {n}")
        for t in set(tasks.tolist()):
            self.library.task_index(t)
        self.last_tasks = tasks.clone()
        by_chain: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(tasks.tolist()):
            by_chain.setdefault(self.library.chain_id(t), []).append(i)
        parts = []
        for rows in by_chain.values():
            idx = torch.tensor(rows, dtype=torch.long)
            task = int(tasks[rows[0]])
            sub = {k: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v
                   for k, v in kwargs.items()}
            out = torch.func.functional_call(self.backbone, self.chain(task), args=(), kwargs=sub,
                                              strict=False)
            if len(by_chain) == 1:
                return out
            parts.append((idx, out))
        return _gather(parts)


# ----------------------------------------------------------------------------------------- routed folder


def save_chain_routed(model: ChainRoutedModel, folder: str | os.PathLike[str], *, base_ref: str | None = None,
                      embed_base: bool = False, extra: dict | None = None, force: bool = False,
                      heads: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
                      router_validation: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None) -> Path:
    """Write a routed-model folder of method ``merge``: ``manifest.json``, ``library.safetensors``,
    ``router.safetensors`` (+ ``base/`` when ``embed_base``; transformers backbones only).

    The backbone supplies the router's features (frozen base weights): ``base_ref`` (path or HF id, its header
    hash is recorded) or ``embed_base``; with neither, :func:`load_chain_routed` needs ``module=``. ``heads``,
    ``router_validation``, ``inputs``: :func:`neuromerge.routing.folder.write_trust`.
    """
    from neuromerge.io.writer import AtomicOutput
    from neuromerge.routing.folder import (
        BASE_DIR,
        FORMAT,
        MANIFEST,
        ROUTER_FILE,
        VERSION,
        _header_hash,
        manifest_ref,
        write_trust,
    )

    base_ref = manifest_ref(base_ref)
    lib, router = model.library, model.router
    shapes = {n: list(t.shape) for n, t in model.backbone.state_dict().items()}
    with AtomicOutput(Path(folder), force=force, inputs=[base_ref]) as tmp:
        lib.save(tmp / LIBRARY_FILE)
        if router is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
            save_file(state, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        header_hash = None
        if embed_base:
            if not hasattr(model.backbone, "save_pretrained"):
                raise ConfigError(f"embed_base needs a transformers model, got {type(model.backbone).__name__}")
            model.backbone.save_pretrained(tmp / BASE_DIR)
            header_hash = _header_hash(tmp / BASE_DIR)
        elif base_ref is not None:
            header_hash = _header_hash(base_ref)
        feature = ({"kind": "module", "module": model.feature_module, "mask_kwarg": model.mask_kwarg}
                   if model.feature_fn is None else {"kind": "fn", "name": _feature_name(model.feature_fn),
                                                     "mask_kwarg": model.mask_kwarg})
        router_bytes = sum(t.numel() * t.element_size() for t in router.state_dict().values()) if router else 0
        trust = write_trust(tmp, heads=heads, router_validation=router_validation, inputs=inputs)
        manifest = {
            "format": FORMAT, "version": VERSION, "method": METHOD, "tasks": list(lib.tasks),
            "library": {"file": LIBRARY_FILE, "storage_bytes": lib.storage_bytes(), "modules": lib.n_modules(),
                        "quantized": lib.quantized, "percentile": lib.percentile, "quant_error": lib.quant_report()},
            "router": {"config": router.config() if router is not None else None, "feature": feature},
            "base": {"ref": base_ref, "embedded": bool(embed_base), "class": type(model.backbone).__name__,
                     "header_hash": header_hash, "shapes": shapes},
            "storage_bytes": {"library": lib.storage_bytes(), "router": router_bytes},
            **trust,
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def _feature_name(fn: FeatureFn) -> str:
    from neuromerge.routing.runtime import FEATURE_FNS

    return next((k for k, f in FEATURE_FNS.items() if f is fn), "custom")


def load_chain_routed(folder: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                      module: nn.Module | None = None, feature_fn: FeatureFn | None = None,
                      check_hash: bool = True) -> ChainRoutedModel:
    """Rebuild the :class:`ChainRoutedModel` of a ``merge`` routed-model folder (eval mode).

    The backbone is ``module`` when given (e.g. ``suite.module(suite.backbone_state())``), else built from the
    embedded ``base/`` or the manifest's base reference (``base`` overrides its location; header hash checked).
    """
    from neuromerge.routing.folder import (
        MANIFEST,
        ROUTER_FILE,
        _base_module,
        _load_tensors,
        read_heads,
        read_manifest,
    )
    from neuromerge.routing.router import Router
    from neuromerge.routing.runtime import FEATURE_FNS

    folder = Path(folder)
    doc = read_manifest(folder)
    if doc.get("method") != METHOD:
        raise CheckpointError(f"{folder / MANIFEST} is a {doc.get('method')!r} routed model, not {METHOD!r}")
    library = Library.load(folder / LIBRARY_FILE)
    config = doc["router"].get("config")
    router = None
    if config is not None:
        if int(config["n_out"]) != len(library.tasks):
            raise CompatibilityError(f"the router of {folder} has {config['n_out']} outputs but the library has "
                                     f"{len(library.tasks)} tasks")
        router = Router(**{k: int(v) for k, v in config.items()})
        router.load_state_dict(_load_tensors(folder / ROUTER_FILE))
        router.eval()
    info = doc["base"]
    module, _ = _base_module(folder, info, base, module, check_hash, "load_chain_routed")
    shapes = {n: list(t.shape) for n, t in module.state_dict().items()}
    wrong = sorted(n for n, s in info.get("shapes", {}).items() if shapes.get(n) != s)
    if wrong:
        raise CompatibilityError(f"the backbone differs from the saved one in {len(wrong)} tensors, e.g. {wrong[:3]}")
    feature = doc["router"].get("feature") or {}
    fn = None
    if feature.get("kind") == "fn":
        fn = feature_fn or FEATURE_FNS.get(feature.get("name", ""))
        if fn is None:
            raise ConfigError(f"{folder} routes with a custom feature function; pass feature_fn=")
    model = ChainRoutedModel(module.eval(), library, router, feature_module=feature.get("module"), feature_fn=fn,
                             mask_kwarg=feature.get("mask_kwarg", "attention_mask")).eval()
    model.heads = read_heads(folder, doc)
    return model
