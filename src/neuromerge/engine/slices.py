"""mergekit ``slices``: the output's layers assembled from layer ranges of several models (mergekit 0.1.5's
``MergePlanner.plan_slice`` / ``plan_module``).

```yaml
merge_method: passthrough
slices:
  - sources: [{model: A, layer_range: [0, 24]}]
  - sources: [{model: B, layer_range: [8, 32]}]
```

Output slice ``s`` covers output layers ``o_s … o_s + n_s − 1`` (``o_s`` = the layers of the slices before it); its
layer ``o_s + i`` is the config's method applied to layer ``a_j + i`` of every source ``j`` (``layer_range:
[a_j, b_j]``, one length ``n_s`` per slice). Parameters resolve with mergekit's precedence: a source's own
``parameters``, then the slice's, then the config's; a gradient runs over the slice's own layers
(``t = i / (n_s − 1)``; ``t = 1`` for a one-layer slice) and tensors outside the layer stack use ``t = 0``. A slice's
``base_model`` overrides the config's for that slice (the base is the source whose ``model`` is it).

Tensors outside the layer stack: the input embeddings (and position embeddings) are merged from the *first*
slice's sources with its parameters, every other one (final norm, LM head) from the *last* slice's, as mergekit does
(including its quirk: the last slice's sources cut to as many as the first slice has).

Each slice is planned as an ordinary merge (:func:`~.plan.build_plan`) over :class:`LayerView` s of its sources,
views that show a source's layers under their output names and read them lazily from the source checkpoint, one
tensor at a time. The output's ``config.json`` is the donor's (``base_model``, else the first slice's first
source) with the new layer count, per-layer lists (:data:`PER_LAYER_KEYS`) assembled from the sources' own, and
``tie_word_embeddings`` matching the tensors written.

Global trims (TIES / NeuroMerging ``scope: global``): each slice is its own population, the embeddings joining the
first slice's and the final tensors the last slice's: the slices merge different models (or the same models'
different layers), so each has its own per-model thresholds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import (
    _LAYER_RE,
    Condition,
    MergeConfig,
    ModelEntry,
    OutputSlice,
    ParamValue,
    SliceSource,
    _field_name,
    layer_index,
    validate_method_parameters,
)
from ..errors import ConfigError
from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.lora import open_model
from ..io.tokenizer_merge import VocabularyMerge, _rules, load_tokenizer
from ..methods import MergeMethod
from .plan import (
    DEFAULT_CHUNK_ELEMENTS,
    INPUT_EMBEDDING_RE,
    OUTPUT_EMBEDDING_RE,
    VOCAB_TENSOR_RE,
    MergePlan,
    Pool,
    _plan_vocabulary,
    assemble_pool,
    build_plan,
    dtype_overrides,
    num_layers_of,
)

#: ``config.json`` keys that hold one value per layer: assembled from the sources' lists like the layers
PER_LAYER_KEYS = ("layer_types", "layers_block_type", "block_types", "no_rope_layers")
#: ``config.json`` keys that hold the number of layers (the first present is set)
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: tensors outside the layer stack merged with the first slice (input side); every other one goes with the last
PRE_RE = re.compile(INPUT_EMBEDDING_RE.pattern + r"|(wpe|embed_positions|position_embeddings)\.weight$")


# -------------------------------------------------------------------------------------------- config checks
def slice_config(config: MergeConfig, sl: OutputSlice, sources: list[SliceSource] | None = None) -> MergeConfig:
    """The ordinary merge config of one slice: its sources as the models (their own parameters), the slice's
    parameters before the config's (a filter list of the slice falls back to the config's value where no filter
    matches, as mergekit's precedence), the slice's ``base_model`` before the config's."""
    cls = config.method_class()
    params: dict[str, ParamValue] = {}
    by_field: dict[str, str] = {}
    for key, value in config.parameters.items():
        by_field[_field_name(cls.Params, key)] = key
        params[key] = value
    for key, value in sl.parameters.items():
        field = _field_name(cls.Params, key)
        if field in by_field:
            old_key = by_field.pop(field)
            value = _fallback(value, params.pop(old_key))
        by_field[field] = key
        params[key] = value
    models = [ModelEntry(model=src.model, parameters=src.parameters) for src in (sources or sl.sources)]
    sub = config.model_copy(update={"models": models, "slices": None, "parameters": params,
                                    "base_model": sl.base_model or config.base_model})
    sub._notes = []  # its own notes (a shallow copy would share the config's list)
    return sub


