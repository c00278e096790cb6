"""Shared fixtures: tiny BERT / Llama / GPT-2 families (a base and perturbed experts)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import perturb, save, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_flush_denormal(True)


@pytest.fixture
def make_family(tmp_path: Path) -> Callable[..., tuple[Path, list[Path]]]:
    """``make_family(arch, n_experts=3, dtype=None)`` → (base folder, expert folders)."""

    def make(arch: str = "llama", n_experts: int = 3, dtype: torch.dtype | None = None,
             root: Path | None = None) -> tuple[Path, list[Path]]:
        root = root or tmp_path / arch
        base = tiny_model(arch)
        base_dir = save(base, root / "base", dtype)
        experts = []
        for i in range(n_experts):
            m = tiny_model(arch)
            perturb(m, seed=100 + i)
            experts.append(save(m, root / f"expert{i}", dtype))
        return base_dir, experts

    return make


@pytest.fixture(scope="session")
def text_bench_cache(tmp_path_factory) -> Path:
    """One expert cache for the slow text-suite CLI tests (the quick bench trains the experts, the search reuses
    them): starts empty, so the first test proves the cold path."""
    return tmp_path_factory.mktemp("text-bench-cache")


@pytest.fixture(scope="session")
def llm_bench_cache(tmp_path_factory) -> Path:
    """One cache for the llm-suite tests: the GGUF is converted into it once (``test_llm.py``), and the
    ``--quick`` end-to-end run trains its experts there (it converts on its own when run alone)."""
    return tmp_path_factory.mktemp("llm-bench-cache")
