"""The safetensors container, read and written by hand (no mmap, no ``safe_open``).

Layout (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian ``u64`` header length
``N``, then ``N`` bytes of UTF-8 JSON, then the byte buffer. The JSON maps each tensor name to ``{"dtype":
"F32", "shape": [...], "data_offsets": [begin, end]}`` (offsets relative to the start of the byte buffer, i.e.
to ``8 + N``) and may hold a ``"__metadata__"`` string-to-string map. The buffer is fully indexed (no holes,
no overlaps) and ``end - begin == prod(shape) · itemsize``. The reference writer pads the header with spaces
so that the buffer starts 8-byte aligned and orders tensors by decreasing alignment, then by name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from neuromerge.errors import CheckpointError

#: header length sanity bound (the reference implementation refuses headers above 100 MB as well)
MAX_HEADER_BYTES = 100_000_000
GGUF_MAGIC = b"GGUF"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in _DTYPES.items()}

#: dtypes that only quantized checkpoints use for weights (sub-byte formats are listed by name only)
FP8_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
        torch.float8_e8m0fnu,
    }
)
_SUBBYTE_NAMES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})


def dtype_from_str(code: str) -> torch.dtype:
    """torch dtype of a safetensors dtype code (``"BF16"`` → ``torch.bfloat16``); ``KeyError`` if unknown."""
    return _DTYPES[code]


def dtype_to_str(dtype: torch.dtype) -> str:
    """safetensors dtype string of a torch dtype; ``ValueError`` if safetensors cannot store it."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """``prod(shape) · itemsize``."""
    return math.prod(shape) * itemsize(dtype)


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: entries in data order, the raw header bytes and the file size."""

    path: Path
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    raw: bytes
    file_size: int


def truncated_error(path: Path, expected: int, found: int) -> CheckpointError:
    """The one-line refusal for a file shorter than its header says."""
    return CheckpointError(
        f"truncated or corrupt safetensors file {path}: expected at least {expected} bytes, found {found}; "
        "re-download or re-export it"
    )


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"corrupt safetensors file {path}: {why}; re-download or re-export it")


def quantized_error(path: Path, what: str) -> CheckpointError:
    """The one-line refusal for quantized checkpoints; ``what`` names the evidence (method, tensor...)."""
    return CheckpointError(
        f"quantized ({what}) checkpoints cannot be merged: {path}; de-quantize first "
        "(e.g. transformers `model.dequantize()` then `save_pretrained`)"
    )


def gguf_error(path: Path) -> CheckpointError:
    """The one-line refusal for GGUF files, saying how to convert them."""
    return CheckpointError(
        f"{path} is a GGUF file; GGUF checkpoints are quantized containers and cannot be merged; "
        "convert with transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., "
        "dtype=torch.float32).save_pretrained(out)"
    )


def read_header(path: Path, fd: int | None = None) -> Header:
    """Read and validate the header of ``path`` (reads ``8 + N`` bytes only, never tensor data).

    Checks: the length prefix is below the file size and 100 MB; the JSON parses to an object; every tensor
    has a known dtype, a non-negative integer shape and ``end - begin == prod(shape)·itemsize``; the buffer
    has no overlaps; and the file holds at least ``8 + N + max(end)`` bytes (else it is truncated).
    """
    own = fd is None
    if own:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if prefix[:4] == GGUF_MAGIC:
            raise gguf_error(path)
        if len(prefix) < 8:
            raise truncated_error(path, 8, size)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise truncated_error(path, 8 + n, size)
        raw = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes (see :func:`read_header`)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")
    base = 8 + len(raw)
    entries = [_parse_entry(path, name, spec, base) for name, spec in doc.items()]
    entries.sort(key=lambda e: (e.begin, e.end))  # stable: header order among zero-size tensors
    _check_layout(path, entries, base, file_size)
    return Header(path, {e.name: e for e in entries}, {str(k): str(v) for k, v in metadata.items()}, raw, file_size)


def _parse_entry(path: Path, name: str, spec: object, base: int) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise _corrupt(path, f"entry for tensor {name!r} is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if code in _SUBBYTE_NAMES:
        raise quantized_error(path, f"{code} tensor {name!r}")
    if code not in _DTYPES:
        raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {code!r}; convert it to F32/F16/BF16")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    dtype = _DTYPES[code]
    if not 0 <= begin <= end or end - begin != tensor_nbytes(shape, dtype):
        need = tensor_nbytes(shape, dtype)
        raise _corrupt(path, f"tensor {name!r} spans bytes [{begin}, {end}) but {code}{shape} needs {need}")
    return HeaderEntry(name, dtype, tuple(shape), base + begin, base + end)


def _check_layout(path: Path, entries: list[HeaderEntry], base: int, file_size: int) -> None:
    prev_end, prev_name = base, None
    for e in entries:
        if e.begin < prev_end:
            raise _corrupt(path, f"tensors {prev_name!r} and {e.name!r} overlap")
        if e.end > e.begin:
            prev_end, prev_name = e.end, e.name
    if file_size < prev_end:
        raise truncated_error(path, prev_end, file_size)


def build_header(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str]
) -> bytes:
    """Header bytes (length prefix included) for ``(name, dtype, shape, begin, end)`` with buffer-relative
    offsets.

    The JSON is padded with spaces so that the byte buffer starts at a multiple of 8, as the reference writer
    does.
    """
    doc: dict[str, object] = {"__metadata__": dict(metadata)}
    for name, dtype, shape, begin, end in entries:
        doc[name] = {"dtype": dtype_to_str(dtype), "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
