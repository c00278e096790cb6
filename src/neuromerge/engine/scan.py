"""The data pass of ``merge --dry-run``: read every merged tensor of every model once and check it is finite.

The headers tell everything about names, shapes and dtypes, but a NaN/Inf in an input — refused by the merge —
is only seen in the data. The scan reads exactly what the merge reads (the merged tensors, chunk by chunk, through
:func:`~neuromerge.engine.reading.read_all`, so the message is the merge's own) and computes nothing else: the
dry run then refuses what the run refuses, except faults of the computation or the write (an output value
beyond the output dtype, a method that overflows, a full disk). Memory is bounded by one chunk of every model per
worker, as in the merge. ``--headers-only`` skips it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .plan import MergePlan
from .reading import chunk_rows, read_all
from .threads import one_torch_thread


def scan_inputs(plan: MergePlan, *, threads: int = 1, progress: Any = None) -> int:
    """Read every chunk of every merged tensor of the pool and raise the merge's
    :class:`~neuromerge.errors.NonFiniteError` on the first NaN/Inf (in the plan's fixed order of chunks); return
    the number of entries checked per model. Nothing is read when the config sets ``allow_nonfinite: true``."""
    if plan.config.allow_nonfinite:
        return 0
    jobs = [(part, tp, chunk) for part in plan.parts() for tp in part.merged for chunk in tp.chunks]
    cpu = torch.device("cpu")

    def check(job: tuple[MergePlan, Any, tuple[int, int]]) -> int:
        part, tp, chunk = job
        base, _ = read_all(part.pool, tp, chunk_rows(tp, chunk), allow_nonfinite=False, device=cpu)
        return int(base.numel())

    with ThreadPoolExecutor(max_workers=max(1, threads), initializer=one_torch_thread) as pool:
        results = pool.map(check, jobs)
        return sum(progress(results, len(jobs), "scan") if progress is not None else results)