def _fallback(first: ParamValue, then: ParamValue) -> ParamValue:
    """``first``, falling back to ``then`` where ``first`` resolves to nothing (a filter list matching no filter,
    an empty list)."""
    conds = [first] if isinstance(first, Condition) else first
    if isinstance(conds, list) and not conds:
        return then
    if not (isinstance(conds, list) and all(isinstance(c, Condition) for c in conds)):
        return first  # a scalar or gradient always resolves
    rest = [then] if isinstance(then, Condition) else then
    if not (isinstance(rest, list) and rest and all(isinstance(c, Condition) for c in rest)):
        rest = [Condition(value=then)]  # type: ignore[arg-type]
    return [*conds, *rest]  # type: ignore[list-item]


def validate_slices(config: MergeConfig) -> None:
    """What a ``slices`` config needs from the config alone: each slice validates as an ordinary merge of its
    sources (model count, base, parameters), and the output is a full model. Layer ranges are checked against the
    models' headers by :func:`plan_slices`."""
    assert config.slices is not None
    if config.output.format != "full":
        raise ConfigError("`slices` write a full model folder; output format lora is not supported with them")
    if config.uses_data:
        raise ConfigError("`slices` are a static merge; remove `data:` / `data_split` (data-aware methods merge "
                          "whole models)")
    for i, sl in enumerate(config.slices):
        sub = slice_config(config, sl)
        try:
            validate_method_parameters(sub)
        except ConfigError as err:
            raise ConfigError(_in_slice(i, str(err))) from None
        for note in sub.notes:  # a key mergekit ignores, once per slice that gives it
            if _in_slice(i, note) not in config.notes:
                config.notes.append(_in_slice(i, note))


def _in_slice(i: int, message: str) -> str:
    """A message about a slice's derived config, in the slice's terms."""
    return f"slices[{i}]: {message}".replace("models[", "sources[").replace("under `models`", "under `sources`")


