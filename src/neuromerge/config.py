"""Merge configuration: mergekit-shaped YAML validated by pydantic before any tensor data is read.

```yaml
merge_method: ties
base_model: path/or/hf-id
models:
  - model: path/to/expert-a
    parameters: {weight: 1.0}
  - model: path/to/expert-b
parameters: {density: 0.2, lambda: 1.0}
exclude: ["classifier\\\\..*"]
dtype: bfloat16
overflow: error                 # a value beyond `dtype`'s range is an error; clamp: clamped to it and counted
seed: 0
output: {format: full}          # or {format: lora, rank: 16 | concat} when every model is a LoRA adapter
tokenizer_source: union         # optional: base | union | a model path; rows matched by token (io/tokenizer_merge.py)
chat_template: chatml           # optional: a name, auto, or a Jinja template (io/chat_templates.py)
```

``tokenizer_source`` may instead be a ``tokenizer: {source, tokens: {TOKEN: {source, force}}, pad_to_multiple_of}``
block (mergekit 0.1.5's ``TokenizerConfig``; not both).

Data-aware methods (``fisher``, ``regmean``, ``adamerging``, ``adamerging++``) also need task data: ``data:`` names
a task file (or is a mapping ``{tasks: FILE, seq_len, batch_size, train_examples, val_examples, probe_steps,
probe_l2}``), each model names its ``task:`` in it, and ``data_split`` optionally overrides the split the method
reads (docs/data_aware.md). They run through :func:`neuromerge.data_aware.merge.merge_with_data`; a static method
with ``data:`` is refused, as a data-aware method without it.

A parameter value is a scalar, a *gradient* (a list of numbers interpolated over layer depth, as mergekit:
``t = layer / (num_layers − 1)``, tensors outside the layer stack use ``t = 0``), or a list of
``{filter: regex, value: …}`` conditions (first match wins; ``filter`` absent or ``"*"`` matches every tensor;
mergekit treats ``filter`` as a substring, which a regex search reproduces for plain names).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods import MergeMethod, MethodParams
from .methods import get as get_method

Scalar = float | int | bool | str
DEFAULT_EXCLUDE = (
    r"(^|\.)(classifier|score|qa_outputs|pooler\.dense)\.",
    r"(^|\.)heads?\.",
)
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
#: mergekit method parameters that are performance hints only
IGNORED_MERGEKIT_PARAMS = ("int8_mask",)


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]

    @field_validator("filter")
    @classmethod
    def _valid_regex(cls, v: str | None) -> str | None:
        if v is not None and v != "*":
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"filter {v!r} is not a valid regular expression: {err}") from err
        return v


ParamValue = Scalar | list[Scalar] | list[Condition] | Condition


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    #: data-aware merges: the task of the ``data:`` task file this model is the expert of
    task: str | None = None


class SliceSource(BaseModel):
    """One input of an output slice (mergekit's ``InputSliceDefinition``): layers ``[start, end)`` of ``model``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} is not [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    """One run of output layers (mergekit's ``OutputSliceDefinition``): its sources' layer ranges merged layer by
    layer with the config's method; ``base_model`` and ``parameters`` override the config's for this slice.
    ``residual_weight`` is accepted and ignored, as mergekit 0.1.5 does (a warning). The engine's side is
    :mod:`neuromerge.engine.slices`."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    residual_weight: float | None = None


#: the keys a ``data:`` mapping may hold besides ``tasks`` (the data budget of
#: :class:`neuromerge.tasks.hf.UserModelConfig`, validated there)
DATA_KEYS = ("seq_len", "batch_size", "train_examples", "val_examples", "probe_steps", "probe_l2")


class LayoutRule(BaseModel):
    """Storage layout of the 2-D tensors whose name matches ``filter``: ``out_in`` (nn.Linear, the default) or
    ``in_out`` (GPT-2's Conv1D)."""

    model_config = ConfigDict(extra="forbid")
    filter: str
    layout: Literal["out_in", "in_out"]


#: methods whose merged task vector is a linear combination ``Σ_t c_t τ_t`` (exact as concatenated LoRA factors)
LINEAR_DELTA_METHODS = ("task_arithmetic", "linear")


