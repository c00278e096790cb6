"""Errors neuromerge raises on bad input: one clear line each, caught by the CLI (exit code 2)."""

from __future__ import annotations


class NeuromergeError(Exception):
    """Base class: the message is a single line meant for the user."""


class ConfigError(NeuromergeError):
    """The YAML / Python config is invalid (unknown method or parameter, out-of-range value, ...)."""


class CheckpointError(NeuromergeError):
    """An input checkpoint cannot be read as given (missing, truncated, quantized, GGUF, unsafe pickle...)."""


class CompatibilityError(NeuromergeError):
    """The models of a pool cannot be merged together (missing tensor, shape or dtype mismatch, vocab...)."""


class NonFiniteError(NeuromergeError):
    """An input tensor holds NaN or Inf values (allowed only with `allow_nonfinite: true`)."""


class OutputExistsError(NeuromergeError):
    """The output folder exists and `--force` was not given."""


class OutputConflictError(NeuromergeError):
    """The output would replace an input: it is an input, or a folder holding one (a model, an adapter, the config,
    the files behind their symlinks). Refused before anything is read or written."""


class OutputWriteError(NeuromergeError):
    """The output cannot be written: its parent is not a folder, the file system refuses it, or the disk is full.

    ``reason`` is the cause alone (e.g. ``No space left on device``), so that a writer can name the final folder
    rather than its temporary one."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class NotApplicable(NeuromergeError):
    """A method cannot do anything meaningful with these models (e.g. WEMoE when no expert changes an MLP weight);
    the bench reports its row as not applicable and goes on."""


class DtypeOverflowError(NeuromergeError):
    """A value does not fit the output dtype (e.g. 70000 in float16); `overflow: clamp` clamps such values instead."""


class TaskError(ConfigError):
    """Bad models-plus-task-data input (layer 2, :mod:`neuromerge.tasks`): a task file, a task's data, a model
    folder or an expert that a pipeline cannot use, a contract object without a hook a pipeline needs. The bench's
    ``BenchError`` is a subclass."""


def validation_lines(err: object, prefix: str = "") -> list[str]:
    """One line per problem of a pydantic ``ValidationError`` (duck-typed: anything with ``errors()``):
    ``"{prefix}{field}: {message}"`` (an unknown key: ``"unknown key"``; a missing one: ``"missing (required)"``)."""
    lines = []
    for e in err.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(x) for x in e["loc"])
        msg = {"extra_forbidden": "unknown key", "missing": "missing (required)"}.get(e["type"], e["msg"])
        msg = msg.removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        head = prefix.rstrip(": .")
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{head}: {msg}" if head else msg)
    return lines
