"""Peer-equality tests: neuromerge vs mergekit 0.1.5 on the *same* config dict and the same tiny model folders.

mergekit runs in-process (``MergeConfiguration.model_validate`` + ``run_merge``, CPU). Every output tensor is
compared with ``torch.testing.assert_close`` at fp32 tolerance (``rtol = 1e-5``, ``atol = 1e-6 · max(1, max|ref|)``).
Where a default differs (Task Arithmetic's λ: ours 0.3, mergekit 1.0; Breadcrumbs' density / λ; DARE's
rescale / normalize) the shared config sets the value explicitly, and a separate test pins the documented
difference. Keys that only neuromerge knows (``scope``, ``exclude``, ``seed``) stay in the shared dict:
mergekit 0.1.5 ignores unknown top-level keys and resolves only the parameters its method declares.
See docs/peers.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import neuromerge
from tests.helpers import perturb, save

pytestmark = pytest.mark.peers

Family = tuple[Path, list[Path]]
StateDict = dict[str, torch.Tensor]

RTOL = 1e-5
ATOL = 1e-6
#: per-model weights ≠ 1 and trim densities in [0.2, 0.5], used by the task-vector methods
WEIGHTS = (0.5, 1.0, 1.5)
DENSITIES = (0.2, 0.35, 0.5)


# ------------------------------------------------------------------------------------------------ helpers
def load_dir(path: Path) -> StateDict:
    out: StateDict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {path}"
    return out


def run_mergekit(config: dict[str, Any], out: Path, seed: int | None = None) -> StateDict:
    """mergekit 0.1.5 through its Python API, on CPU, without tokenizer or model card."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                           random_seed=seed)
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(config)), str(out), options=options)
    return load_dir(out)


def run_ours(config: dict[str, Any], out: Path) -> StateDict:
    neuromerge.merge(copy.deepcopy(config), out, threads=2, force=True, progress=False)
    return load_dir(out)


def merge_both(config: dict[str, Any], tmp_path: Path) -> tuple[StateDict, StateDict]:
    """(ours, mergekit) on the same config dict."""
    return run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "mergekit")


def atol_for(ref: torch.Tensor) -> float:
    return ATOL * max(1.0, float(ref.abs().max())) if ref.numel() else ATOL


def assert_same_model(ours: StateDict, theirs: StateDict, skip: Callable[[str], bool] = lambda _: False) -> None:
    """Same tensor names, dtypes and shapes; every value equal at fp32 tolerance (names where ``skip`` is
    true are compared for presence only)."""
    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        if skip(name):
            continue
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol_for(b), msg=lambda m, n=name: f"{n}: {m}")


def assert_moved(merged: StateDict, reference: StateDict, min_fraction: float = 0.5) -> None:
    """Guard against vacuous equality: most tensors of ``merged`` differ from ``reference`` (the base)."""
    moved = [n for n, ref in reference.items()
             if not torch.allclose(merged[n], ref, rtol=RTOL, atol=atol_for(ref))]
    assert len(moved) >= min_fraction * len(reference), f"only {len(moved)}/{len(reference)} tensors changed"


def ta_config(method: str, family: Family, params: dict[str, Any], per_model: list[dict[str, Any]] | None = None,
              **extra: Any) -> dict[str, Any]:
    """A mergekit-shaped config over ``family`` (base + experts) in fp32."""
    base, experts = family
    per_model = per_model or [{} for _ in experts]
    models = [{"model": str(e), "parameters": p} for e, p in zip(experts, per_model, strict=True)]
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": params,
            "dtype": "float32", **extra}


def weighted(*keys: tuple[str, tuple[float, ...]]) -> list[dict[str, float]]:
    """Per-model parameters from columns: ``weighted(("weight", WEIGHTS), ("density", DENSITIES))``."""
    n = len(keys[0][1])
    return [{k: vals[i] for k, vals in keys} for i in range(n)]


