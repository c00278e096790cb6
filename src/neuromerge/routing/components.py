"""MERGE components: which part of the backbone each tensor belongs to (docs/methods/spec.md §2, reconstruction step 1).

MERGE (Qiu et al., arXiv 2602.06552) partitions the tasks separately for each *component*: per transformer block
``l`` an attention component ``layer.{l}.attention`` and an MLP component ``layer.{l}.mlp``; per CNN block
(EfficientNet's MBConv blocks) one component ``block.{l}``; everything outside the blocks (embeddings, final
norm, pooler, LM head, a CNN's stem and head convolutions) forms one more component ``embeddings``, partitioned
like the others. Task heads are not part of the backbone and stay per task.

Choices (the paper does not say where the norms go):

- **A norm belongs to the sub-layer it normalizes**: BERT is post-LN, so ``attention.output.LayerNorm`` (after the
  attention residual) → attention and ``output.LayerNorm`` (after the MLP residual) → MLP; Llama is pre-LN, so
  ``input_layernorm`` (before attention) → attention and ``post_attention_layernorm`` (before the MLP) → MLP.
  Each sub-layer then carries exactly the normalization its output passes through.
- BERT's pooler and ``embeddings.LayerNorm`` → ``embeddings``; Llama's ``embed_tokens``, final ``norm``,
  ``lm_head`` (and ``rotary_emb`` buffers, when present) → ``embeddings``.
- EfficientNet: ``_blocks.{l}.*`` (convolutions *and* their BatchNorms, buffers included) → ``block.{l}``;
  ``_conv_stem``, ``_bn0``, ``_conv_head``, ``_bn1`` → ``embeddings``.
- Every state-dict key is mapped, buffers included (a chain is a complete state dict); names may carry a model
  prefix (``bert.``, ``base_model.model.``…).

Unknown names are an error listing them; ``overrides`` (``{regex: component}``, searched with ``re.search``,
tried before the built-in rules, first match wins; the component may use ``\\1`` / ``\\g<name>`` groups) cover
other layouts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from neuromerge.errors import ConfigError

EMBEDDINGS = "embeddings"

_P = r"^(?:.*\.)?"  # any model prefix (bert., model., base_model.model.…)

#: built-in rules per family: (regex, component template); first match wins
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "bert": (
        (_P + r"encoder\.layer\.(\d+)\.attention\.", r"layer.\1.attention"),
        (_P + r"encoder\.layer\.(\d+)\.(?:intermediate|output)\.", r"layer.\1.mlp"),
        (_P + r"(?:embeddings|pooler)\.", EMBEDDINGS),
    ),
    "llama": (
        (_P + r"layers\.(\d+)\.(?:self_attn|input_layernorm)\.", r"layer.\1.attention"),
        (_P + r"layers\.(\d+)\.(?:mlp|post_attention_layernorm)\.", r"layer.\1.mlp"),
        (_P + r"(?:embed_tokens|norm|rotary_emb)\.", EMBEDDINGS),
        (r"^lm_head\.", EMBEDDINGS),
    ),
    "efficientnet": (
        (r"^(?:.*\.)?_blocks\.(\d+)\.", r"block.\1"),
        (r"^(?:.*\.)?_(?:conv_stem|bn0|conv_head|bn1)\.", EMBEDDINGS),
    ),
}

#: config.json model types (and suite model types) → rule family
FAMILIES: dict[str, str] = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "efficientnet": "efficientnet", "efficientnet-lite": "efficientnet",
}


def _rules(model_type: str | None) -> list[tuple[re.Pattern[str], str]]:
    if model_type is None:
        families = list(RULES)
    else:
        family = FAMILIES.get(model_type.lower())
        if family is None:
            raise ConfigError(f"component map: unknown model type {model_type!r} (known: {', '.join(FAMILIES)}); "
                              "pass model_type=None to try every layout, or map the names with overrides")
        families = [family]
    return [(re.compile(p), t) for f in families for p, t in RULES[f]]


def component_map(names: Iterable[str], model_type: str | None = None,
                  overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{tensor name: component id}`` for every name (see the module docstring for the rules).

    ``model_type`` picks the rule family (``bert`` / ``llama`` / ``efficientnet`` and aliases); None tries all
    of them. ``overrides`` (``{regex: component template}``) are tried first. Names no rule matches raise a
    :class:`ConfigError` that lists them.
    """
    rules = [(re.compile(p), t) for p, t in (overrides or {}).items()] + _rules(model_type)
    out: dict[str, str] = {}
    unknown: list[str] = []
    for name in names:
        for pattern, template in rules:
            m = pattern.search(name)
            if m is not None:
                out[name] = m.expand(template)
                break
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" … ({len(unknown)} in all)" if len(unknown) > 20 else "")
        raise ConfigError(f"component map ({model_type or 'any layout'}): no component for {shown}; map them with "
                          "overrides={regex: component}")
    return out


def _sort_key(component: str) -> tuple[int, int, str]:
    """Embeddings first, then blocks by index, attention before MLP."""
    if component == EMBEDDINGS:
        return (0, -1, "")
    m = re.search(r"(\d+)", component)
    return (1, int(m.group(1)), component) if m else (2, 0, component)


def components(mapping: Mapping[str, str]) -> list[str]:
    """The distinct component ids of a map, ordered: ``embeddings``, then by block index (``attention`` <
    ``mlp`` alphabetically), then components without an index."""
    return sorted(set(mapping.values()), key=_sort_key)
