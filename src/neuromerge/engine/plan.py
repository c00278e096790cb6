"""Plan a merge from headers alone: which tensors are merged or copied, in which layout, in which row chunks.

Everything here reads only safetensors headers (and ``config.json``), so ``--dry-run`` and every compatibility
error happen before a single weight is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import MergeConfig, ModelEntry, ParamResolver
from ..errors import CompatibilityError, ConfigError
from ..io.checkpoint import Checkpoint
from ..io.lora import LoraCheckpoint, open_model, unverified_base_note
from ..io.lora_output import LoraOutputPlan, delta_coefficients, plan_lora_output
from ..io.tokenizer_merge import VocabularyMerge, build_vocabulary
from ..io.vocab import vocab_mismatch
from ..methods import MergeMethod
from .layout import Layout, LayoutRules

Action = Literal["merge", "copy"]
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: names of input embeddings, used to resolve an output head tied to them (``tie_word_embeddings``)
INPUT_EMBEDDING_RE = re.compile(r"(embed_tokens|wte|word_embeddings|shared|embed_in)\.weight$")
OUTPUT_EMBEDDING_RE = re.compile(r"(lm_head|embed_out|predictions\.decoder|output)\.weight$")
#: tensors whose rows are token ids: permuted to the output vocabulary when the config gives a tokenizer source
VOCAB_TENSOR_RE = re.compile(f"(?:{INPUT_EMBEDDING_RE.pattern})|(?:{OUTPUT_EMBEDDING_RE.pattern})")
EMBEDDING_RE = re.compile(r"(embed|wte|lm_head|predictions\.decoder|shared|output)[^.]*\.weight$")


@dataclass
class Pool:
    """What is merged: the base checkpoint (or the reference model when there is none) and the experts."""

    base: Checkpoint
    models: list[Checkpoint]
    base_given: bool
    notes: list[str] = field(default_factory=list)
    #: the output vocabulary when the config gives ``tokenizer_source`` / ``tokenizer:`` (rows matched by token)
    vocabulary: VocabularyMerge | None = None

    @property
    def checkpoints(self) -> list[Checkpoint]:
        seen: dict[int, Checkpoint] = {}
        for ckpt in [self.base, *self.models]:
            seen.setdefault(id(ckpt), ckpt)
        return list(seen.values())

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


@dataclass
class TensorPlan:
    """One output tensor."""

    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    action: Action
    reason: str
    layout: Layout = "point"
    fallback_layout: bool = False
    sources: list[str] = field(default_factory=list)  # per model: name of the tensor to read (tied aliases)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # row ranges merged
    extra_rows: tuple[int, int, int] | None = None  # (start, stop, model index; -1 = base) copied, vocab=shared
    remapped: bool = False  # rows permuted to the output vocabulary (Pool.vocabulary) before the merge

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StatisticsGroup:
    """One global trim: the models ``models`` (indices into the pool) share the tensors ``tensors`` and each has
    one density there (``densities``, in the order of ``models``); their thresholds are computed over those tensors
    only."""

    models: tuple[int, ...]
    densities: tuple[float, ...]
    tensors: frozenset[str]


@dataclass(frozen=True)
class StatisticsPlan:
    """What the statistics pass computes, decided at planning: one global threshold per (model, density value)
    over the merged tensors whose resolved parameters ask for it (``tensors``), with the L1 mass when some tensor
    needs it. ``groups`` partition (model, tensor) pairs; a density that never varies makes one group holding
    every model and every such tensor (``densities``: that group's densities, one per model)."""

    groups: tuple[StatisticsGroup, ...]
    tensors: frozenset[str]
    l1: bool

    @property
    def densities(self) -> tuple[float, ...]:
        """The per-model densities when there is one group of every model (the common case), else an error."""
        if len(self.groups) != 1:
            raise ValueError("the density varies: several statistics groups")
        return self.groups[0].densities

    def group_of(self, model: int, tensor: str) -> int:
        """Index of the group holding ``model``'s trim of ``tensor``."""
        for i, g in enumerate(self.groups):
            if model in g.models and tensor in g.tensors:
                return i
        raise KeyError((model, tensor))


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    pool: Pool
    tensors: list[TensorPlan]
    num_layers: int | None
    chunk_elements: int
    config_overrides: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lora: LoraOutputPlan | None = None  # set when the output is a LoRA adapter (config `output.format: lora`)
    statistics: StatisticsPlan | None = None  # the global statistics pass, when the method needs one
    #: a slice's first output layer (its gradients run over its own layers: :class:`~neuromerge.config.ParamResolver`)
    layer_offset: int = 0
    #: ``slices``: one plan per output slice over renamed views of its sources (:mod:`.slices`); this plan then holds
    #: every output tensor, the real checkpoints and the output config, and runs nothing itself
    segments: list[MergePlan] = field(default_factory=list)
    #: ``slices``: the slice plan (output layers ← each source's layers), shown by ``--dry-run`` and the report
    slice_table: list[dict[str, object]] = field(default_factory=list)

    def parts(self) -> list[MergePlan]:
        """The plans whose tensors are merged: the slices' plans, or this plan itself."""
        return self.segments or [self]

    def resolver(self) -> ParamResolver:
        """The parameter resolver of this plan's tensors (not of a plan with ``segments``)."""
        return ParamResolver(self.config, self.num_layers, self.layer_offset)

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == "merge"]

    def output_bytes(self) -> int:
        if self.lora is not None:
            return self.lora.output_bytes()
        return sum(t.numel * t.out_dtype.itemsize for t in self.tensors)

    def input_bytes(self) -> int:
        return sum(c.total_bytes for c in self.pool.checkpoints)

    def peak_memory_estimate(self, threads: int) -> int:
        """Bytes of tensor working set at peak: per worker, the fp32 copies of one chunk of every model, the
        task vectors and about as much again for temporaries, plus the raw input bytes of that chunk."""
        t = len(self.pool.models)
        biggest = max((self._chunk_elems(p) for p in self.tensors), default=0)
        per_worker = biggest * (4 * (3 * t + 3) + 2 * (t + 1))
        return per_worker * max(1, threads)

    def _chunk_elems(self, p: TensorPlan) -> int:
        if p.action == "copy" or not p.chunks:
            return p.numel
        row = p.numel // max(1, p.shape[0]) if p.shape else 1  # a 0-d tensor (CLIP's logit_scale) is one entry
        return max(b - a for a, b in p.chunks) * row


