"""Numeric guards (issue #16): non-finite parameters are refused, fused kernels never turn NaN/Inf into finite
values, output-dtype overflow is an error (or clamped and counted), and 0-d tensors are merged like any other."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import neuromerge
from neuromerge import kernels, numeric
from neuromerge.cli import app
from neuromerge.engine import fused as fused_path
from neuromerge.engine.run import prepare
from neuromerge.errors import ConfigError, NeuromergeError, NonFiniteError
from neuromerge.functional import merge_state_dicts
from neuromerge.methods import available, registry
from neuromerge.methods.base import GlobalStats, MergeInput
from neuromerge.routing import build as routed_methods
from neuromerge.routing import build_config
from neuromerge.search import merge_run
from tests.helpers import write_config

runner = CliRunner()

STATIC_METHODS = sorted(n for n, cls in available().items() if not getattr(cls, "data_aware", False))


# ------------------------------------------------------------------------------------------- 0-d tensors (item 4)
def _clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A CLIP-shaped state dict (tiny): the 0-d ``logit_scale`` next to text / vision tower tensors."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02 + (0.1 * seed if seed else 0.0)

    return {
        "logit_scale": torch.tensor(2.6592 + 0.125 * seed),
        "text_model.embeddings.token_embedding.weight": r(50, 16),
        "text_model.embeddings.position_embedding.weight": r(8, 16),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        "text_model.encoder.layers.0.self_attn.q_proj.bias": r(16),
        "text_model.final_layer_norm.weight": r(16),
        "vision_model.embeddings.class_embedding": r(16),
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        "vision_model.encoder.layers.0.layer_norm1.weight": r(16),
        "visual_projection.weight": r(8, 16),
        "text_projection.weight": r(8, 16),
    }


@pytest.fixture
def clip_family(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and two experts saved as HF folders with ``model_type: clip``."""
    folders = []
    for i, name in enumerate(["base", "e0", "e1"]):
        d = tmp_path / "clip" / name
        d.mkdir(parents=True)
        save_file(_clip_state_dict(i), d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
        folders.append(d)
    return folders[0], folders[1:]


def _config(method: str, base: Path, experts: list[Path], **extra: object) -> dict[str, object]:
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts], **extra}