# -------------------------------------------------------------------------------------------------- views
class LayerView:
    """A checkpoint seen through a name map (output name → the checkpoint's tensor name): a slice source's layers
    under their output indices, read lazily from the source checkpoint (which counts the bytes read)."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str]):
        self.ckpt = ckpt
        self.path = ckpt.path
        self.config = ckpt.config
        self._names = names
        #: readable, not listed: the input embedding, which a tied model's LM head is (:func:`~.plan._source_name`)
        self._tied = {n: n for n in ckpt.names() if INPUT_EMBEDDING_RE.search(n)}

    def __repr__(self) -> str:
        return f"LayerView({str(self.path)!r}, {len(self._names)} tensors)"

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names

    def tied_candidates(self) -> list[str]:
        """The tensors an output head tied to the input embeddings may be read from."""
        return list(self._tied)

    def source_name(self, name: str) -> str:
        return self._names.get(name) or self._tied.get(name) or f"{name} (not in the slice's layers)"

    def info(self, name: str) -> TensorInfo:
        return self.ckpt.info(self.source_name(name))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.ckpt.read(self.source_name(name), rows)

    @property
    def total_bytes(self) -> int:
        return 0  # counted on the checkpoint

    @property
    def bytes_read(self) -> int:
        return 0  # counted on the checkpoint

    def close(self) -> None:
        """Nothing: the checkpoint is closed by the sliced plan's pool."""


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer index replaced (``model.layers.3.mlp…``, 7 → ``model.layers.7.mlp…``)."""
    m = _LAYER_RE.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1):]


def _stack_prefix(name: str) -> str | None:
    m = _LAYER_RE.search(name)
    return None if m is None else name[: m.start(1)]


@dataclass
class _Source:
    index: tuple[int, int]  # (slice, source)
    spec: SliceSource
    ckpt: Checkpoint


# ------------------------------------------------------------------------------------------------ planning
def plan_slices(config: MergeConfig, *, allow_download: bool = False,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> MergePlan:
    """Open the sources (headers only), check the layer ranges and plan every output tensor: one
    :class:`~.plan.MergePlan` per slice in ``segments`` of the returned plan, which holds all output tensors,
    the checkpoints (its pool: the donor as base) and the output config."""
    assert config.slices is not None
    cache: dict[str, Checkpoint] = {}
    try:
        return _plan(config, cache, allow_download, chunk_elements)
    except BaseException:
        for ckpt in cache.values():
            ckpt.close()
        raise


def _plan(config: MergeConfig, cache: dict[str, Checkpoint], allow_download: bool,
          chunk_elements: int) -> MergePlan:
    assert config.slices is not None

    def get(ref: str) -> Checkpoint:
        key = _key(ref)
        if key not in cache:
            ckpt = open_model(ref, None, allow_download=allow_download)
            if not isinstance(ckpt, Checkpoint) and not getattr(ckpt, "owns_base", False):  # MODEL+LORA is full
                ckpt.close()
                raise ConfigError(f"{ref} is a LoRA adapter; `slices` take full models (or MODEL+LORA)")
            cache[key] = ckpt
        return cache[key]

    sources = [[_Source((i, j), src, get(src.model)) for j, src in enumerate(sl.sources)]
               for i, sl in enumerate(config.slices)]
    donor = get(config.base_model) if config.base_model else sources[0][0].ckpt
    layers: dict[int, int] = {}
    for row in sources:
        for s in row:
            _check_source(s, layers)
        lengths = [s.spec.layer_range[1] - s.spec.layer_range[0] for s in row]
        if len(set(lengths)) > 1:
            raise ConfigError(f"slices[{row[0].index[0]}]: its sources give {lengths} layers; every source of a "
                              "slice gives the same number of layers (layer_range [start, end) with the same "
                              "end − start)")
    vocabulary, order = _vocabulary(config, donor, sources)
    cls = config.method_class()
    first, last = config.slices[0], config.slices[-1]
    post_sources = last.sources[: len(first.sources)]  # mergekit zips the last slice's models with as many weights
    separate_post = len(post_sources) != len(last.sources)
    segments: list[MergePlan] = []
    table: list[dict[str, Any]] = []
    offset = 0
    for i, (sl, row) in enumerate(zip(config.slices, sources, strict=True)):
        n = row[0].spec.layer_range[1] - row[0].spec.layer_range[0]
        ends = {"pre"} if i == 0 else set()
        if i == len(config.slices) - 1 and not separate_post:
            ends.add("post")
        views = [LayerView(s.ckpt, _names(s, offset, ends)) for s in row]
        segments.append(_segment(config, sl, i, row, views, cls, chunk_elements, n, offset, vocabulary, order))
        table.append({"slice": i, "output_layers": [offset, offset + n], "base_model": sl.base_model
                      or config.base_model, "sources": [{"model": s.spec.model, "layer_range": list(
                          s.spec.layer_range)} for s in row], "with": sorted(ends, reverse=True)})
        offset += n
    if separate_post:
        row = sources[-1][: len(post_sources)]
        views = [LayerView(s.ckpt, _names(s, 0, {"post"}, layers=False)) for s in row]
        sub = OutputSlice(sources=post_sources, base_model=last.base_model, parameters=last.parameters)
        segments.append(_segment(config, sub, len(config.slices) - 1, row, views, cls, chunk_elements, 1, 0,
                                 vocabulary, order))
        table.append({"slice": len(config.slices) - 1, "output_layers": [], "sources": [
            {"model": s.spec.model} for s in row], "with": ["post"],
            "note": "the final tensors from the last slice's first sources (as many as the first slice has)"})
    configs = {_key(s.spec.model): s.ckpt.config for row in sources for s in row}
    plan = _combine(config, donor, order, segments, table, offset, chunk_elements, configs)
    plan.pool.vocabulary = vocabulary  # the output tokenizer (run.write_output_tokenizer)
    return plan


def _vocabulary(config: MergeConfig, donor: Checkpoint, sources: list[list[_Source]]
                ) -> tuple[VocabularyMerge | None, list[Checkpoint]]:
    """The one output vocabulary of ``tokenizer_source`` / ``tokenizer:`` over every model of the config (the donor
    first: the base, else the first slice's first source, as mergekit's ``BuildTokenizer`` over its referenced
    models), and that order of the checkpoints; (None, order) without them."""
    order = list(dict.fromkeys([donor, *(s.ckpt for row in sources for s in row)]))
    if config.tokenizer_spec is None:
        return None, order
    entries = [ModelEntry(model=s.spec.model) for row in sources for s in row]
    whole = config.model_copy(update={"models": entries, "slices": None})
    pool = Pool(base=donor, models=[s.ckpt for row in sources for s in row], base_given=config.base_model is not None)
    return _plan_vocabulary(whole, pool), pool.checkpoints


def _restricted(vocabulary: VocabularyMerge, order: list[Checkpoint], config: MergeConfig, pool: Pool
                ) -> VocabularyMerge:
    """``vocabulary`` for one slice's pool: the rows of its checkpoints (views of ``order``'s) in its order, and the
    default rows of the tokens some of *them* lack decided over them, as mergekit decides them per tensor over the
    models gathered for it (``PermutedVocabulary.assign_embedding_sources``)."""
    index = {id(c): k for k, c in enumerate(order)}
    views = pool.checkpoints
    maps = vocabulary.maps[[index[id(getattr(c, "ckpt", c))] for c in views]]
    position = {id(c): k for k, c in enumerate(views)}
    named = {entry.model: position[id(m)] for entry, m in zip(config.models, pool.models, strict=True)}
    if config.base_model is not None and pool.base_given:
        named[config.base_model] = position[id(pool.base)]

    def model_index(ref: str) -> int | None:
        if ref in named:
            return named[ref]
        key = _key(ref)
        return next((k for k, c in enumerate(views) if _key(str(c.path)) == key), None)

    spec = config.tokenizer_spec
    assert spec is not None
    originals = [load_tokenizer(c.path).get_vocab() for c in views] if any(
        not isinstance(t.source, str | None) for t in (spec.tokens or {}).values()) else [{} for _ in views]
    warnings: list[str] = []
    rules = _rules(vocabulary.vocab, maps, spec.tokens or {}, originals, 0 if pool.base_given else None,
                   model_index, warnings)
    return replace(vocabulary, maps=maps, rules=rules, warnings=warnings)


def _key(ref: str) -> str:
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def _check_source(s: _Source, layers: dict[int, int]) -> int:
    """The source's number of layers, after checking its range lies in it and the model has one layer stack."""
    ckpt = s.ckpt
    if id(ckpt) not in layers:
        prefixes = {p for p in (_stack_prefix(n) for n in ckpt.names()) if p is not None}
        if len(prefixes) > 1:
            raise ConfigError(f"{s.spec.model}: `slices` need one stack of layers, it has {len(prefixes)} "
                              f"({', '.join(sorted(prefixes))}); list whole models under `models`")
        n = num_layers_of(ckpt)
        if n is None or not prefixes:
            raise ConfigError(f"{s.spec.model}: no numbered layers (`…layers.N.…`) to take a layer_range of")
        layers[id(ckpt)] = n
    n = layers[id(ckpt)]
    a, b = s.spec.layer_range
    if b > n:
        i, j = s.index
        raise ConfigError(f"slices[{i}].sources[{j}]: layer_range [{a}, {b}] is out of bounds: {s.spec.model} has "
                          f"{n} layers (0 … {n - 1}; the range's end is exclusive, at most {n})")
    return n


