"""The mergekit parity table: our own equivalents of the configs in mergekit 0.1.5's ``examples/`` and test suite,
plus variants (dtypes, gradients, filters, a base listed under ``models``, no base), on tiny local models.

Each :class:`Case` builds a mergekit-shaped config from the names of the session's tiny models (``Models``, filled
by ``tests/peers/test_mergekit_examples.py``) and says what the two tools must agree on:

* ``equal``: same tensor names, dtypes, shapes, values at fp32 tolerance (configs in ``float16`` / ``bfloat16`` are
  also run as an fp32 twin for equality; the low-precision outputs must then agree within :data:`LOW_PRECISION_C`
  units of that dtype's rounding at the tensor's magnitude, and ours must be the fp32 result rounded once);
* ``documented``: the outputs differ by the semantic difference of ``docs/peers.md`` whose text ``row`` names;
  ``knob`` turns the config into the documented equivalent that makes them equal, and ``explain`` (where given)
  turns it into the config with which *ours* reproduces *mergekit's* output of the original;
* ``by_token``: configs with ``tokenizer_source`` / ``tokenizer:`` / ``chat_template`` over models whose vocabularies
  differ: equal at fp32 tolerance with the rows of the vocabulary tensors matched by token (mergekit orders appended
  tokens by hash, docs/peers.md row 18), the same output vocabulary, and the same rendered chat template;
* ``refused``: neither tool merges it (mergekit raises; ours raises one :class:`NeuromergeError` before writing
  anything);
* ``random``: methods drawing random numbers: both run, same names / shapes / dtypes, the fraction of entries moved
  from the base agrees (the masks are independent draws, docs/peers.md *DARE: what can be compared*); the
  ``density: 1`` twin is equal.

The configs are written for this table, not copied from mergekit's files; ``source`` names the file each one
mirrors. ``docs/peers.md`` (*mergekit configs: parity run*) lists every case and its outcome.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Config = dict[str, Any]
Models = dict[str, str]

#: low-precision outputs of the two tools agree within ``C · u · max|θ_out|`` per tensor (u: 2⁻¹¹ fp16, 2⁻⁸ bf16)
LOW_PRECISION_C = 16

ROW_LAMBDA = "`task_arithmetic` default `lambda`"
ROW_BREADCRUMBS = "`breadcrumbs*` defaults"
ROW_TIES_TRIM = "`ties` default trim"
ROW_DARE_MASKS = "DARE random masks"
ROW_PATTERN = "`pattern:` in a parameter condition"
ROW_LINEAR_BASE = "`linear` with `base_model` not under `models`"
ROW_KARCHER_BASE = "`karcher` with `base_model` not under `models`"
ROW_LOW_DTYPE = "output dtype of `ramplus_tl`, `arcee_fusion`"
ROW_DELLA_MASKS = "DELLA random masks"


@dataclass(frozen=True)
class Case:
    """One config run by both tools and the agreement asserted (module docstring)."""

    id: str
    source: str
    build: Callable[[Models], Config]
    outcome: str = "equal"
    row: str = ""
    knob: Callable[[Config], Config] | None = None
    explain: Callable[[Config], Config] | None = None
    #: the output moves away from the first model (guard against vacuous equality); false for pure copies
    moves: bool = True
    #: ``documented``: what differs — ``values`` (compared on the fp32 twin) or ``dtype`` (the output dtype, compared
    #: in the config's own dtype)
    differs_in: str = "values"


# ------------------------------------------------------------------------------------------------ builders
def _models(m: Models, *specs: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    out = []
    for name, params in specs:
        entry: dict[str, Any] = {"model": m[name]}
        if params is not None:
            entry["parameters"] = params
        out.append(entry)
    return out


def _cfg(method: str, m: Models, *specs: tuple[str, dict[str, Any] | None], base: str | None = None,
         params: dict[str, Any] | None = None, dtype: str = "float32", **extra: Any) -> Config:
    cfg: Config = {"merge_method": method, "models": _models(m, *specs), "dtype": dtype}
    if base is not None:
        cfg["base_model"] = m[base]
    if params is not None:
        cfg["parameters"] = params
    cfg.update(extra)
    return cfg


def _set(**params: Any) -> Callable[[Config], Config]:
    """A knob: the config with these top-level ``parameters`` added."""

    def apply(cfg: Config) -> Config:
        out = copy.deepcopy(cfg)
        out["parameters"] = {**(out.get("parameters") or {}), **params}
        return out

    return apply


def _pattern_to_filter(cfg: Config) -> Config:
    """``pattern:`` conditions written as ``filter:`` (the spelling both tools read)."""
    out = copy.deepcopy(cfg)
    out["parameters"] = {k: [{("filter" if c == "pattern" else c): v for c, v in cond.items()} for cond in val]
                         if isinstance(val, list) and val and isinstance(val[0], dict) else val
                         for k, val in out["parameters"].items()}
    return out


def _drop_pattern(cfg: Config) -> Config:
    """What mergekit 0.1.5 reads: its conditions have no ``pattern``, so every condition matches every tensor."""
    out = copy.deepcopy(cfg)
    out["parameters"] = {k: [{c: v for c, v in cond.items() if c != "pattern"} for cond in val]
                         if isinstance(val, list) and val and isinstance(val[0], dict) else val
                         for k, val in out["parameters"].items()}
    return out


def _with_base_in_models(cfg: Config, weight: float) -> Config:
    """``linear`` with the base listed under ``models`` (mergekit averages an unlisted base too)."""
    out = copy.deepcopy(cfg)
    out["models"].insert(0, {"model": out["base_model"], "parameters": {"weight": weight}})
    return out


PATTERN_T = {"t": [{"pattern": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                   {"pattern": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}
FILTER_T = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                  {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}
TWO = (("a", {"weight": 0.6}), ("b", {"weight": 0.4}))  # mergekit's test suite: two models, weights 0.6 / 0.4


def _slices(*ranges: tuple[str, int, int], **extra: Any) -> Callable[[Models], Config]:
    def build(m: Models) -> Config:
        return {"merge_method": "passthrough", "dtype": extra.get("dtype", "float32"),
                "slices": [{"sources": [{"model": m[name], "layer_range": [lo, hi]}]} for name, lo, hi in ranges]}

    return build


def _vcfg(m: Models, method: str, base: bool = False, **extra: Any) -> Config:
    """Two experts of the vocabulary family (weights 0.7 / 0.4); with ``base``, its base as ``base_model`` and
    ``lambda: 1``, else the base listed first under ``models``."""
    cfg: Config = {"merge_method": method, "dtype": "float32",
                   "models": _models(m, ("v-e0", {"weight": 0.7}), ("v-e1", {"weight": 0.4}))}
    if base:
        cfg["base_model"] = m["v-base"]
        cfg["parameters"] = {"lambda": 1.0}
    else:
        cfg["models"].insert(0, {"model": m["v-base"], "parameters": {"weight": 0.5}})
    cfg.update(extra)
    return cfg


def _ties_yml(m: Models) -> Config:
    return _cfg("ties", m, ("a", {"density": [0.8, 0.3, 0.1], "weight": [1.0, 0.8, 0.5]}),
                ("b", {"density": [0.1, 0.4, 0.1], "weight": [0.2, 0.8, 0.1]}),
                ("c", {"density": [0.1, 0.2, 0.6], "weight": [0.5, 0.8, 1.0]}), base="base", params=None,
                dtype="bfloat16")


def _mega_stage2(m: Models) -> Config:
    return _cfg("ties", m, ("a", {"density": [1, 0.7, 0.1], "weight": 1.0}),
                ("b", {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}),
                base="base", params={"normalize": True, "int8_mask": True}, dtype="float16")


# ----------------------------------------------------------------------------------------------------- table
CASES: list[Case] = [
    # ---- examples/
    Case("bio-merge", "examples/bio-merge.yml",
         lambda m: _cfg("ties", m, ("a", {"density": 0.5, "weight": 0.5}), ("b", {"density": 0.5, "weight": 0.5}),
                        base="base", params={"normalize": False, "int8_mask": True}, dtype="float16"),
         "documented", ROW_TIES_TRIM, knob=_set(scope="tensor")),
    Case("bio-merge-scope-tensor", "examples/bio-merge.yml + scope: tensor",
         lambda m: _cfg("ties", m, ("a", {"density": 0.5, "weight": 0.5}), ("b", {"density": 0.5, "weight": 0.5}),
                        base="base", params={"normalize": False, "int8_mask": True, "scope": "tensor"},
                        dtype="float16")),
    Case("gradient-slerp-pattern", "examples/gradient-slerp.yml",
         lambda m: {"merge_method": "slerp", "base_model": m["base"], "dtype": "float16", "parameters": PATTERN_T,
                    "slices": [{"sources": [{"model": m["base"], "layer_range": [0, 5]},
                                            {"model": m["a"], "layer_range": [0, 5]}]}]},
         "documented", ROW_PATTERN, knob=_pattern_to_filter, explain=_drop_pattern),
    Case("gradient-slerp-filter", "examples/gradient-slerp.yml with filter:",
         lambda m: {"merge_method": "slerp", "base_model": m["base"], "dtype": "float16", "parameters": FILTER_T,
                    "slices": [{"sources": [{"model": m["base"], "layer_range": [0, 5]},
                                            {"model": m["a"], "layer_range": [0, 5]}]}]}),
    Case("gradient-slerp-models-form", "examples/gradient-slerp.yml as models:",
         lambda m: _cfg("slerp", m, ("base", None), ("a", None), base="base", params=FILTER_T)),
    Case("gpt2-small", "examples/gpt2-small.yml", _slices(("gpt2", 0, 2), dtype="float16"), moves=False),
    Case("orcamini-platy-44layer", "examples/orcamini-platy-44layer.yml",
         _slices(("a", 0, 4), ("b", 2, 5), dtype="float16"), moves=False),
    Case("linear", "examples/linear.yml",
         lambda m: _cfg("linear", m, ("a", {"weight": 1.0}), ("b", {"weight": 0.3}), ("c", {"weight": 0.5}),
                        dtype="float16")),
    Case("ties", "examples/ties.yml (merge_method: ties; 0.1.5 has no ranked_ties)", _ties_yml,
         "documented", ROW_TIES_TRIM, knob=_set(scope="tensor")),
    Case("ties-scope-tensor", "examples/ties.yml + scope: tensor", lambda m: _set(scope="tensor")(_ties_yml(m))),
    Case("mega-stage1", "examples/mega.yml, document 1 (mergekit-multi)",
         lambda m: {"merge_method": "slerp", "base_model": m["base"], "dtype": "float16", "parameters": FILTER_T,
                    "slices": [{"sources": [{"model": m["base"], "layer_range": [0, 5]},
                                            {"model": m["b"], "layer_range": [0, 5]}]}]}),
    Case("mega-stage2", "examples/mega.yml, document 2 (mergekit-multi)", _mega_stage2,
         "documented", ROW_TIES_TRIM, knob=_set(scope="tensor")),
    # ---- tests/test_basic_merges.py
    Case("gpt2-copy", "test_basic_merges: test_gpt2_copy",
         lambda m: _cfg("passthrough", m, ("gpt2", None), dtype="bfloat16"), moves=False),
    Case("gpt2-stack", "test_basic_merges: test_gpt2_stack",
         _slices(("gpt2", 0, 4), ("gpt2", 0, 4), dtype="bfloat16"), moves=False),
    Case("passthrough-scale", "test_basic_merges: test_passthrough_scale",
         lambda m: _cfg("passthrough", m, ("a", {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}))),
    Case("linear-bf16", "test_basic_merges: test_linear_merge", lambda m: _cfg("linear", m, *TWO,
                                                                                  dtype="bfloat16")),
    Case("slerp-bf16", "test_basic_merges: test_slerp_merge (weight given, ignored)",
         lambda m: _cfg("slerp", m, *TWO, base="a", params={"t": 0.35}, dtype="bfloat16")),
    Case("task-arithmetic-bf16", "test_basic_merges: test_task_arithmetic_merge",
         lambda m: _cfg("task_arithmetic", m, *TWO, base="c", dtype="bfloat16"),
         "documented", ROW_LAMBDA, knob=_set(**{"lambda": 1.0})),
    Case("breadcrumbs-bf16", "test_basic_merges: test_breadcrumbs_merge",
         lambda m: _cfg("breadcrumbs", m, *TWO, base="c", dtype="bfloat16"),
         "documented", ROW_BREADCRUMBS, knob=_set(density=1.0, gamma=0.01, **{"lambda": 1.0})),
    Case("ties-bf16", "test_basic_merges: test_ties_merge",
         lambda m: _cfg("ties", m, *TWO, base="c", params={"density": 0.3}, dtype="bfloat16"),
         "documented", ROW_TIES_TRIM, knob=_set(scope="tensor")),
    Case("dare-ties-bf16", "test_basic_merges: test_dare_ties_merge",
         lambda m: _cfg("dare_ties", m, *TWO, base="c", params={"density": 0.66}, dtype="bfloat16"),
         "random", ROW_DARE_MASKS),
    Case("model-stock-bf16", "test_basic_merges: test_model_stock_merge (weight given, ignored)",
         lambda m: _cfg("model_stock", m, ("b", {"weight": 0.6}), ("c", {"weight": 0.4}), base="a",
                        dtype="bfloat16")),
    Case("model-stock-filter-wise-bf16", "test_basic_merges: test_model_stock_filterwise_merge",
         lambda m: _cfg("model_stock", m, ("b", {"weight": 0.6}), ("c", {"weight": 0.4}), base="a",
                        params={"filter_wise": True}, dtype="bfloat16")),
    # ---- variants: defaults made explicit, dtypes, gradients, filters, base under models, no base
    Case("task-arithmetic-lambda-1", "variant: test_task_arithmetic_merge + lambda: 1",
         lambda m: _cfg("task_arithmetic", m, *TWO, base="c", params={"lambda": 1.0})),
    Case("task-arithmetic-normalize", "variant: weights as a gradient, normalize: true",
         lambda m: _cfg("task_arithmetic", m, ("a", {"weight": [0.2, 1.0]}), ("b", {"weight": 0.5}), base="base",
                        params={"lambda": 1.0, "normalize": True})),
    Case("ties-gradient-filters", "variant: ties, density gradient + filtered weight, scope: tensor",
         lambda m: _cfg("ties", m, ("a", {"density": [1, 0.7, 0.1], "weight": 1.0}),
                        ("b", {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                               "weight": [0, 0.3, 0.7, 1]}), base="base",
                        params={"normalize": True, "int8_mask": True, "scope": "tensor"})),
    Case("ties-base-in-models", "variant: ties with the base also under models",
         lambda m: _cfg("ties", m, ("base", {"weight": 1.0, "density": 0.5}), ("a", {"weight": 1.0, "density": 0.5}),
                        ("b", {"weight": 0.5, "density": 0.4}), base="base", params={"scope": "tensor"})),
    Case("breadcrumbs-ties-explicit", "variant: breadcrumbs_ties, explicit density / gamma / lambda / normalize",
         lambda m: _cfg("breadcrumbs_ties", m, ("a", {"weight": 0.6, "density": 0.4, "gamma": 0.05}),
                        ("b", {"weight": 0.4, "density": 0.5, "gamma": 0.02}), base="base",
                        params={"lambda": 1.0, "normalize": True})),
    Case("dare-linear", "variant: dare_linear, density 0.5",
         lambda m: _cfg("dare_linear", m, *TWO, base="base", params={"density": 0.5}),
         "random", ROW_DARE_MASKS),
    Case("linear-no-normalize", "variant: linear, normalize: false, no base",
         lambda m: _cfg("linear", m, *TWO, params={"normalize": False})),
    Case("linear-base-unlisted", "variant: linear with base_model not under models",
         lambda m: _cfg("linear", m, *TWO, base="base", params={"weight": 1.0}),
         "documented", ROW_LINEAR_BASE, knob=lambda c: _with_base_in_models(c, 1.0)),
    Case("linear-base-listed", "variant: linear with the base under models",
         lambda m: _cfg("linear", m, ("base", {"weight": 0.5}), *TWO, base="base")),
    Case("linear-bf16-inputs", "variant: bfloat16 model files, dtype: bfloat16",
         lambda m: _cfg("linear", m, ("a16", {"weight": 0.6}), ("b16", {"weight": 0.4}), dtype="bfloat16")),
    Case("linear-bf16-inputs-fp32", "variant: bfloat16 model files, dtype: float32",
         lambda m: _cfg("linear", m, ("a16", {"weight": 0.6}), ("b16", {"weight": 0.4}))),
    Case("slerp-gradient", "variant: slerp, t gradient, base second",
         lambda m: _cfg("slerp", m, ("a", None), ("base", None), base="base", params={"t": [0.1, 0.9, 0.4]})),
    Case("slerp-weight-ignored", "variant: slerp with weight (mergekit ignores it; ours warns)",
         lambda m: _cfg("slerp", m, ("base", {"weight": 0.3}), ("a", {"weight": 0.7}), base="base",
                        params={"t": 0.6})),
    Case("model-stock-3", "variant: model_stock, 3 models, fp32",
         lambda m: _cfg("model_stock", m, ("a", None), ("b", None), ("c", None), base="base")),
    Case("passthrough-slice-scale", "variant: slices with per-slice scale",
         lambda m: {"merge_method": "passthrough", "dtype": "float32", "slices": [
             {"sources": [{"model": m["a"], "layer_range": [0, 3]}]},
             {"sources": [{"model": m["b"], "layer_range": [1, 5]}],
              "parameters": {"scale": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]}),
    Case("linear-slices", "variant: linear over slices, per-source weight gradients",
         lambda m: {"merge_method": "linear", "dtype": "float32", "slices": [
             {"sources": [{"model": m["a"], "layer_range": [0, 3], "parameters": {"weight": [0.2, 0.8]}},
                          {"model": m["b"], "layer_range": [2, 5], "parameters": {"weight": 0.5}}]},
             {"sources": [{"model": m["b"], "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                          {"model": m["c"], "layer_range": [3, 5], "parameters": {"weight": 1.0}}]}]}),
    # ---- tests/test_tokenizer.py, tests/test_chat_template.py (vocab family: tests/vocab_models.py)
    Case("tokenizer-source-base", "test_tokenizer: test_source_base",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer_source="base"), "by_token"),
    Case("tokenizer-source-union", "test_tokenizer: test_source_union",
         lambda m: _vcfg(m, "linear", tokenizer_source="union"), "by_token"),
    Case("tokenizer-source-model", "test_tokenizer: test_source_model",
         lambda m: _vcfg(m, "linear", tokenizer_source=m["v-e1"]), "by_token"),
    Case("tokenizer-slerp-union", "test_tokenizer: test_slerp_union",
         lambda m: {"merge_method": "slerp", "base_model": m["v-base"], "dtype": "float32",
                    "models": _models(m, ("v-base", None), ("v-e1", None)), "parameters": {"t": 0.4},
                    "tokenizer_source": "union"}, "by_token"),
    Case("tokenizer-force-select", "test_tokenizer: test_force_and_select",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer={"source": "union", "tokens": {
             "a3": {"source": m["v-e0"], "force": True}, "y0": {"source": m["v-e1"]}}}), "by_token"),
    Case("tokenizer-model-token-id", "test_tokenizer: test_model_token_id",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer={"source": "base", "tokens": {
             "a5": {"source": {"kind": "model_token", "model": m["v-e1"], "token_id": 6}, "force": True}}}),
         "by_token"),
    Case("tokenizer-pad-to-multiple", "test_tokenizer: test_pad_to_multiple_of",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer={"source": "union", "pad_to_multiple_of": 16}),
         "by_token"),
    Case("tokenizer-ties-union", "variant: ties (scope: tensor) over a union",
         lambda m: _vcfg(m, "ties", base=True, tokenizer_source="union",
                         parameters={"density": 0.5, "lambda": 1.0, "scope": "tensor"}), "by_token"),
    Case("chat-template-chatml", "test_chat_template: test_template_chatml",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer_source="base", chat_template="chatml"), "by_token"),
    Case("chat-template-literal", "test_chat_template: test_template_literal_jinja",
         lambda m: _vcfg(m, "task_arithmetic", base=True, tokenizer_source="base",
                         chat_template="{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"), "by_token"),
    Case("tokenizer-none-vocab-differs", "test_tokenizer: legacy mode (no tokenizer_source, vocabularies differ)",
         lambda m: _vcfg(m, "task_arithmetic", base=True), "refused"),
    # ---- the methods mergekit 0.1.5 added (its test suite's configs and variants)
    Case("arcee-fusion", "examples/arcee_fusion.yml (base listed under models)",
         lambda m: _cfg("arcee_fusion", m, ("a", None), ("b", None), base="a", dtype="bfloat16"),
         "documented", ROW_LOW_DTYPE, knob=lambda c: {**c, "dtype": "float32"}, differs_in="dtype"),
    Case("arcee-fusion-fp32", "variant: arcee_fusion, base not listed, fp32",
         lambda m: _cfg("arcee_fusion", m, ("a", None), base="base")),
    Case("nuslerp", "test_basic_merges: nuslerp, two models, weights 0.6 / 0.4",
         lambda m: _cfg("nuslerp", m, *TWO, dtype="bfloat16")),
    Case("nuslerp-base", "variant: nuslerp of task vectors (base_model)",
         lambda m: _cfg("nuslerp", m, *TWO, base="base")),
    Case("nuslerp-row-wise", "variant: nuslerp_flatten false, nuslerp_row_wise true",
         lambda m: _cfg("nuslerp", m, ("a", {"weight": 1.0}), ("b", {"weight": 0.5}),
                        params={"nuslerp_flatten": False, "nuslerp_row_wise": True})),
    Case("multislerp", "test_basic_merges: multislerp, three models",
         lambda m: _cfg("multislerp", m, ("a", {"weight": 0.6}), ("b", {"weight": 0.4}), ("c", {"weight": 0.2}),
                        dtype="bfloat16")),
    Case("multislerp-base", "variant: multislerp with base_model, normalize_weights false",
         lambda m: _cfg("multislerp", m, *TWO, base="base", params={"normalize_weights": False})),
    Case("karcher", "test_basic_merges: karcher, three models",
         lambda m: _cfg("karcher", m, ("a", None), ("b", None), ("c", None), dtype="bfloat16")),
    Case("karcher-base-unlisted", "variant: karcher with base_model not under models",
         lambda m: _cfg("karcher", m, ("a", None), ("b", None), base="base"),
         "documented", ROW_KARCHER_BASE, knob=lambda c: {**c, "models": [{"model": c["base_model"]}, *c["models"]]}),
    Case("sce", "test_basic_merges: sce, select_topk 0.5",
         lambda m: _cfg("sce", m, ("a", None), ("b", None), base="base", params={"select_topk": 0.5},
                        dtype="bfloat16")),
    Case("sce-topk-1", "variant: sce, select_topk 1, three models",
         lambda m: _cfg("sce", m, ("a", None), ("b", None), ("c", None), base="base")),
    Case("della", "test_basic_merges: della, density 0.5, epsilon 0.1",
         lambda m: _cfg("della", m, *TWO, base="base", params={"density": 0.5, "epsilon": 0.1, "lambda": 1.0},
                        dtype="bfloat16"), "random", ROW_DELLA_MASKS),
    Case("della-linear", "variant: della_linear, per-model density",
         lambda m: _cfg("della_linear", m, ("a", {"weight": 0.6, "density": 0.4}),
                        ("b", {"weight": 0.4, "density": 0.7}), base="base", params={"epsilon": 0.05}),
         "random", ROW_DELLA_MASKS),
    Case("della-dense", "variant: della at its default density 1 (deterministic)",
         lambda m: _cfg("della", m, *TWO, base="base")),
    Case("ram", "test_basic_merges: ram",
         lambda m: _cfg("ram", m, ("a", None), ("b", None), base="base", dtype="bfloat16")),
    Case("ramplus-tl", "test_basic_merges: ramplus_tl, r 0.2, alpha 0.3",
         lambda m: _cfg("ramplus_tl", m, ("a", None), ("b", None), ("c", None), base="base",
                        params={"r": 0.2, "alpha": 0.3})),
    Case("nearswap", "test_basic_merges: nearswap, t 0.0001, base listed under models",
         lambda m: _cfg("nearswap", m, ("base", None), ("a", None), base="base", params={"t": 0.0001},
                        dtype="bfloat16")),
    Case("nearswap-t", "variant: nearswap, t 0.01, fp32",
         lambda m: _cfg("nearswap", m, ("a", None), base="base", params={"t": 0.01})),
    # ---- other architectures mergekit 0.1.5 knows (qwen2.json: q/k/v biases; granite.json; mistral.json)
    Case("qwen2-ties", "variant: Qwen2, ties scope: tensor, weights 0.6 / 0.4",
         lambda m: _cfg("ties", m, ("qwen2-a", {"weight": 0.6, "density": 0.5}),
                        ("qwen2-b", {"weight": 0.4, "density": 0.3}), base="qwen2-base", params={"scope": "tensor"})),
    Case("qwen2-slerp-bf16", "variant: Qwen2, slerp t gradient, bfloat16",
         lambda m: _cfg("slerp", m, ("qwen2-base", None), ("qwen2-a", None), base="qwen2-base",
                        params={"t": [0.2, 0.8]}, dtype="bfloat16")),
    Case("granite-task-arithmetic", "variant: Granite, task_arithmetic lambda 1",
         lambda m: _cfg("task_arithmetic", m, ("granite-a", {"weight": 0.6}), ("granite-b", {"weight": 0.4}),
                        base="granite-base", params={"lambda": 1.0})),
    Case("mistral-della-linear-dense", "variant: Mistral, della_linear at density 1",
         lambda m: _cfg("della_linear", m, ("mistral-a", {"weight": 0.6}), ("mistral-b", {"weight": 0.4}),
                        base="mistral-base")),
    Case("mistral-frankenmerge", "variant: Mistral, passthrough of two models' slices",
         _slices(("mistral-a", 0, 2), ("mistral-b", 1, 2)), moves=False),
    Case("gpt2-frankenmerge", "variant: gpt2 passthrough of two models' slices",
         _slices(("gpt2", 0, 3), ("gpt2b", 1, 4)), moves=False),
]