@pytest.fixture
def deep_llama(tmp_path: Path) -> Family:
    """A 5-layer tiny Llama base and 2 experts, so that gradients are evaluated at t = 0, ¼, ½, ¾, 1."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg)
    base_dir = save(base, tmp_path / "deep" / "base")
    experts = []
    for i in range(2):
        perturb(model := copy.deepcopy(base), seed=200 + i, scale=0.05)
        experts.append(save(model, tmp_path / "deep" / f"expert{i}"))
    return base_dir, experts


# ------------------------------------------------------------------------------------------ task arithmetic
@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_equals_mergekit(make_family, tmp_path: Path, arch: str, normalize: bool) -> None:
    family = make_family(arch)
    # exclude: [] — mergekit merges classification heads too (our default copies them from the base)
    cfg = ta_config("task_arithmetic", family, {"lambda": 0.7, "normalize": normalize},
                    weighted(("weight", WEIGHTS)), exclude=[], seed=3)
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(family[0]))


def test_task_arithmetic_default_lambda_differs(make_family, tmp_path: Path) -> None:
    """Documented difference: without ``lambda`` ours uses 0.3 (Task Arithmetic paper), mergekit 1.0."""
    family = make_family("llama", n_experts=2)
    cfg = ta_config("task_arithmetic", family, {}, weighted(("weight", (0.5, 1.5))))
    ours, theirs = merge_both(cfg, tmp_path)
    base = load_dir(family[0])
    for name in base:
        torch.testing.assert_close(ours[name] - base[name], 0.3 * (theirs[name] - base[name]),
                                   rtol=1e-4, atol=atol_for(base[name]))
    assert_moved(ours, base)


def test_classification_heads_are_merged_by_mergekit_only(make_family, tmp_path: Path) -> None:
    """Documented difference: our default ``exclude`` copies task heads from the base; mergekit merges them."""
    family = make_family("bert")
    cfg = ta_config("task_arithmetic", family, {"lambda": 1.0}, weighted(("weight", WEIGHTS)))
    ours, theirs = merge_both(cfg, tmp_path)
    base = load_dir(family[0])
    heads = [n for n in base if n.startswith(("classifier.", "bert.pooler.dense."))]
    assert heads
    for name in heads:
        torch.testing.assert_close(ours[name], base[name], rtol=0, atol=0)
        assert not torch.allclose(theirs[name], base[name])
    assert_same_model(ours, theirs, skip=lambda n: n in heads)


# -------------------------------------------------------------------------------------------------- TIES
@pytest.mark.parametrize("normalize", [True, False])
def test_per_tensor_ties_equals_mergekit(make_family, tmp_path: Path, normalize: bool) -> None:
    family = make_family("llama")
    cfg = ta_config("ties", family, {"scope": "tensor", "normalize": normalize, "lambda": 0.9},
                    weighted(("weight", WEIGHTS), ("density", DENSITIES)))
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    base = load_dir(family[0])
    assert_moved(ours, base)
    # the trim really happened: TA with the same weights is far from both results
    dense = run_ours(ta_config("task_arithmetic", family, {"lambda": 0.9}, weighted(("weight", WEIGHTS))),
                     tmp_path / "ta")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(dense[name], theirs[name], rtol=1e-3, atol=1e-4)


def test_ties_density_gradient_equals_mergekit_per_tensor(deep_llama: Family, tmp_path: Path) -> None:
    """mergekit's ``examples/ties.yml`` shape (our own equivalent): a density gradient for one model, a filtered
    density and a weight gradient for the other. With ``scope: tensor`` (mergekit's trim) the outputs are equal;
    with our default global trim the same config runs too (one threshold per (model, density value)) and differs
    from mergekit."""
    base_dir, experts = deep_llama
    models = [{"model": str(experts[0]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
              {"model": str(experts[1]), "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                                                        "weight": [0, 0.3, 0.7, 1]}}]
    cfg = {"merge_method": "ties", "base_model": str(base_dir), "models": models, "dtype": "float32",
           "parameters": {"normalize": True, "int8_mask": True, "scope": "tensor"}}
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    global_cfg = copy.deepcopy(cfg)
    del global_cfg["parameters"]["scope"]
    ours_global = run_ours(global_cfg, tmp_path / "global")
    name = "model.layers.2.mlp.up_proj.weight"
    assert not torch.allclose(ours_global[name], theirs[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_per_tensor_ties_equals_mergekit_other_archs(make_family, tmp_path: Path, arch: str) -> None:
    family = make_family(arch)
    cfg = ta_config("ties", family, {"scope": "tensor", "normalize": True},
                    weighted(("weight", WEIGHTS), ("density", DENSITIES)), exclude=[])
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)


def test_per_tensor_ties_keeps_at_least_one_entry_like_mergekit(make_family, tmp_path: Path) -> None:
    """``k = max(1, ⌊density·n⌋)`` per tensor, as mergekit: BERT's 3-entry classifier bias with density 0.2
    keeps its largest task-vector entry (a plain ``⌊0.6⌋ = 0`` would keep nothing)."""
    base_dir, experts = make_family("bert", n_experts=1)
    cfg = ta_config("ties", (base_dir, experts), {"scope": "tensor"}, [{"weight": 1.0, "density": 0.2}],
                    exclude=[])
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    base, expert = load_dir(base_dir), load_dir(experts[0])
    name = "classifier.bias"
    assert base[name].numel() == 3
    top = int((expert[name] - base[name]).abs().argmax())
    assert (ours[name] != base[name]).nonzero().flatten().tolist() == [top]
    torch.testing.assert_close(ours[name][top], expert[name][top])


# ------------------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_mergekit(make_family, tmp_path: Path, normalize: bool) -> None:
    _, experts = make_family("llama")
    cfg = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": normalize},
           "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, WEIGHTS, strict=True)]}
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(experts[0]))


def test_linear_base_model_is_averaged_by_mergekit_only(make_family, tmp_path: Path) -> None:
    """Documented difference: with ``base_model`` set but not listed under ``models``, mergekit's ``linear``
    averages the base too; ours averages only the listed models (the base provides names and files)."""
    base_dir, experts = make_family("llama", n_experts=2)
    cfg = {"merge_method": "linear", "base_model": str(base_dir), "parameters": {"weight": 1.0},
           "models": [{"model": str(e)} for e in experts], "dtype": "float32"}
    ours, theirs = merge_both(cfg, tmp_path)
    base, e0, e1 = load_dir(base_dir), load_dir(experts[0]), load_dir(experts[1])
    for name in base:
        torch.testing.assert_close(ours[name], (e0[name] + e1[name]) / 2, rtol=RTOL, atol=atol_for(base[name]))
        torch.testing.assert_close(theirs[name], (base[name] + e0[name] + e1[name]) / 3, rtol=RTOL,
                                   atol=atol_for(base[name]))


def test_linear_base_listed_under_models_equals_mergekit(make_family, tmp_path: Path) -> None:
    """A base also listed under ``models`` is averaged like any other model by ``linear`` (with its weight), as
    mergekit does; it is not dropped as a zero task vector."""
    base_dir, experts = make_family("llama", n_experts=2)
    models = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip([base_dir, *experts], WEIGHTS,
                                                                                strict=True)]
    cfg = {"merge_method": "linear", "base_model": str(base_dir), "models": models, "dtype": "float32"}
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    base, e0, e1 = load_dir(base_dir), load_dir(experts[0]), load_dir(experts[1])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (0.5 * base[name] + 1.0 * e0[name] + 1.5 * e1[name]) / 3.0
    torch.testing.assert_close(ours[name], expected, rtol=RTOL, atol=atol_for(expected))


# ------------------------------------------------------------------------------------------------- SLERP
SLERP_T = {
    "scalar": 0.3,
    "filtered_gradient": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}],
    "gradient": [0.1, 0.9, 0.4],
}


@pytest.mark.parametrize("t", list(SLERP_T), ids=list(SLERP_T))
@pytest.mark.parametrize("base_first", [True, False])
def test_slerp_equals_mergekit(deep_llama: Family, tmp_path: Path, t: str, base_first: bool) -> None:
    base, experts = deep_llama
    pair = [base, experts[0]] if base_first else [experts[0], base]
    cfg = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(m)} for m in pair],
           "parameters": {"t": SLERP_T[t]}, "dtype": "float32"}
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(base), min_fraction=0.3)


def test_slerp_gradient_is_interpolated_over_depth(deep_llama: Family, tmp_path: Path) -> None:
    """t = [0, 1] over 5 layers: layer 0 is the base, layer 4 the expert, layer 2 strictly between."""
    base, experts = deep_llama
    cfg = {"merge_method": "slerp", "base_model": str(base),
           "models": [{"model": str(base)}, {"model": str(experts[0])}], "parameters": {"t": [0, 1]},
           "dtype": "float32"}
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    b, e = load_dir(base), load_dir(experts[0])
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(ours[name.format(0)], b[name.format(0)])
    torch.testing.assert_close(ours[name.format(4)], e[name.format(4)])
    mid = name.format(2)
    assert not torch.allclose(ours[mid], b[mid]) and not torch.allclose(ours[mid], e[mid])


# ------------------------------------------------------------------------------------------- breadcrumbs
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_equals_mergekit(make_family, tmp_path: Path, method: str) -> None:
    family = make_family("llama")
    # λ and normalize explicit: ours defaults to λ = 0.3 (breadcrumbs) and dis-mean (breadcrumbs_ties),
    # mergekit to λ = 1 and normalize false
    params: dict[str, Any] = {"lambda": 0.8, "normalize": method == "breadcrumbs_ties"}
    cfg = ta_config(method, family, params,
                    weighted(("weight", WEIGHTS), ("density", DENSITIES), ("gamma", (0.05, 0.1, 0.02))))
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(family[0]))


# ------------------------------------------------------------------------------------------- model stock
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(make_family, tmp_path: Path, filter_wise: bool) -> None:
    family = make_family("llama", n_experts=3)
    cfg = ta_config("model_stock", family, {"filter_wise": filter_wise})
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(family[0]))


def test_model_stock_filter_wise_rows_differ_on_conv1d(make_family, tmp_path: Path) -> None:
    """Documented difference: ``filter_wise`` takes one ratio per *output neuron*; mergekit takes one per
    stored row, which for GPT-2's Conv1D ``(in, out)`` matrices is an input feature. Other tensors agree."""
    family = make_family("gpt2", n_experts=3)
    cfg = ta_config("model_stock", family, {"filter_wise": True})
    ours, theirs = merge_both(cfg, tmp_path)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    is_conv1d = lambda n: n.endswith(conv1d)  # noqa: E731
    assert_same_model(ours, theirs, skip=is_conv1d)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(ours[name], theirs[name], rtol=RTOL, atol=atol_for(theirs[name]))
    # and ours equals mergekit's formula applied to the transposed (out, in) matrices
    base, experts = load_dir(family[0]), [load_dir(e) for e in family[1]]
    w0 = base[name].T
    offsets = [e[name].T - w0 for e in experts]
    cos = torch.stack([
        (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
        for i, a in enumerate(offsets) for b in offsets[i + 1:]
    ]).mean(0).unsqueeze(-1)
    t = 3 * cos / (1 + 2 * cos)
    expected = (t * sum(e[name].T for e in experts) / 3 + (1 - t) * w0).T
    torch.testing.assert_close(ours[name], expected, rtol=RTOL, atol=atol_for(expected))


# -------------------------------------------------------------------------------------------------- DARE
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_drop_equals_mergekit(make_family, tmp_path: Path, method: str) -> None:
    """density = 1 removes the randomness: both reduce to the deterministic combine step, which must agree.
    ``rescale`` and ``normalize`` explicit (defaults differ: ours 1/density and dis-mean, mergekit L1 and
    normalize false)."""
    family = make_family("llama")
    cfg = ta_config(method, family, {"lambda": 0.9, "rescale": True, "normalize": False},
                    weighted(("weight", WEIGHTS), ("density", (1.0, 1.0, 1.0))))
    ours, theirs = merge_both(cfg, tmp_path)
    assert_same_model(ours, theirs)
    assert_moved(ours, load_dir(family[0]))


def _dare_statistics(merged: StateDict, base: StateDict, expert: StateDict) -> tuple[float, dict[str, float]]:
    """Overall kept fraction of ``merged − base`` and, per tensor, ‖merged − base‖₁; asserts on the way that
    the result is a masked ``τ`` rescaled by one constant per tensor, ``s = ‖τ‖₁ / ‖m ⊙ τ‖₁`` (L1 rescale),
    up to the fp32 rounding of ``θ0 + s m τ``."""
    kept = total = 0
    l1: dict[str, float] = {}
    eps = torch.finfo(torch.float32).eps
    for name, b in base.items():
        b64 = b.double()
        delta = merged[name].double() - b64
        tau = expert[name].double() - b64
        mask = delta != 0
        if mask.any():
            scale = float(tau.abs().sum() / tau[mask].abs().sum())
            expected = torch.where(mask, scale * tau, torch.zeros_like(tau))
            bound = 4 * eps * (b64.abs() + expected.abs())
            assert bool(((delta - expected).abs() <= bound).all()), name
        kept += int(mask.sum())
        total += mask.numel()
        l1[name] = float(delta.abs().sum())
    return kept / total, l1


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_statistics_agree_with_mergekit(make_family, tmp_path: Path, method: str) -> None:
    """Random masks differ (mergekit: torch.bernoulli on the global RNG; ours: counter-based draws keyed by
    seed/method/tensor/model), so only the distribution can agree. With one expert and ``rescale: true`` (L1
    rescale) both must: keep ≈ density of the entries (within 5σ of the binomial), scale the kept ones by one
    constant per tensor, and give ‖θ − θ0‖₁ = ‖τ‖₁ per tensor exactly — so per-tensor L1 norms match."""
    density = 0.3
    base_dir, (expert_dir,) = make_family("llama", n_experts=1)
    cfg = ta_config(method, (base_dir, [expert_dir]), {"lambda": 1.0, "rescale": True, "normalize": False},
                    [{"density": density, "weight": 1.0}], seed=7)
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "mergekit", seed=7)
    base, expert = load_dir(base_dir), load_dir(expert_dir)
    frac_ours, l1_ours = _dare_statistics(ours, base, expert)
    frac_theirs, l1_theirs = _dare_statistics(theirs, base, expert)
    n = sum(t.numel() for t in base.values())
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(frac_ours - density) < 5 * sigma
    assert abs(frac_theirs - density) < 5 * sigma
    for name in base:
        tau_l1 = float((expert[name] - base[name]).double().abs().sum())
        assert l1_ours[name] == pytest.approx(tau_l1, rel=1e-5), name
        assert l1_ours[name] == pytest.approx(l1_theirs[name], rel=1e-5), name
    # the masks themselves are independent draws: their overlap is ≈ density², far from density
    name = "model.layers.0.mlp.up_proj.weight"
    same = ((ours[name] != base[name]) & (theirs[name] != base[name])).double().mean()
    assert float(same) < density * 0.6


# ------------------------------------------------------------------------------------------------ dtypes
def test_task_arithmetic_bf16_rounding(make_family, tmp_path: Path) -> None:
    """bf16 inputs (documented difference): ours computes in fp32 and rounds once, so it is within one bf16
    rounding (2⁻⁸ relative) of the exact result; mergekit computes in bf16, each of its ~T+3 operations
    rounding at the scale of its operands, so the two agree within ``(T+3)·2⁻⁸·(|θ0| + λ Σ|w_t τ_t|)``
    elementwise, not at fp32 tolerance."""
    lam = 0.7
    family = make_family("llama", dtype=torch.bfloat16)
    cfg = ta_config("task_arithmetic", family, {"lambda": lam}, weighted(("weight", WEIGHTS)))
    cfg["dtype"] = "bfloat16"
    ours, theirs = merge_both(cfg, tmp_path)
    base, experts = load_dir(family[0]), [load_dir(e) for e in family[1]]
    assert sorted(ours) == sorted(theirs) == sorted(base)
    u = 2.0**-8
    for name, b in base.items():
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16
        b64 = b.double()
        terms = [w * (e[name].double() - b64) for w, e in zip(WEIGHTS, experts, strict=True)]
        exact = b64 + lam * sum(terms)
        scale = b64.abs() + lam * sum(t.abs() for t in terms)
        tiny = torch.finfo(torch.bfloat16).tiny
        assert bool(((ours[name].double() - exact).abs() <= u * exact.abs() + 1e-6 * scale + tiny).all()), name
        bound = (len(terms) + 3) * u * scale + tiny
        assert bool(((ours[name].double() - theirs[name].double()).abs() <= bound).all()), name