def _names(s: _Source, offset: int, ends: set[str], *, layers: bool = True) -> dict[str, str]:
    """Output name → source tensor name: the source's layers in its range at their output indices, and the
    tensors outside the stack on the ``ends`` asked for (``pre``: input embeddings, ``post``: the rest)."""
    a, b = s.spec.layer_range
    out: dict[str, str] = {}
    for name in s.ckpt.names():
        idx = layer_index(name)
        if idx is None:
            if ("pre" if PRE_RE.search(name) else "post") in ends:
                out[name] = name
        elif layers and a <= idx < b:
            out[with_layer(name, offset + idx - a)] = name
    return out


def _segment(config: MergeConfig, sl: OutputSlice, i: int, row: list[_Source], views: list[LayerView],
             cls: type[MergeMethod], chunk_elements: int, n: int, offset: int, vocabulary: VocabularyMerge | None,
             order: list[Checkpoint]) -> MergePlan:
    sub = slice_config(config, sl, [s.spec for s in row])
    base_ref = sub.base_model
    base_view = None
    if base_ref is not None:
        key = _key(base_ref)
        base_view = next((v for v, s in zip(views, row, strict=True) if _key(s.spec.model) == key), None)
        if base_view is None and cls.needs_base:
            raise ConfigError(f"slices[{i}]: base_model {base_ref} is not among the slice's sources; merge method "
                              f"{cls.name!r} merges the base's layers with the sources' (add it as a source)")
    if base_view is None:
        sub = sub.model_copy(update={"base_model": None})
    pairs: list[tuple[ModelEntry, Any]] = list(zip(sub.models, views, strict=True))
    try:
        pool, sub = assemble_pool(sub, base_view, pairs, [])  # type: ignore[arg-type]
        own = None
        if vocabulary is not None and any(VOCAB_TENSOR_RE.search(name) for name in pool.base.names()):
            own = _restricted(vocabulary, order, sub, pool)
        elif vocabulary is not None:  # no embedding / head here: the slice merges its layers only
            sub = sub.model_copy(update={"tokenizer_source": None, "tokenizer": None, "chat_template": None})
        plan = build_plan(sub, pool, chunk_elements=chunk_elements, num_layers=n, layer_offset=offset,
                          vocabulary=own)
    except ConfigError as err:
        raise ConfigError(f"slices[{i}]: {err}") from None
    plan.warnings = [f"slices[{i}]: {w}" for w in plan.warnings]
    return plan