#: rows processed at once per model copy: 512 Ki fp32 entries (2 MiB; the CLI's ``--chunk-mb 2``). A (T, rows, cols)
#: stack of three models stays far below glibc's largest mmap threshold (see :mod:`.memory`), so temporaries reuse
#: heap memory instead of page-faulting fresh mappings, and a chunk just read (four bf16 copies: 4 MiB) is still in
#: the CPU's last-level cache when the fused kernel sweeps it. Measured on the merge_speed family (best of 4,
#: interleaved): 8 MiB → 2 MiB took Task Arithmetic from 2.16 s to 1.70 s and TIES from 2.67–3.15 s to 2.68–3.02 s,
#: and peak RSS down by ~90 MiB (earlier, 4 M → 2 M entries had taken TA's merge pass from 3.2 s to 2.6 s).
DEFAULT_CHUNK_ELEMENTS = 1 << 19


def open_pool(config: MergeConfig, *, allow_download: bool = False) -> tuple[Pool, MergeConfig]:
    """Open every checkpoint of the config (headers only) and return the pool with the config it applies to.

    The base may also be listed among the models. SLERP then interpolates from it (it is put first, mergekit's
    convention); methods that average the models' *weights* (``averages_weights``: ``linear``) average it like any
    other listed model (mergekit does the same); methods of task vectors drop it from the experts, since its task
    vector is zero (mergekit does the same), with a note. A model listed twice (the same resolved path) is merged
    as two models, with a warning.
    """
    cache: dict[str, Checkpoint] = {}

    def get(ref: str, base: Checkpoint | None = None) -> Checkpoint:
        key = str(Path(ref).resolve()) if Path(ref).exists() else ref
        if key not in cache:
            cache[key] = open_model(ref, base, allow_download=allow_download)
        return cache[key]

    base = get(config.base_model) if config.base_model is not None else None
    pairs = [(entry, get(entry.model, base)) for entry in config.models]
    notes = _duplicate_notes([c for _, c in pairs])
    notes += [n for c in dict.fromkeys(c for _, c in pairs) if isinstance(c, LoraCheckpoint)
              and (n := unverified_base_note(c)) is not None]
    return assemble_pool(config, base, pairs, notes)