def _read(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_zero_dim_tensor_merges_with_every_static_method(clip_family, tmp_path: Path, method: str) -> None:
    """CLIP's ``logit_scale`` (shape ``[]``) is a point tensor: planned, dry-run, merged and written as ``[]``."""
    base, experts = clip_family
    experts = experts[: available()[method].max_models]  # passthrough, arcee_fusion and nearswap take one model
    cfg = _config(method, base, experts)
    plan = prepare(cfg)
    try:
        tp = next(t for t in plan.tensors if t.name == "logit_scale")
        assert tp.shape == () and tp.action == "merge" and tp.chunks == [(0, 1)]
        assert plan.peak_memory_estimate(2) > 0
    finally:
        plan.pool.close()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(cfg))
    res = runner.invoke(app, ["merge", str(cfg_path), "-o", str(tmp_path / "dry"), "--dry-run", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    neuromerge.merge(cfg, out, progress=False)
    merged = _read(out, "logit_scale")
    assert merged.shape == () and merged.dtype == torch.float32
    assert torch.isfinite(merged)
    b, e0, e1 = 2.6592, 2.6592 + 0.125, 2.6592 + 0.25
    expected = {"linear": (e0 + e1) / 2, "task_arithmetic": b + 0.3 * ((e0 - b) + (e1 - b)), "passthrough": e0}
    if method in expected:
        assert float(merged) == pytest.approx(expected[method], abs=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_zero_dim_tensor_torch_and_fused_paths(clip_family, tmp_path: Path, monkeypatch, native: bool) -> None:
    """The 0-d tensor through the fused kernel and through the torch path, merged (TIES without trim) and copied
    (excluded), in float16 and bfloat16."""
    from neuromerge import kernels

    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    base, experts = clip_family
    b, e0, e1 = 2.6592, 2.6592 + 0.125, 2.6592 + 0.25
    cfg = _config("ties", base, experts, parameters={"density": 1.0}, dtype="float16")
    neuromerge.merge(cfg, tmp_path / "m", progress=False)
    merged = _read(tmp_path / "m", "logit_scale")
    assert merged.shape == () and merged.dtype == torch.float16
    assert float(merged) == pytest.approx(b + ((e0 - b) + (e1 - b)) / 2, abs=2e-3)
    cfg = _config("ties", base, experts, exclude=["logit_scale"], dtype="bfloat16")
    neuromerge.merge(cfg, tmp_path / "c", progress=False)
    copied = _read(tmp_path / "c", "logit_scale")
    assert copied.shape == () and copied.dtype == torch.bfloat16
    assert float(copied) == float(torch.tensor(b).to(torch.bfloat16))


# ------------------------------------------------------------------------------- non-finite parameters (item 2)
def _fails(cfg: Path, out: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    """The CLI refuses: exit 2, one ``error:`` line holding every needle, no output and no temp folder."""
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "neuromerge-tmp" in p.name]
    return msg


@pytest.fixture
def family(make_family):
    return make_family("llama", n_experts=2)


def _yaml_config(path: Path, base: Path, experts: list[Path], method: str, model0: str, params: str) -> Path:
    """A config written as YAML text, so that YAML's own spellings (``.nan``, ``-.inf``, ``1.0e+400``) are read."""
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {experts[0]}\n    parameters: {model0}\n"
        f"  - model: {experts[1]}\nparameters: {params}\n"
    )
    return path


@pytest.mark.parametrize(("method", "model0", "params", "needle"), [
    ("ties", "{weight: .nan}", "{}", "models[0].parameters.weight = nan: must be a finite number"),
    ("ties", "{weight: .inf}", "{}", "models[0].parameters.weight = inf: must be a finite number"),
    ("task_arithmetic", "{weight: -.inf}", "{}", "models[0].parameters.weight = -inf: must be a finite number"),
    ("task_arithmetic", "{weight: 1.0e+400}", "{}", "models[0].parameters.weight = inf: must be a finite number"),
    ("task_arithmetic", "{weight: 1e400}", "{}", "models[0].parameters.weight = '1e400': must be a finite number"),
    ("task_arithmetic", "{weight: 1.0e+39}", "{}", "within float32's range"),
    ("ties", "{}", "{lambda: .nan}", "parameters.lambda = nan: must be a finite number"),
    ("ties", "{}", "{density: [0.2, .nan]}", "parameters.density = nan: must be a finite number"),
    ("ties", "{}", "{lambda: [{filter: mlp, value: .inf}, {value: 1.0}]}", "parameters.lambda = inf: must be"),
    ("ties", "{density: [{filter: mlp, value: [0.5, -.inf]}]}", "{}", "models[0].parameters.density = -inf"),
    ("breadcrumbs", "{}", "{gamma: .nan}", "parameters.gamma = nan: must be a finite number"),
    ("dare_ties", "{}", "{density: .nan}", "parameters.density = nan: must be a finite number"),
    ("neuromerging", "{}", "{lambda2: .inf}", "parameters.lambda2 = inf: must be a finite number"),
    ("neuromerging", "{}", "{lambda1: .nan}", "parameters.lambda1 = nan: must be a finite number"),
    ("slerp", "{}", "{t: .nan}", "parameters.t = nan: must be a finite number"),
    ("consensus", "{}", "{tall_lambda: .inf}", "parameters.tall_lambda = inf: must be a finite number"),
])
def test_nonfinite_parameters_are_refused(family, tmp_path: Path, method: str, model0: str, params: str,
                                          needle: str) -> None:
    """NaN / ±Inf / values YAML reads as infinite or float32 cannot hold are refused by the validator, with the
    parameter and where it was given, by a merge and by ``--dry-run``, before any weight is read."""
    base, experts = family
    cfg = _yaml_config(tmp_path / "c.yaml", base, experts, method, model0, params)
    _fails(cfg, tmp_path / "o", needle)
    _fails(cfg, tmp_path / "o", needle, extra=("--dry-run",))


def test_python_api_refuses_nonfinite_parameters(family, tmp_path: Path) -> None:
    """``neuromerge.merge`` with a dict, the in-memory API and a Params model built directly refuse NaN too."""
    base, experts = family
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(experts[0]), "parameters": {"weight": float("nan")}}, {"model": str(experts[1])}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight = nan: must be a finite number"):
        neuromerge.merge(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    sd = {"w": torch.zeros(4, 4)}
    with pytest.raises(ConfigError, match=r"parameters\.lambda = inf: must be a finite number"):
        merge_state_dicts("task_arithmetic", sd, [sd, sd], parameters={"lambda": math.inf})
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters\.weight = nan"):
        merge_state_dicts("ties", sd, [sd, sd], model_parameters=[{}, {"weight": math.nan}])
    with pytest.raises(pydantic.ValidationError, match="must be a finite number"):
        registry.get("ties").Params(weight=math.nan)


def _float_fields(model: type[pydantic.BaseModel]) -> list[str]:
    def has_float(annotation: object) -> bool:
        return annotation is float or any(has_float(a) for a in typing.get_args(annotation))

    return [name for name, info in model.model_fields.items() if has_float(info.annotation)]


PARAMETER_MODELS = sorted(
    {cls.Params for cls in available().values()} | {
        routed_methods.MinMergingParams, routed_methods.TwinParams, routed_methods.EMRParams,
        build_config.RouteBuildConfig, merge_run.SearchRunConfig,
    }, key=lambda m: m.__name__,
)


@pytest.mark.parametrize("model", PARAMETER_MODELS, ids=lambda m: m.__name__)
def test_every_float_parameter_is_a_finite_float(model: type[pydantic.BaseModel]) -> None:
    """Every float field of every method's parameters (static, data-aware, routed, MERGE search) is a
    :data:`~neuromerge.numeric.FiniteFloat`: NaN, ±Inf and 1e39 are refused with its message."""
    fields = _float_fields(model)
    for name in fields:
        for bad in (math.nan, math.inf, -math.inf, 1e39):
            value = [bad] if typing.get_origin(model.model_fields[name].annotation) is list else bad
            with pytest.raises(pydantic.ValidationError, match="must be a finite number") as err:
                model.model_validate({name: value})
            assert any(e["loc"][0] == name for e in err.value.errors()), err.value


# ---------------------------------------------------------------- fused kernels never hide NaN/Inf (item 2, audit)
def _chunk(dtype: torch.dtype, n: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(32, 64, generator=g) * 0.02).to(dtype)
    return base, [(base.float() + torch.randn(32, 64, generator=g) * 0.002).to(dtype) for _ in range(n)]


def _stats(base: torch.Tensor, models: list[torch.Tensor], keep: float) -> GlobalStats:
    thresholds = []
    for m in models:
        mags = (m.float() - base.float()).abs().flatten().sort(descending=True).values
        thresholds.append(float(mags[int(keep * mags.numel()) - 1]))
    n = base.numel()
    t = len(models)
    return GlobalStats(tuple(thresholds), (0.1,) * t, (1.0,) * t, (n // 3,) * t, (n,) * t)


FUSED_CASES = [
    ("task_arithmetic", {}), ("task_arithmetic", {"normalize": True}),
    ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "sign_method": "count", "zero_sign": "positive"}),
    ("ties", {"density": 1.0, "variant": "dis-sum"}), ("ties", {"density": 0.3, "zero_sign": "positive"}),
    ("neuromerging", {"density": 0.3, "lambda2": 1.0}),
    ("neuromerging", {"density": 0.3, "lambda2": 1.0, "lambda1": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "params"), FUSED_CASES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fused_kernels_never_turn_nonfinite_parameters_into_finite_output(method, params, dtype, bad) -> None:
    """Parameters forced past validation (``model_construct``): a NaN/Inf weight (of one model or all) or λ makes
    the fused output non-finite *and flagged*, as the torch path's output is non-finite — never a finite model (TIES'
    disjoint merge dropped a NaN in its ``p > 0 ? p : 0`` before)."""
    cls = registry.get(method)
    impl, P = cls(), cls.Params

    def forced(**over: object) -> pydantic.BaseModel:
        return P.model_construct(**{**P(**params).model_dump(), **over})

    base, models = _chunk(dtype)
    stats = _stats(base, models, 0.3)
    lam_field = {"task_arithmetic": "lam", "ties": "lam", "neuromerging": "lambda2"}[method]
    variants = [
        (forced(), [forced(weight=bad) if t == 1 else forced() for t in range(3)]),
        (forced(), [forced(weight=bad) for _ in range(3)]),
        (forced(**{lam_field: bad}), [forced(**{lam_field: bad}) for _ in range(3)]),
    ]
    for params_, per_model in variants:
        x = MergeInput(name="w", kind="neuronal", base=base, models=models, params=params_, per_model=per_model,
                       stats=stats, rows=(0, 32), full_shape=(32, 64))
        fused = fused_path.merge_fused(impl, x, dtype)
        assert fused is not None
        out, flagged = fused
        actual = int((~torch.isfinite(out.float())).sum())
        try:
            ref = impl.merge(MergeInput(name="w", kind="neuronal", base=base.float(),
                                        models=[m.float() for m in models], params=params_, per_model=per_model,
                                        stats=stats, rows=(0, 32), full_shape=(32, 64)))
        except torch.linalg.LinAlgError:  # NeuroMerging's torch eigh on NaN Gram matrices
            ref = None
        assert ref is None or not bool(torch.isfinite(ref).all())  # the torch path's output is not finite either
        assert flagged > 0 and flagged == actual, (flagged, actual)


def test_forced_nan_weight_is_an_error_on_the_fused_path(family, tmp_path: Path, monkeypatch) -> None:
    """With the validator bypassed, a TIES merge with ``weight: nan`` stops with the engine's NaN/Inf error on the
    fused path (it wrote a finite, wrong model with exit 0 before), as on the torch path."""
    assert kernels.available()
    base, experts = family
    monkeypatch.setattr(numeric, "check_finite", lambda value: value)
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(experts[0]), "parameters": {"weight": float("nan")}}, {"model": str(experts[1])}]}
    with pytest.raises(NeuromergeError, match="ties produced NaN/Inf in"):
        neuromerge.merge(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "neuromerging"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_model_weights_are_refused(family, tmp_path: Path, method: str, value: float) -> None:
    """A NaN/Inf entry in a model's weights (fp32 here) is refused on the fused path (``allow_nonfinite`` off)."""
    base, experts = family
    f = experts[1] / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.down_proj.weight"][5, 7] = value
    save_file(sd, f, metadata={"format": "pt"})
    params = {"density": 0.3} if method != "task_arithmetic" else {}
    cfg = write_config(tmp_path / "c.yaml", method, base, experts, parameters=params)
    with pytest.raises(NonFiniteError, match="1 NaN/Inf values"):
        neuromerge.merge(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_bf16_output_counts_values_that_round_to_inf() -> None:
    """A finite fp32 result above bfloat16's largest finite value (3.3895e38) rounds to Inf when stored: the kernel
    counts it (it counted the fp32 value before rounding, so it slipped through)."""
    base = torch.full((4,), 3.0e38)
    model = torch.tensor([3.4e38, 3.0e38, 3.39e38, 1.0])
    res = kernels.linear(base, [model], [1.0], 1.0, normalize_by=None, out_dtype=torch.bfloat16, row_len=4,
                         sample_first=0, sample_stride=1)
    assert res.out is not None
    stored_inf = int(torch.isinf(res.out.float()).sum())
    assert stored_inf >= 1 and res.nonfinite_out == stored_inf


# -------------------------------------------------------------------------------- output dtype overflow (item 3)
BIG = "model.layers.0.mlp.down_proj.weight"


def _set_entry(folder: Path, name: str, value: float, index: tuple[int, ...] = (3, 4)) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd[name][index] = value
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture
def fp32_family(make_family):
    """A base and two fp32 experts whose Task Arithmetic merge (λ 1) puts 70000 at ``BIG[3, 4]``."""
    base, experts = make_family("llama", n_experts=2, dtype=torch.float32)
    _set_entry(base, BIG, 0.0)
    _set_entry(experts[0], BIG, 70000.0)
    _set_entry(experts[1], BIG, 0.0)
    return base, experts


@pytest.mark.parametrize("native", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_fp16_overflow_is_an_error_naming_tensor_and_value(fp32_family, tmp_path, monkeypatch, native: bool,
                                                            method: str) -> None:
    """A merged value of 70000 with ``dtype: float16`` (largest finite 65504) was written as ``inf`` with exit 0;
    it is an error naming the tensor and the value, on the fused path and on the torch path."""
    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    base, experts = fp32_family
    # task_arithmetic: θ0 + 1 · (τ_0 + τ_1); linear (no base, not normalized): θ_0 + θ_1; 70000 at BIG[3, 4]
    params = {"lambda": 1.0} if method == "task_arithmetic" else {"normalize": False}
    cfg = write_config(tmp_path / "c.yaml", method, base if method == "task_arithmetic" else None, experts,
                       parameters=params, dtype="float16")
    _fails(cfg, tmp_path / "o", f"merged tensor '{BIG}'", "beyond float16's range", "the largest is 70000",
           "overflow: clamp")


@pytest.mark.parametrize("native", [True, False], ids=["fused", "torch"])
def test_fp16_overflow_clamp_is_counted(fp32_family, tmp_path, monkeypatch, native: bool) -> None:
    """``overflow: clamp`` writes the dtype's largest finite value and counts it per tensor and in total in
    ``merge_report.json``, with a warning; everything else is the plain conversion."""
    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    base, experts = fp32_family
    _set_entry(experts[0], BIG, -80000.0, (5, 6))
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, parameters={"lambda": 1.0},
                       dtype="float16", overflow="clamp")
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 values of 1 tensor(s) beyond float16's range were clamped" in res.output
    out = load_file(tmp_path / "o" / "model.safetensors")
    assert out[BIG].dtype == torch.float16
    assert float(out[BIG][3, 4]) == 65504.0 and float(out[BIG][5, 6]) == -65504.0
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    assert report["overflow"] == {"mode": "clamp", "clamped_values": 2, "tensors": {BIG: 2}}
    # no overflow: the section says so, and the bytes are the plain conversion's
    cfg = write_config(tmp_path / "c2.yaml", "task_arithmetic", base, experts, parameters={"lambda": 0.5},
                       dtype="float16", overflow="clamp")
    neuromerge.merge(cfg, tmp_path / "o2", progress=False)
    report = json.loads((tmp_path / "o2" / "merge_report.json").read_text())
    assert report["overflow"] == {"mode": "clamp", "clamped_values": 0, "tensors": {}}


def test_copied_base_value_beyond_fp16_is_an_error(fp32_family, tmp_path) -> None:
    """A copied tensor (excluded, or the base's value converted to a narrower dtype) that does not fit is the same
    error; ``overflow: clamp`` clamps and counts it."""
    base, experts = fp32_family
    _set_entry(base, "model.norm.weight", 1e6, (7,))
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, exclude=["norm"], dtype="float16")
    _fails(cfg, tmp_path / "o", "copied tensor 'model.norm.weight'", "the largest is 1e+06")
    cfg = write_config(tmp_path / "c2.yaml", "task_arithmetic", base, experts, exclude=["norm"], dtype="float16",
                       overflow="clamp")
    neuromerge.merge(cfg, tmp_path / "o2", progress=False)
    report = json.loads((tmp_path / "o2" / "merge_report.json").read_text())
    assert report["overflow"]["tensors"] == {"model.norm.weight": 1}
    assert float(load_file(tmp_path / "o2" / "model.safetensors")["model.norm.weight"][7]) == 65504.0


@pytest.mark.parametrize("native", [True, False], ids=["fused", "torch"])
def test_bf16_rounding_overflow_is_an_error(fp32_family, tmp_path, monkeypatch, native: bool) -> None:
    """A finite fp32 result above bfloat16's largest finite value rounds to Inf in bfloat16: the same error (the
    fused kernel's store did not count it, so it was written as ``inf`` with exit 0)."""
    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: None)
    base, experts = fp32_family
    _set_entry(base, BIG, 3.0e38)
    _set_entry(experts[0], BIG, 3.4e38)
    _set_entry(experts[1], BIG, 3.0e38)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, parameters={"lambda": 1.0},
                       dtype="bfloat16")
    _fails(cfg, tmp_path / "o", f"merged tensor '{BIG}'", "beyond bfloat16's range", "the largest is 3.4e+38")


