"""Storage layout of weight tensors, per architecture (documented in ``docs/architectures.md``).

Methods see tensors in *canonical layout*: one output neuron per row. ``nn.Linear`` stores ``(out, in)`` already;
GPT-2-style ``Conv1D`` stores ``(in, out)`` and is transposed; conv kernels ``(out, in, k, k)`` are reshaped to
``(out, in·k·k)``; 1-D tensors (biases, norms) are *point* tensors.

Rules come from the config's ``layout`` entries first, then the table below keyed by ``config.json``'s
``model_type``; any other 2-D tensor falls back to ``out_in`` (PyTorch's ``nn.Linear`` convention), and the merge
report lists every tensor classified by that fallback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["out_in", "in_out", "conv", "point"]

#: model_type → regexes of the 2-D tensors stored as (in, out) by transformers' Conv1D
ARCHITECTURE_RULES: dict[str, tuple[str, ...]] = {
    "gpt2": (r"\.(attn\.c_attn|attn\.c_proj|attn\.q_attn|mlp\.c_fc|mlp\.c_proj)\.weight$",),
    "openai-gpt": (r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",),
    "imagegpt": (r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",),
    "decision_transformer": (r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",),
}
#: model types known to store every 2-D weight as nn.Linear / nn.Embedding (out, in)
KNOWN_LINEAR_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "bert", "roberta",
    "distilbert", "electra", "deberta", "deberta-v2", "t5", "bart", "mbart", "vit", "clip", "clip_vision_model",
    "gpt_neox", "gptj", "opt", "bloom", "falcon", "starcoder2", "olmo", "stablelm", "mpt", "xlm-roberta",
})


@dataclass(frozen=True)
class LayoutRules:
    """Resolved layout rules for one pool."""

    model_type: str | None
    in_out: tuple[re.Pattern[str], ...]
    out_in: tuple[re.Pattern[str], ...]

    @classmethod
    def build(cls, model_type: str | None, overrides: Sequence[tuple[str, str]] = ()) -> LayoutRules:
        in_out = [re.compile(f) for f, lay in overrides if lay == "in_out"]
        out_in = [re.compile(f) for f, lay in overrides if lay == "out_in"]
        in_out += [re.compile(p) for p in ARCHITECTURE_RULES.get(model_type or "", ())]
        return cls(model_type, tuple(in_out), tuple(out_in))

    def classify(self, name: str, shape: Sequence[int]) -> tuple[Layout, bool]:
        """Layout of a tensor and whether it came from the fallback (unknown architecture, no rule)."""
        if len(shape) <= 1:
            return "point", False
        if len(shape) > 2:
            return "conv", False
        if any(p.search(name) for p in self.out_in):
            return "out_in", False
        if any(p.search(name) for p in self.in_out):
            return "in_out", False
        known = self.model_type in KNOWN_LINEAR_TYPES or self.model_type in ARCHITECTURE_RULES
        return "out_in", not known


def to_canonical(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Storage layout → one neuron per row (2-D) or 1-D."""
    if layout == "in_out":
        return t.t()
    if layout == "conv":
        return t.reshape(t.shape[0], -1)
    if layout == "point":
        return t.reshape(-1)
    return t


def from_canonical(t: torch.Tensor, layout: Layout, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_canonical`, back to the storage ``shape``."""
    if layout == "in_out":
        return t.t().contiguous()
    return t.reshape(tuple(shape))