def assemble_pool(config: MergeConfig, base: Checkpoint | None, pairs: list[tuple[ModelEntry, Checkpoint]],
                  notes: list[str]) -> tuple[Pool, MergeConfig]:
    """The pool of opened ``pairs`` (config entry, checkpoint) over ``base`` (None: the first model is the
    reference), with the base-among-the-models rule of :func:`open_pool` (a base listed is recognised by identity)."""
    cls = config.method_class()
    if base is None:
        return Pool(base=pairs[0][1], models=[c for _, c in pairs], base_given=False, notes=notes), config
    if any(c is base for _, c in pairs):
        if cls.interpolates_base:
            pairs.sort(key=lambda pair: pair[1] is not base)
        elif not cls.averages_weights:
            pairs = [(e, c) for e, c in pairs if c is not base]
            notes.append("the base model is also listed under `models`; its task vector is zero and it is skipped")
            if len(pairs) < cls.min_models:
                raise ConfigError(f"merge method {cls.name!r} needs at least {cls.min_models} models besides the base")
        config = config.model_copy(update={"models": [e for e, _ in pairs]})
    return Pool(base=base, models=[c for _, c in pairs], base_given=True, notes=notes), config


def _duplicate_notes(models: list[Checkpoint]) -> list[str]:
    """A warning per checkpoint listed more than once under ``models`` (the same resolved path)."""
    notes = []
    for ckpt in dict.fromkeys(models):
        n = sum(1 for m in models if m is ckpt)
        if n > 1:
            notes.append(f"{ckpt.path} is listed {n} times under `models`; each entry is merged as a separate model, "
                         f"so it counts {n} times (list it once, with a `weight`, unless that is meant)")
    return notes


def num_layers_of(base: Checkpoint) -> int | None:
    cfg = base.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    from ..config import layer_index

    indices = [i for i in (layer_index(n) for n in base.names()) if i is not None]
    return max(indices) + 1 if indices else None


