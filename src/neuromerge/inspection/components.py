"""Blocks and components of a model, from parameter names alone.

**Blocks** (where in depth a tensor sits):

* ``layer.N`` — transformer block ``N`` (:func:`neuromerge.config.layer_index`: ``layers.N``, ``layer.N``, ``h.N``,
  ``blocks.N``, ``block.N``…), or EfficientNet's MBConv block ``_blocks.N``; tensors of a decoder stack (a
  ``decoder`` part in the name, e.g. T5 / BART) get ``decoder.layer.N``;
* ``embeddings`` — the input end: token / position / type embeddings, their norm, a conv stem
  (a name part containing ``embed``, or one of :data:`EMBEDDING_PARTS`);
* ``head`` — the output end: output heads and pooler (a name part in :data:`HEAD_PARTS`, checked first), final
  norm or last convolution (a part in :data:`FINAL_PARTS`, checked after the embeddings);
* ``other`` — anything else.

**Components** (the unit MERGE recombines, docs/methods/spec.md §2 [recon] 1): inside a ``layer.N`` block,
``attention`` when a name part (after the block index) is one of :data:`ATTENTION_PARTS`, else ``mlp`` when one is in
:data:`MLP_PARTS` or the first part is ``output`` (BERT / ViT's block-level ``output.dense`` and its norm), else
``other`` (pre-LN norms such as ``input_layernorm`` / ``ln_1``); an EfficientNet ``_blocks.N`` is one component
``block``. Outside the layer stack the block is the component (kind ``all``). Matching is on whole dot-separated
parts, case-insensitive, attention first (so BERT's ``attention.output.dense`` is attention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import layer_index

ATTENTION_PARTS = frozenset({
    "attn", "attention", "self_attn", "self_attention", "cross_attn", "crossattention", "selfattention",
    "encdecattention", "encoder_attn", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value",
    "c_attn", "q_attn", "qkv", "wqkv", "q", "k", "v", "o", "in_proj", "out_proj",
})
MLP_PARTS = frozenset({
    "mlp", "ffn", "feed_forward", "feedforward", "intermediate", "fc", "fc1", "fc2", "c_fc", "gate_proj", "up_proj",
    "down_proj", "dense_h_to_4h", "dense_4h_to_h", "densereludense", "wi", "wi_0", "wi_1", "wo", "w1", "w2", "w3",
    "experts", "block_sparse_moe", "gate_up_proj",
})
EMBEDDING_PARTS = frozenset({"wte", "wpe", "shared", "_conv_stem", "_bn0", "patch_embed", "class_embedding"})
#: output heads (checked before the embeddings: ``embed_out`` is GPT-NeoX's output head)
HEAD_PARTS = frozenset({
    "lm_head", "classifier", "score", "qa_outputs", "pooler", "head", "heads", "_fc", "embed_out", "predictions",
    "cls",
})
#: final norms / last convolution (checked after the embeddings: ``embeddings.LayerNorm`` is an embedding norm)
FINAL_PARTS = frozenset({
    "norm", "ln_f", "final_layer_norm", "final_layernorm", "layernorm", "post_layernorm", "final_norm",
    "_conv_head", "_bn1",
})
_EFFICIENTNET_RE = re.compile(r"(?:^|\.)_blocks\.(\d+)\.")
#: the same stack names as :func:`neuromerge.config.layer_index` (used for the position of the index)
_LAYER_PREFIX_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.\d+\.")
_END_BLOCKS = ("embeddings", "head", "other")


@dataclass(frozen=True)
class Component:
    """Where a tensor belongs: its ``block`` and its component ``kind`` inside it."""

    block: str
    kind: str  # attention | mlp | other | block | all

    @property
    def name(self) -> str:
        """``layer.3/attention``; a component that is a whole block is named by the block."""
        return self.block if self.kind in ("all", "block") else f"{self.block}/{self.kind}"


def _parts(name: str) -> list[str]:
    return [p.lower() for p in name.split(".")]


def component_of(name: str) -> Component:
    """Block and component of the parameter ``name`` (rules in the module docstring)."""
    m = _EFFICIENTNET_RE.search(name)
    if m:
        return Component(f"layer.{int(m.group(1))}", "block")
    idx = layer_index(name)
    stack = _LAYER_PREFIX_RE.search(name)
    if idx is not None and stack is not None:
        prefix = "decoder." if "decoder" in _parts(name[: stack.end()]) else ""
        rest = _parts(name[stack.end():])[:-1]
        kind = "other"
        if any(p in ATTENTION_PARTS for p in rest):
            kind = "attention"
        elif any(p in MLP_PARTS for p in rest) or (rest and rest[0] == "output"):
            kind = "mlp"
        return Component(f"{prefix}layer.{idx}", kind)
    parts = _parts(name)[:-1] or _parts(name)
    if any(p in HEAD_PARTS for p in parts):
        return Component("head", "all")
    if any("embed" in p or p in EMBEDDING_PARTS for p in parts):
        return Component("embeddings", "all")
    if any(p in FINAL_PARTS for p in parts):
        return Component("head", "all")
    return Component("other", "all")


def block_order(block: str) -> tuple[int, int, str]:
    """Sort key: embeddings, layer.0 … layer.N, decoder.layer.0 …, head, other."""
    m = re.fullmatch(r"(decoder\.)?layer\.(\d+)", block)
    if m:
        return (1 + bool(m.group(1)), int(m.group(2)), "")
    rank = {"embeddings": 0, "head": 3, "other": 4}.get(block, 5)
    return (rank, 0, block)


def component_order(component: str) -> tuple[int, int, str, int]:
    """Sort key of a component name: by block, then attention, mlp, other."""
    block, _, kind = component.partition("/")
    return (*block_order(block), {"attention": 0, "mlp": 1, "other": 2}.get(kind, 3))


__all__ = ["Component", "block_order", "component_of", "component_order"]
