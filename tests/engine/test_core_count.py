"""A merge does not depend on the machine's core count: torch runs single-threaded inside every engine worker.

OpenMP's thread count is per thread, so ``torch.set_num_threads(1)`` in the main thread used not to reach the
thread pool's workers: TSV's SVD then ran with as many threads as ``OMP_NUM_THREADS`` (default: the cores) and its
reductions, hence the merged bytes, changed with the machine. Each run here is a fresh interpreter, because
OpenMP reads ``OMP_NUM_THREADS`` once at start-up.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_config


def _merge_digest(cfg: Path, out: Path, omp_threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads), "MKL_NUM_THREADS": str(omp_threads)}
    subprocess.run([sys.executable, "-m", "neuromerge.cli", "merge", str(cfg), "-o", str(out), "--no-progress",
                    "--threads", "2"], check=True, env=env, capture_output=True)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["tsv", "neuromerging"])
def test_merge_is_bitwise_equal_for_any_core_count(make_family, tmp_path: Path, method: str) -> None:
    base, experts = make_family("llama", n_experts=3)
    cfg = write_config(tmp_path / "c.yaml", method, base, experts)
    digests = {n: _merge_digest(cfg, tmp_path / f"out{n}", n) for n in (1, 4)}
    assert digests[1] == digests[4], digests
