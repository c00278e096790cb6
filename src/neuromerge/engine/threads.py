"""Threads of the engine: torch single-threaded inside every worker, so results never depend on the core count."""

from __future__ import annotations

import torch


def one_torch_thread() -> None:
    """Initializer of the engine's worker threads: torch (OpenMP, MKL) runs single-threaded *in this thread*.

    OpenMP's thread count is per thread: ``torch.set_num_threads(1)`` in the main thread does not reach the pool's
    workers, whose LAPACK calls (TSV's SVD, NeuroMerging's eigh) would otherwise use every core and reduce in an
    order that depends on the machine's core count. With it, a merge is bitwise identical on any machine."""
    torch.set_num_threads(1)