def test_lora_factor_beyond_fp16_is_an_error(tmp_path) -> None:
    """The LoRA output path: a factor entry that float16 cannot hold is the same error, or clamped and counted."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers import save, tiny_model

    base = save(tiny_model("llama"), tmp_path / "base")
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(tiny_model("llama"), LoraConfig(init_lora_weights=False, r=2, lora_alpha=2,
                                                               target_modules=["q_proj"]))
        if i == 0:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = 1e6
        model.save_pretrained(tmp_path / f"ad{i}")
        adapters.append(tmp_path / f"ad{i}")
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, adapters, parameters={"lambda": 1.0},
                       dtype="float16", output={"format": "lora", "rank": "concat"})
    _fails(cfg, tmp_path / "o", "LoRA factor tensor", "lora_B", "beyond float16's range")
    cfg = write_config(tmp_path / "c2.yaml", "task_arithmetic", base, adapters, parameters={"lambda": 1.0},
                       dtype="float16", output={"format": "lora", "rank": "concat"}, overflow="clamp")
    neuromerge.merge(cfg, tmp_path / "o2", progress=False)
    report = json.loads((tmp_path / "o2" / "merge_report.json").read_text())
    assert report["overflow"]["clamped_values"] == 1
    (name,) = report["overflow"]["tensors"]
    assert "lora_B" in name


def test_in_memory_merge_refuses_fp16_overflow() -> None:
    """``merge_state_dicts`` writes each tensor in the base's dtype: a float16 overflow is the same error there."""
    base = {"w": torch.zeros(4, 4, dtype=torch.float16)}
    model = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    with pytest.raises(NeuromergeError, match="beyond float16's range"):
        merge_state_dicts("task_arithmetic", base, [model, model], parameters={"lambda": 1.0})


def test_decomposition_of_nonfinite_inputs_is_one_line(make_family, tmp_path: Path) -> None:
    """With `allow_nonfinite: true`, a NaN reaching TSV's SVD is a one-line error, not a LinAlgError traceback."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from neuromerge.cli import app
    from tests.helpers import write_config

    base, experts = make_family("llama", n_experts=2)
    f = experts[0] / "model.safetensors"
    sd = load_file(f)
    name = next(n for n, t in sd.items() if t.dim() == 2 and "proj" in n)
    sd[name][0, :] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    for method in ("tsv",):
        cfg = write_config(tmp_path / f"{method}.yaml", method, base, experts, allow_nonfinite=True)
        out = tmp_path / f"out-{method}"
        res = CliRunner().invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "failed on" in lines[0], res.output
        assert not out.exists()