def build_plan(config: MergeConfig, pool: Pool, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
               num_layers: int | None = None, layer_offset: int = 0,
               vocabulary: VocabularyMerge | None = None) -> MergePlan:
    """Check names, shapes and dtypes of every model against the base and decide what happens to each tensor.

    ``num_layers`` / ``layer_offset``: the layers gradients run over (default: the base's stack from 0; a slice:
    its own layers). ``vocabulary``: the output vocabulary built by the caller for this pool (a slice: the one
    vocabulary of all slices), instead of the config's own."""
    method = config.method_class()()
    base = pool.base
    resolver = ParamResolver(config, num_layers if num_layers is not None else num_layers_of(base), layer_offset)
    cfg = base.config or {}
    rules = LayoutRules.build(cfg.get("model_type"), [(r.filter, r.layout) for r in config.layout])
    exclude = [re.compile(p) for p in config.exclude]
    warnings = [*config.notes, *pool.notes]
    tensors: list[TensorPlan] = []
    overrides: dict[str, object] = {}
    out_dtype_override = OUT_DTYPES[config.dtype] if config.dtype else None
    vocabulary = pool.vocabulary = vocabulary if vocabulary is not None else _plan_vocabulary(config, pool)
    if vocabulary is not None:
        warnings += vocabulary.warnings
        overrides["vocab_size"] = vocabulary.size

    for name in base.names():
        info = base.info(name)
        floating = info.dtype.is_floating_point
        out_dtype = (out_dtype_override or info.dtype) if floating else info.dtype
        plan = TensorPlan(name, tuple(info.shape), info.dtype, out_dtype, "copy", "")
        if not floating:
            plan.reason = "non-floating (copied from the base)"
        elif vocabulary is not None and VOCAB_TENSOR_RE.search(name) and plan.shape and any(
                p.search(name) for p in exclude):
            raise ConfigError(f"{name!r} is excluded from merging, but `tokenizer_source` changes the vocabulary "
                              "its rows index; merge it (remove the `exclude` pattern)")
        elif any(p.search(name) for p in exclude):
            plan.reason = "excluded by pattern (copied from the base)"
        else:
            plan.action, plan.reason = "merge", "merged"
            plan.sources = [_source_name(name, m, base) for m in pool.models]
            if vocabulary is not None and VOCAB_TENSOR_RE.search(name) and plan.shape:
                _plan_remapped(plan, pool, vocabulary)
            else:
                _check_models(plan, pool, config, overrides)
            plan.layout, plan.fallback_layout = rules.classify(name, plan.shape)
            plan.chunks = _row_chunks(plan, method.chunkable_for(resolver.resolve(name)[0]), chunk_elements)
        tensors.append(plan)

    if vocabulary is None and any(t.action == "merge" and EMBEDDING_RE.search(t.name) for t in tensors):
        _check_vocabularies(pool)
    for m in pool.models:
        extra = sorted(set(m.names()) - set(base.names()))
        if extra:
            warnings.append(f"{m.path}: {len(extra)} tensors absent from the base are ignored (e.g. {extra[0]})")
    fallback = [t.name for t in tensors if t.fallback_layout]
    if fallback:
        warnings.append(
            f"unknown architecture {cfg.get('model_type')!r}: {len(fallback)} 2-D tensors assumed (out, in) like "
            "nn.Linear; add `layout` rules to the config if some are stored (in, out)"
        )
    overrides.update(dtype_overrides(tensors))
    merged_names = [t.name for t in tensors if t.action == "merge"]
    statistics = plan_statistics(method, resolver, merged_names)
    for name in merged_names:
        params, per_model = resolver.resolve(name)
        method.check(name, params, per_model)
    lora = None
    if config.output.format == "lora":
        assert config.output.rank is not None  # OutputConfig's validator
        lora = plan_lora_output(config.output.rank, config.dtype, base, pool.models, pool.base_given,
                                {t.name for t in tensors if t.action == "merge"}, config.base_model)
        warnings += [f"LoRA module {m!r} is excluded from merging: left out of the adapter" for m in lora.dropped]
        if lora.rank == "concat" or method.name == "linear":
            # the coefficients of Σ_t c_t ΔW_t (rank concat), and whether linear leaves the base unscaled (any rank)
            for name in merged_names:
                params, per_model = resolver.resolve(name)
                delta_coefficients(method.name, params, per_model)
    return MergePlan(config, method, pool, tensors, resolver.num_layers, chunk_elements, overrides, warnings, lora,
                     statistics, layer_offset)


def plan_statistics(method: MergeMethod, resolver: ParamResolver, names: list[str]) -> StatisticsPlan | None:
    """The global statistics pass the method asks for (``global_densities``), or None.

    A global trim keeps the top ``density`` fraction of a model's task vector over the tensors it covers. When the
    density varies by layer (a gradient) or by filter, each (model, density value) pair is its own global trim: the
    tensors where model ``t`` has density ``d`` share one threshold. Models whose densities vary over the same
    partition of the tensors share groups (one read of those tensors for all of them)."""
    per_tensor: dict[str, tuple[float, ...]] = {}
    l1 = False
    for name in names:
        params, per_model = resolver.resolve(name)
        d = method.global_densities(params, per_model)
        if d is None:
            continue
        per_tensor[name] = tuple(float(v) for v in d)
        l1 = l1 or method.needs_l1_mass(params)
    if not per_tensor:
        return None
    n_models = len(next(iter(per_tensor.values())))
    # each model's partition of the tensors by its density value, in first-seen order
    partitions: list[tuple[tuple[float, tuple[str, ...]], ...]] = []
    for t in range(n_models):
        blocks: dict[float, list[str]] = {}
        for name, d in per_tensor.items():
            blocks.setdefault(d[t], []).append(name)
        partitions.append(tuple((v, tuple(ns)) for v, ns in blocks.items()))
    classes: dict[tuple[tuple[str, ...], ...], list[int]] = {}
    for t, part in enumerate(partitions):
        classes.setdefault(tuple(ns for _, ns in part), []).append(t)
    groups = []
    for blocks_key, models in classes.items():
        for i, tensors in enumerate(blocks_key):
            groups.append(StatisticsGroup(tuple(models), tuple(partitions[t][i][0] for t in models),
                                          frozenset(tensors)))
    return StatisticsPlan(tuple(groups), frozenset(per_tensor), l1)


