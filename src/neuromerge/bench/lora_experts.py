"""Exact low-rank factors of LoRA-mode experts: moved to :mod:`neuromerge.routing.lora_factors` (re-exported)."""

from __future__ import annotations

from ..routing.lora_factors import Factors, lora_experts, lora_factors

__all__ = ["Factors", "lora_experts", "lora_factors"]