def _combine(config: MergeConfig, donor: Checkpoint, ckpts: list[Any], segments: list[MergePlan],
             table: list[dict[str, Any]], num_layers: int, chunk_elements: int,
             configs: dict[str, dict[str, Any] | None]) -> MergePlan:
    tensors = [t for seg in segments for t in seg.tensors]
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise ConfigError(f"two slices write {t.name!r}")  # not reachable from a valid plan: a guard
        seen.add(t.name)
    overrides: dict[str, object] = {}
    for seg in segments:
        overrides.update(seg.config_overrides)
    overrides.update(dtype_overrides(tensors))
    overrides.update(_layer_config(config, donor, configs, num_layers, tensors))
    warnings = [*config.notes, *(w for seg in segments for w in seg.warnings)]
    if not any(isinstance((donor.config or {}).get(k), int) for k in NUM_LAYERS_KEYS):
        warnings.append(f"{donor.path}: config.json names no layer count ({' / '.join(NUM_LAYERS_KEYS)}); the "
                        f"output has {num_layers} layers: set it in the output's config.json")
    if any(sl.residual_weight is not None for sl in config.slices or []):
        warnings.append("`residual_weight` of a slice is ignored (mergekit 0.1.5 ignores it too)")
    # every checkpoint opened (the sources and the base): read, hashed into provenance.json and closed through it
    pool = Pool(base=donor, models=ckpts, base_given=config.base_model is not None)
    return MergePlan(config, segments[0].method, pool, tensors, num_layers, chunk_elements, overrides, warnings,
                     segments=segments, slice_table=table)


def _layer_config(config: MergeConfig, donor: Checkpoint, configs: dict[str, dict[str, Any] | None],
                  num_layers: int, tensors: list[Any]) -> dict[str, object]:
    """The donor config's keys that describe the layers, for the assembled stack: the layer count, per-layer lists
    (each output layer's entry from the source it comes from) and ``tie_word_embeddings``."""
    assert config.slices is not None
    cfg = donor.config or {}
    out: dict[str, object] = {}
    for key in NUM_LAYERS_KEYS:
        if isinstance(cfg.get(key), int):
            out[key] = num_layers
            break
    for key in PER_LAYER_KEYS:
        if not isinstance(cfg.get(key), list):
            continue
        values: list[object] = []
        for sl in config.slices:
            src = sl.sources[0]
            own = configs.get(_key(src.model)) or cfg
            lst = own.get(key) if isinstance(own.get(key), list) else cfg[key]
            a, b = src.layer_range
            if b > len(lst):
                raise ConfigError(f"{src.model}: config.json `{key}` has {len(lst)} entries, fewer than its layers")
            values += lst[a:b]
        out[key] = values
    names = {t.name for t in tensors}
    has_head = any(OUTPUT_EMBEDDING_RE.search(n) for n in names)
    has_embed = any(INPUT_EMBEDDING_RE.search(n) for n in names)
    tied = cfg.get("tie_word_embeddings", True)
    if has_embed and bool(tied) == has_head:  # a head written for a tied config, or none for an untied one
        out["tie_word_embeddings"] = not has_head
    return out