def dtype_overrides(tensors: list[TensorPlan]) -> dict[str, object]:
    """``config.json`` keys naming the output's dtype, so that ``from_pretrained`` loads the weights as written.

    transformers 5.x reads only ``dtype`` (and its default ``dtype="auto"`` follows it), older versions
    ``torch_dtype``: both are written, equal, whether ``dtype:`` was given or the output keeps the base's
    dtypes (a base whose config names another dtype than its weights is made consistent). The dtype named is the
    one holding most of the floating entries written (one dtype unless the base mixes them); none without
    floating tensors."""
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.out_dtype.is_floating_point:
            sizes[t.out_dtype] = sizes.get(t.out_dtype, 0) + t.numel
    if not sizes:
        return {}
    name = str(max(sizes, key=lambda d: sizes[d])).removeprefix("torch.")
    return {"dtype": name, "torch_dtype": name}


def _plan_vocabulary(config: MergeConfig, pool: Pool) -> VocabularyMerge | None:
    """The output vocabulary of ``tokenizer_source`` / ``tokenizer:`` (None without them), over the pool's
    distinct checkpoints (:attr:`Pool.checkpoints`: the base first)."""
    spec = config.tokenizer_spec
    if spec is None:
        return None
    ckpts = pool.checkpoints
    folders = [Path(c.path) for c in ckpts]
    for f in folders:
        if not f.is_dir():
            raise ConfigError(f"`tokenizer_source` needs model folders with tokenizer files; {f} is a bare weights "
                              "file")
    keys = {str(f.resolve()): i for i, f in enumerate(folders)}
    position = {id(c): i for i, c in enumerate(ckpts)}
    # the config's own spelling of each model (an HF id, a path) names its checkpoint too
    named = {entry.model: position[id(m)] for entry, m in zip(config.models, pool.models, strict=True)}
    if config.base_model is not None:
        named[config.base_model] = position[id(pool.base)]

    def model_index(ref: str) -> int | None:
        if ref in named:
            return named[ref]
        return keys.get(str(Path(ref).resolve())) if Path(ref).exists() else None

    return build_vocabulary(spec, folders, [c.config for c in ckpts], 0 if pool.base_given else None, model_index)


def _plan_remapped(plan: TensorPlan, pool: Pool, vocabulary: VocabularyMerge) -> None:
    """A tensor whose rows are token ids, permuted to the output vocabulary: every checkpoint's copy is read whole
    (its rows count may differ from the base's), one chunk of the output's rows."""
    ckpts = pool.checkpoints
    names = {id(pool.base): plan.name, **{id(m): s for m, s in zip(pool.models, plan.sources, strict=True)}}
    rows = []
    for c in ckpts:
        info = c.info(names[id(c)])
        if not info.dtype.is_floating_point or tuple(info.shape[1:]) != plan.shape[1:]:
            raise CompatibilityError(
                f"{names[id(c)]!r} in {c.path} is {str(info.dtype).removeprefix('torch.')} {list(info.shape)}; the "
                f"base's is {list(plan.shape)}: only the number of rows (tokens) may differ")
        rows.append(int(info.shape[0]))
    vocabulary.check_rows(plan.name, rows)
    plan.remapped = True
    plan.shape = (vocabulary.size, *plan.shape[1:])
    plan.reason = f"merged, rows permuted to the output vocabulary ({vocabulary.source})"