class OutputConfig(BaseModel):
    """What the merge writes: ``full`` (a Hugging Face model folder) or ``lora`` (a PEFT LoRA adapter over the
    base; every model must then be a LoRA adapter). ``rank``: the adapter's rank, an integer ≥ 1 (truncated SVD of
    each module's merged ``ΔW``) or ``concat`` (exact concatenation of the inputs' factors; Task Arithmetic and
    linear only)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["full", "lora"] = "full"
    rank: int | Literal["concat"] | None = None
    #: copy the base's tokenizer / processor files next to the weights (mergekit's ``--copy-tokenizer``)
    copy_tokenizer: bool = True
    #: at most this many *parameters* per shard (mergekit's ``--out-shard-size`` unit); overrides ``shard_size``
    #: (bytes = parameters × the largest element size written)
    shard_params: int | None = Field(None, ge=1)

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and (isinstance(v, bool) or v < 1):
            raise ValueError(f"rank must be an integer >= 1 or 'concat', got {v!r}")
        return v

    @model_validator(mode="after")
    def _rank_needs_lora(self) -> OutputConfig:
        if self.format == "lora" and self.rank is None:
            raise ValueError("format lora needs a rank: an integer >= 1, or concat (task_arithmetic / linear)")
        if self.format == "full" and self.rank is not None:
            raise ValueError("rank applies to format lora only")
        return self


class ModelTokenSource(BaseModel):
    """A token's embedding row taken from one model's row: ``token_id`` (a row index of that model) or ``token``
    (looked up in that model's tokenizer); exactly one (mergekit's ``ModelTokenEmbedding``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of token_id or token")
        return self


class ZeroSource(BaseModel):
    """A token whose embedding row is zero (mergekit's ``ZeroEmbedding``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSpec(BaseModel):
    """Where one output token's embedding rows come from (mergekit's ``TokenEmbeddingConfig``): ``source`` a
    model (its row of that token), a ``model_token`` or ``zero``; ``force`` uses it for every model, even those that
    have the token (else only for models lacking it)."""

    model_config = ConfigDict(extra="forbid")
    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary ``source`` (``union``, ``base`` or a model path),
    ``tokens`` added or re-sourced, and ``pad_to_multiple_of`` (embedding rows padded with the mean row)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(BaseModel):
    """A whole merge: the pool (base + models), the method and its parameters, and output options."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    #: mergekit ``slices``: the output's layers assembled from layer ranges (instead of ``models``)
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    dtype: str | None = None
    seed: int = 0
    layout: list[LayoutRule] = Field(default_factory=list)
    vocab: Literal["error", "shared"] = "error"
    allow_nonfinite: bool = False
    #: a finite value that the output dtype cannot hold (70000 in float16): an error, or clamped to the dtype's range
    overflow: Literal["error", "clamp"] = "error"
    shard_size: str | int = "5GB"
    output: OutputConfig = Field(default_factory=OutputConfig)
    #: data-aware merges: the task file (a path, or a mapping with ``tasks`` and the data budget, :data:`DATA_KEYS`)
    data: str | dict[str, Any] | None = None
    #: data-aware merges: the split the method reads instead of its own (train: Fisher / RegMean, test: AdaMerging)
    data_split: Literal["train", "val", "test"] | None = None
    #: one-line notes found while validating (a key mergekit accepts for this method and ignores, such as ``weight``
    #: on ``slerp``): the plan shows them as warnings
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    #: mergekit's output vocabulary (``union``, ``base`` or a model path): embedding rows matched by token string
    tokenizer_source: str | None = None
    #: mergekit's ``tokenizer:`` block (``tokenizer_source`` with ``tokens`` and ``pad_to_multiple_of``)
    tokenizer: TokenizerSpec | None = None
    #: the output tokenizer's chat template: a name (chatml, llama3, mistral, alpaca, exaone), ``auto`` or Jinja
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source` or a `tokenizer:` block, not both")
        return self

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output-vocabulary request: ``tokenizer:``, or ``tokenizer_source`` as a block; None without them."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSpec(source=self.tokenizer_source)

    @field_validator("data")
    @classmethod
    def _data(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, dict):
            if not isinstance(v.get("tasks"), str):
                raise ValueError("a `data:` mapping needs `tasks: FILE` (the task file)")
            unknown = sorted(set(v) - {"tasks", *DATA_KEYS})
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: tasks, {', '.join(DATA_KEYS)}")
        return v

    @property
    def data_file(self) -> str | None:
        """The task file of a data-aware merge (None without ``data:``)."""
        return self.data if isinstance(self.data, str) or self.data is None else str(self.data["tasks"])

    @property
    def data_budget(self) -> dict[str, Any]:
        """The data-budget keys of a ``data:`` mapping (empty for a plain path)."""
        return {k: v for k, v in self.data.items() if k != "tasks"} if isinstance(self.data, dict) else {}

    @property
    def uses_data(self) -> bool:
        """Whether the config asks for task data (``data:``, ``data_split`` or a model's ``task:``)."""
        return self.data is not None or self.data_split is not None or any(m.task for m in self.models)

    @model_validator(mode="before")
    @classmethod
    def _mergekit_aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "out_dtype" in data and "dtype" not in data:
            data = {**data, "dtype": data["out_dtype"]}
            data.pop("out_dtype")
        if isinstance(data, dict) and data.get("slices") is None:
            data = {k: v for k, v in data.items() if k != "slices"}
        return data

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if self.slices is not None and self.models:
            raise ConfigError("invalid config: give either `models` (whole models) or `slices` (layer ranges), "
                              "not both")
        if self.slices is None and not self.models:
            raise ConfigError("invalid config: models: give at least one model under `models` (or layer ranges "
                              "under `slices`)")
        if self.slices is not None and not self.slices:
            raise ConfigError("invalid config: slices: give at least one slice")
        return self

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {sorted(DTYPES)}")
        return DTYPES[v]

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: str | int) -> str | int:
        parse_size(v)  # a ConfigError naming the value, before any weight is read (and by --dry-run)
        return v

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from err
        return v

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def method_class(self) -> type[MergeMethod]:
        return get_method(self.merge_method)


def parse_size(size: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"500MiB"`` → 500·2²⁰; integers are bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"shard_size {size!r} is not a size such as 5GB or 500MiB")
    unit = (m.group(2) or "B").upper()
    base = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * base)


def load_config(source: str | Path | dict[str, Any] | MergeConfig) -> MergeConfig:
    """Parse and validate a config (YAML path, dict or MergeConfig), including the method's parameters."""
    if isinstance(source, MergeConfig):
        config = source
    else:
        if isinstance(source, str | Path):
            from .textfile import existing_file, read_text

            path = existing_file(source, "config file")

            try:
                data = yaml.safe_load(read_text(path, "config file"))  # non-UTF-8: one line, byte offset
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from err
            base_dir = path.parent
        else:
            data, base_dir = source, None
        if not isinstance(data, dict):
            raise ConfigError("the config must be a mapping with merge_method, base_model and models")
        data, notes = mergekit_spellings(data)
        try:
            config = MergeConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_one_line(err)) from None
        config.notes.extend(notes)
        if base_dir is not None:
            config = _relative_to(config, base_dir)
    if config.slices is not None:
        from .engine.slices import validate_slices

        validate_slices(config)
    else:
        validate_method_parameters(config)
    validate_output(config)
    return config


def mergekit_spellings(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What mergekit configs in the wild write that mergekit 0.1.5 accepts, in our spelling, with a note each:

    * ``parameters:`` left empty (YAML null), top level or per model → ``{}`` (no note);
    * ``pattern:`` in a parameter condition (older mergekit examples, e.g. ``gradient-slerp.yml``) → ``filter:``.
      mergekit 0.1.5 ignores the unknown key, so there the condition matches *every* tensor; here it filters as
      its author meant — the outputs differ, and the note says so (docs/peers.md)."""
    notes: list[str] = []

    def params(value: Any, where: str) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value
        out = {}
        for key, setting in value.items():
            conditions = setting if isinstance(setting, list) else [setting]
            if any(isinstance(c, dict) and "pattern" in c and "filter" not in c for c in conditions):
                fixed = [{("filter" if k == "pattern" else k): v for k, v in c.items()} if isinstance(c, dict) else c
                         for c in conditions]
                setting = fixed if isinstance(setting, list) else fixed[0]
                notes.append(f"{where}.{key}: `pattern:` read as `filter:` (mergekit 0.1.5 ignores `pattern`, so "
                             "its condition matches every tensor there; the outputs differ)")
            out[key] = setting
        return out

    data = dict(data)
    if "parameters" in data:
        data["parameters"] = params(data["parameters"], "parameters")
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**m, "parameters": params(m["parameters"], f"models[{i}].parameters")}
            if isinstance(m, dict) and "parameters" in m else m
            for i, m in enumerate(data["models"])
        ]
    return data, notes


def _relative_to(config: MergeConfig, base_dir: Path) -> MergeConfig:
    """Model paths written relative to the config file resolve against its folder (:mod:`neuromerge.paths`)."""
    from .paths import resolve_str

    def fix(p: str | None) -> str | None:
        return None if p is None else resolve_str(p, base_dir)

    def fix_model(p: str) -> str:
        """A ``MODEL+LORA`` reference (mergekit's) resolves each part; a path that exists as written stays whole."""
        whole = resolve_str(p, base_dir)
        parts = p.split("+")
        if len(parts) != 2 or Path(whole).expanduser().exists():
            return whole
        return f"{resolve_str(parts[0], base_dir)}+{resolve_str(parts[1], base_dir)}"

    models = [m.model_copy(update={"model": fix_model(m.model)}) for m in config.models]
    slices = None if config.slices is None else [
        s.model_copy(update={"base_model": fix(s.base_model),
                             "sources": [src.model_copy(update={"model": fix_model(src.model)}) for src in s.sources]})
        for s in config.slices
    ]
    data = config.data
    if isinstance(data, str):
        data = fix(data)
    elif isinstance(data, dict):
        data = {**data, "tasks": fix(str(data["tasks"]))}
    update: dict[str, Any] = {"base_model": fix(config.base_model), "models": models, "slices": slices,
                              "data": data}
    if config.tokenizer_source not in (None, "union", "base"):
        update["tokenizer_source"] = fix(config.tokenizer_source)
    if config.tokenizer is not None:
        update["tokenizer"] = _tokenizer_relative_to(config.tokenizer, fix)
    return config.model_copy(update=update)


def _tokenizer_relative_to(spec: TokenizerSpec, fix: Any) -> TokenizerSpec:
    """``spec`` with its model paths (the source, the tokens' source models) resolved like the models' paths."""
    tokens = None
    if spec.tokens is not None:
        tokens = {}
        for tok, t in spec.tokens.items():
            src = t.source
            if isinstance(src, str):
                src = fix(src)
            elif isinstance(src, ModelTokenSource):
                src = src.model_copy(update={"model": fix(src.model)})
            tokens[tok] = t.model_copy(update={"source": src})
    source = spec.source if spec.source in ("union", "base") else fix(spec.source)
    return spec.model_copy(update={"source": source, "tokens": tokens})


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def _candidates(value: Any) -> list[Scalar]:
    """Every scalar a parameter setting can take (gradient endpoints interpolate between them)."""
    if isinstance(value, Condition):
        value = [value]
    if isinstance(value, list):
        out: list[Scalar] = []
        for v in value:
            out.extend(_candidates(v.value) if isinstance(v, Condition) else [v])
        return out
    return [value]


def _clean(params: dict[str, ParamValue], cls: type[MergeMethod] | None = None) -> dict[str, ParamValue]:
    """``params`` without mergekit's performance hints and the keys the method ignores (``cls.ignored_params``)."""
    ignored = cls.ignored_params if cls is not None else frozenset()
    return {k: v for k, v in params.items() if k not in IGNORED_MERGEKIT_PARAMS and k not in ignored}


def with_output(config: MergeConfig, output_format: str | None = None, rank: int | str | None = None
                ) -> MergeConfig:
    """``config`` with its ``output`` overridden (the CLI's ``--output-format`` / ``--rank``), validated again.

    ``rank`` alone implies ``format: lora``; ``format: full`` drops a rank set in the config."""
    if output_format is None and rank is None:
        return config
    current = config.output.model_dump()
    fmt = output_format or ("lora" if rank is not None else current["format"])
    data = {"format": fmt, "rank": rank if rank is not None else (current["rank"] if fmt == "lora" else None)}
    try:
        output = OutputConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err).replace("invalid config: ", "invalid config: output.")) from None
    updated = config.model_copy(update={"output": output})
    validate_output(updated)
    return updated


def validate_output(config: MergeConfig) -> None:
    """What a LoRA output needs from the config alone (the pool is checked from its headers by the engine)."""
    out = config.output
    if config.chat_template is not None:
        from .io.chat_templates import check_chat_template

        check_chat_template(config.chat_template)
    if config.data is not None and (config.tokenizer_spec is not None or config.chat_template is not None):
        raise ConfigError("a data-aware merge keeps the base's vocabulary: `tokenizer_source`, `tokenizer:` and "
                          "`chat_template` are not supported with `data:`")
    if out.format != "lora":
        return
    if config.tokenizer_spec is not None:
        raise ConfigError("output format lora keeps the base's vocabulary: `tokenizer_source` / `tokenizer:` need "
                          "output format full")
    if config.data is not None:
        raise ConfigError("a data-aware merge writes a full model folder; output format lora is not supported "
                          "with `data:`")
    if config.base_model is None:
        raise ConfigError("output format lora needs `base_model`: the model the LoRA adapters were trained on")
    name = config.method_class().name
    if out.rank == "concat" and name not in LINEAR_DELTA_METHODS:
        raise ConfigError(
            f"rank concat is exact only for methods that add up task vectors ({', '.join(LINEAR_DELTA_METHODS)}); "
            f"{name!r} is not linear in them: give an integer rank (truncated SVD of the merged ΔW)"
        )


def validate_method_parameters(config: MergeConfig) -> None:
    """Check the method exists, the number of models fits, and every value a parameter can take (each
    gradient endpoint, each filter's value) validates against the method's parameter model."""
    cls = config.method_class()
    if getattr(cls, "data_aware", False):
        validate_data_config(config, cls)
    elif config.uses_data:
        what = [k for k, on in (("`data:`", config.data is not None), ("`data_split`", config.data_split is not None),
                                ("the models' `task:`", any(m.task for m in config.models))) if on]
        raise ConfigError(
            f"merge method {cls.name!r} is a static merge and reads no task data; remove {' and '.join(what)} "
            "(the methods that read task data: fisher, regmean, adamerging, adamerging++)"
        )
    n = len(config.models)
    besides = ""
    if config.base_model is not None and not cls.averages_weights and not cls.interpolates_base:
        # a base listed under `models` is dropped from the experts (its task vector is zero): it does not count
        listed = sum(1 for m in config.models if m.model == config.base_model)
        n, besides = n - listed, " besides the base" if listed else ""
    if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
        want = str(cls.min_models) if cls.max_models == cls.min_models else f"at least {cls.min_models}"
        if cls.max_models is not None and cls.max_models != cls.min_models:
            want += f" and at most {cls.max_models}"
        raise ConfigError(f"merge method {cls.name!r} needs {want} models{besides} under `models`, got {n}")
    if config.base_model is None and cls.needs_base:
        raise ConfigError(f"merge method {cls.name!r} needs a `base_model`")
    scopes = [("parameters", config.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models)
    ]
    for where, params in scopes:
        for key in params:
            if key in cls.ignored_params:
                note = (f"{where}.{key}: merge method {cls.name!r} does not use {key!r}; ignored (as mergekit "
                        "does), remove it to silence this warning")
                if note not in config.notes:
                    config.notes.append(note)
        canonical: dict[str, str] = {}
        for key, value in _clean(params, cls).items():
            for candidate in _candidates(value):
                _validate_one(cls, where, key, candidate)
            field = _field_name(cls.Params, key)
            if field in canonical:
                raise ConfigError(f"{where}: {key!r} and {canonical[field]!r} name the same parameter; give it once")
            canonical[field] = key
            if where != "parameters" and field not in cls.per_model_params:
                per_model = ", ".join(sorted(cls.per_model_params))
                raise ConfigError(
                    f"{where}.{key}: {key!r} is a global parameter of merge method {cls.name!r} (one value for the "
                    f"whole merge, a per-model value would be ignored); set it under `parameters` "
                    f"(per-model parameters: {per_model})"
                )


def validate_data_config(config: MergeConfig, cls: type[MergeMethod]) -> None:
    """What a data-aware merge needs from the config alone (the files are checked by
    :func:`neuromerge.data_aware.merge.prepare_data_merge`): ``data:`` (else the method's refusal), a method that
    writes a model folder, ``base_model``, a ``task:`` per model, each task once, one value per parameter."""
    if config.data is None:
        raise ConfigError(cls.refusal())
    if not getattr(cls, "merges_to_folder", True):
        raise ConfigError(cls.refusal())
    if config.base_model is None:
        raise ConfigError(f"merge method {cls.name!r} with `data:` needs a `base_model`: the Hugging Face model folder "
                          "the experts were fine-tuned from (its tokenizer reads the task data)")
    seen: dict[str, int] = {}
    for i, m in enumerate(config.models):
        if not m.task:
            raise ConfigError(f"models[{i}] ({m.model}): a data-aware merge needs the model's `task:` (its task in "
                              "the data file)")
        if m.task in seen:
            raise ConfigError(f"models[{i}].task: task {m.task!r} is already the task of models[{seen[m.task]}]; "
                              "one expert per task")
        seen[m.task] = i
    for key, value in config.parameters.items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"parameters.{key}: a data-aware method takes one value per parameter (no gradient, "
                              "no filters)")


def _validate_one(cls: type[MergeMethod], where: str, key: str, value: Scalar) -> None:
    fields = _field_names(cls.Params)
    if key not in fields:
        raise ConfigError(
            f"{where}: unknown parameter {key!r} for merge method {cls.name!r}; "
            f"known: {', '.join(sorted(fields))}"
        )
    try:
        cls.Params.model_validate({key: value})
    except ValidationError as err:
        msg = "; ".join(e["msg"] for e in err.errors())
        raise ConfigError(f"{where}.{key} = {value!r}: {msg}") from None


def _field_name(params_cls: type[MethodParams], key: str) -> str:
    """The field a parameter name means: itself, or the field it is the alias of (``lambda`` → ``lam``)."""
    for name, info in params_cls.model_fields.items():
        if key in (name, info.alias):
            return name
    return key


@cache
def _field_names(params_cls: type[MethodParams]) -> frozenset[str]:
    """Every name a parameter may be given by: field names and their aliases (``lambda`` for ``lam``)."""
    names = set()
    for name, info in params_cls.model_fields.items():
        names.add(info.alias or name)
        names.add(name)
    return frozenset(names)


# --------------------------------------------------------------------------------------------- resolution
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Index of the transformer block a tensor belongs to (``model.layers.3.mlp…`` → 3), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def evaluate(value: ParamValue, name: str, t: float) -> Scalar | None:
    """Resolve one setting for tensor ``name`` at depth ``t`` (mergekit's ``evaluate_setting``)."""
    if isinstance(value, Condition):
        value = [value]
    if isinstance(value, bool | int | float | str):
        return value
    if not value:
        return None
    if all(isinstance(v, bool | int | float | str) for v in value):
        values: Sequence[Scalar] = value  # type: ignore[assignment]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(values[i0]) + frac * float(values[i1])  # type: ignore[arg-type]
    for cond in value:
        assert isinstance(cond, Condition)
        if cond.filter is None or cond.filter == "*" or re.search(cond.filter, name):
            return evaluate(cond.value, name, t)
    return None


class ParamResolver:
    """Resolves the method parameters of every tensor: globals → ``params``, per-model overrides → ``per_model``."""

    def __init__(self, config: MergeConfig, num_layers: int | None, layer_offset: int = 0):
        self.config = config
        self.cls = config.method_class()
        self.num_layers = num_layers
        #: a slice's first output layer: its layers are at depth ``(layer − offset) / (num_layers − 1)``
        self.layer_offset = layer_offset
        self._cache: dict[str, tuple[MethodParams, list[MethodParams]]] = {}

    def depth(self, name: str) -> float:
        idx = layer_index(name)
        if idx is None or not self.num_layers:
            return 0.0
        idx -= self.layer_offset
        return idx / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def _resolve(self, params: dict[str, ParamValue], name: str, t: float) -> dict[str, Any]:
        out = {}
        for key, value in _clean(params, self.cls).items():
            v = evaluate(value, name, t)
            if v is not None:  # by field name: a per-model ``lam`` overrides a global ``lambda``
                out[_field_name(self.cls.Params, key)] = v
        return out

    def resolve(self, name: str) -> tuple[MethodParams, list[MethodParams]]:
        t = self.depth(name)
        global_values = self._resolve(self.config.parameters, name, t)
        model_values = [self._resolve(m.parameters, name, t) for m in self.config.models]
        key = repr((sorted(global_values.items()), [sorted(v.items()) for v in model_values]))
        cached = self._cache.get(key)
        if cached is None:
            params = self.cls.Params.model_validate(global_values)
            per_model = [self.cls.Params.model_validate({**global_values, **v}) for v in model_values]
            cached = self._cache[key] = (params, per_model)
        return cached
