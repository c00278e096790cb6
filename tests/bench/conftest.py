"""Fixtures shared by the bench's protocol tests on toy suites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine a 2-thread pool makes each op ~100× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty bench cache (``NEUROMERGE_CACHE``) for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("NEUROMERGE_CACHE", str(d))
    return d