def _check_vocabularies(pool: Pool) -> None:
    """Refuse a model whose tokenizer gives some id another token than the base's tokenizer does: embedding rows
    are merged by index (with ``vocab: shared`` too), so that row would mix two tokens. A vocabulary that extends
    the other with tokens at new ids is fine; folders without tokenizer files are not compared (:mod:`..io.vocab`)."""
    base = Path(pool.base.path)
    for m in dict.fromkeys(pool.models):
        if m is pool.base:
            continue
        diff = vocab_mismatch(base, Path(m.path))
        if diff is not None:
            i, ours, theirs = diff
            raise CompatibilityError(
                f"the tokenizer of {m.path} differs from the base's at token id {i} ({theirs!r} there, {ours!r} in "
                f"{base}); embedding rows are merged by index, so vocabularies may differ only by tokens added at "
                "new ids, unless `tokenizer_source` is given (rows are then matched by token string)"
            )


def _source_name(name: str, model: Checkpoint, base: Checkpoint) -> str:
    """The tensor of ``model`` that holds ``name``: itself, or the input embedding it is tied to."""
    if name in model:
        return name
    cfg = model.config or base.config or {}
    if OUTPUT_EMBEDDING_RE.search(name) and cfg.get("tie_word_embeddings", True):
        listed = getattr(model, "tied_candidates", model.names)()  # a slice's view lists its layers only
        tied = [n for n in listed if INPUT_EMBEDDING_RE.search(n)]
        if len(tied) == 1:
            return tied[0]
    raise CompatibilityError(f"tensor {name!r} of the base is missing in {model.path}")


def _check_models(plan: TensorPlan, pool: Pool, config: MergeConfig, overrides: dict[str, object]) -> None:
    rows = [plan.shape[0]] if plan.shape else []
    for m, src in zip(pool.models, plan.sources, strict=True):
        info = m.info(src)
        if not info.dtype.is_floating_point:
            raise CompatibilityError(
                f"tensor {src!r} in {m.path} is {str(info.dtype).removeprefix('torch.')}, "
                f"but the base's is floating ({str(plan.in_dtype).removeprefix('torch.')})"
            )
        if tuple(info.shape) == plan.shape:
            rows.append(plan.shape[0] if plan.shape else 0)
            continue
        vocab_like = (
            len(info.shape) == len(plan.shape) >= 1 and tuple(info.shape[1:]) == plan.shape[1:]
            and (EMBEDDING_RE.search(plan.name) is not None)
        )
        if not vocab_like:
            raise CompatibilityError(
                f"shape mismatch for {plan.name!r}: base {list(plan.shape)}, {m.path} {list(info.shape)}"
            )
        if config.vocab != "shared":
            raise CompatibilityError(
                f"vocabulary size mismatch in {plan.name!r}: base has {plan.shape[0]} rows, {m.path} has "
                f"{info.shape[0]}; set `vocab: shared` to merge the shared rows and take added rows from the "
                "model that has them, or `tokenizer_source` to match the rows by token"
            )
        rows.append(info.shape[0])
    shared, total = min(rows), max(rows)
    if total != shared:
        owner = -1 if plan.shape[0] == total else next(
            i for i, m in enumerate(pool.models) if m.info(plan.sources[i]).shape[0] == total
        )
        plan.extra_rows = (shared, total, owner)
        plan.shape = (total, *plan.shape[1:])
        overrides["vocab_size"] = total


def _row_chunks(plan: TensorPlan, chunkable: bool, chunk_elements: int) -> list[tuple[int, int]]:
    if plan.remapped:  # every model's rows are needed to build the default rows: one chunk
        return [(0, plan.shape[0])]
    shared_rows = plan.extra_rows[0] if plan.extra_rows else (plan.shape[0] if plan.shape else 1)
    if not plan.shape:
        return [(0, 1)]
    row = max(1, math.prod(plan.shape[1:]))
    chunkable = chunkable and plan.layout in ("out_in", "conv")
    if not chunkable or shared_rows * row <= chunk_elements:
        return [(0, shared_rows)]
    return split_rows(shared_rows, row, chunk_elements)


def split_rows(rows: int, row_numel: int, chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` covering ``rows`` rows with at most ``chunk_elements`` entries each (≥ 1 row)."""
    step = max(1, chunk_elements // max(1, row_numel))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]
