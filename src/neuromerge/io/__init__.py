"""Checkpoint I/O: lazy readers (:mod:`.checkpoint`), planned sharded writer and atomic output
(:mod:`.writer`), refusals of outputs that would replace an input or cannot be written (:mod:`.output_guard`),
the safetensors container (:mod:`.safetensors_format`) and HF-id resolution (:mod:`.hub`).
"""

from __future__ import annotations

from neuromerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from neuromerge.io.hub import resolve_hf_id
from neuromerge.io.output_guard import check_output, check_writable
from neuromerge.io.writer import (
    AtomicOutput,
    PlannedTensor,
    ShardedWriter,
    clean_stale_outputs,
    copy_model_files,
    install_signal_cleanup,
)

__all__ = [
    "AtomicOutput",
    "Checkpoint",
    "PlannedTensor",
    "ShardedWriter",
    "TensorInfo",
    "check_output",
    "check_writable",
    "clean_stale_outputs",
    "copy_model_files",
    "install_signal_cleanup",
    "open_checkpoint",
    "resolve_hf_id",
]
