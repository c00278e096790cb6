"""Checkpoint I/O: lazy readers (:mod:`.checkpoint`), planned sharded writer and atomic output
(:mod:`.writer`), the safetensors container (:mod:`.safetensors_format`) and HF-id resolution (:mod:`.hub`).
"""

from __future__ import annotations

from neuromerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from neuromerge.io.hub import resolve_hf_id
from neuromerge.io.writer import (
    AtomicOutput,
    PlannedTensor,
    ShardedWriter,
    copy_model_files,
    install_signal_cleanup,
    remove_stale_temp_dirs,
)

__all__ = [
    "AtomicOutput",
    "Checkpoint",
    "PlannedTensor",
    "ShardedWriter",
    "TensorInfo",
    "copy_model_files",
    "install_signal_cleanup",
    "open_checkpoint",
    "remove_stale_temp_dirs",
    "resolve_hf_id",
]
