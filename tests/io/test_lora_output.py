"""Merging PEFT LoRA adapters into a LoRA adapter (``output: {format: lora, rank: r | concat}``): the written
adapter, loaded by PEFT onto the base, is checked against the engine's full-model merge of the same pool, and the
reported discarded energies against an independent numpy SVD of the merged ``ΔW``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neuromerge import merge
from neuromerge.cli import app
from neuromerge.config import load_config, with_output
from neuromerge.errors import CompatibilityError, ConfigError, NeuromergeError
from neuromerge.tensors.lowrank import concat_factors, truncated_svd_factors
from tests.helpers import save, tiny_model

runner = CliRunner()
#: adapters of the pool: ranks, rsLoRA, alpha_pattern, overlapping and disjoint targets, an embedding target
ADAPTERS: list[dict[str, Any]] = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 2, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "up_proj"]},
    {"r": 3, "lora_alpha": 3, "target_modules": ["v_proj", "embed_tokens"],
     "alpha_pattern": {"layers.1.self_attn.v_proj": 12}},
]
WEIGHTS = (0.5, 1.0, 1.5)


def _make_adapter(folder: Path, seed: int, base_ref: str, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_ref}))
    return folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("lora_pool")
    base = save(tiny_model("llama"), root / "base")
    yield base, [_make_adapter(root / f"ad{i}", 10 + i, str(base), **kw) for i, kw in enumerate(ADAPTERS)]


def _config(base: Path, adapters: list[Path], method: str, output: dict[str, Any] | None = None,
            **parameters: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": method, "base_model": str(base), "parameters": parameters,
        "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, WEIGHTS, strict=False)],
    }
    if output is not None:
        cfg["output"] = output
    return cfg


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The written adapter loaded by PEFT onto the base and merged into it (``merge_and_unload``)."""
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert set(want) <= set(got)
    for name, w in want.items():
        torch.testing.assert_close(got[name].float(), w.float(), rtol=0, atol=atol, msg=name)


def _rel_energy_tail(matrix: torch.Tensor, rank: int) -> float:
    """Independent reference: numpy float64 singular values, Σ_{i>r} σ² / Σ σ²."""
    s = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    return float((s[rank:] ** 2).sum() / (s**2).sum())


# --------------------------------------------------------------------------------------------- pure functions
def test_truncated_svd_factors_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 5, generator=g) @ torch.randn(5, 9, generator=g) + 0.01 * torch.randn(12, 9, generator=g)
    for rank in (1, 3, 5, 9, 20):
        a, b, lost = truncated_svd_factors(delta, rank)
        r = min(rank, 9)
        assert a.shape == (r, 9) and b.shape == (12, r)
        assert lost == pytest.approx(_rel_energy_tail(delta, r), abs=1e-6)
        residual = float((delta.double() - b.double() @ a.double()).square().sum() / delta.double().square().sum())
        assert residual == pytest.approx(lost, abs=1e-6)
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))  # symmetric split: ‖A_i‖ = ‖B_i‖ = √σ_i
    assert truncated_svd_factors(delta, 5)[2] < 1e-4 < truncated_svd_factors(delta, 4)[2]
    assert truncated_svd_factors(torch.zeros(3, 4), 2)[2] == 0.0
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_factors(delta, 0)


def test_concat_factors_is_the_weighted_sum_of_products() -> None:
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(r, 7, generator=g), torch.randn(6, r, generator=g)) for r in (2, 3, 1)]
    coef = [0.5, -2.0, 3.0]
    a, b = concat_factors(pairs, coef)
    assert a.shape == (6, 7) and b.shape == (6, 6)
    expected = torch.zeros(6, 7, dtype=torch.float64)
    for (at, bt), c in zip(pairs, coef, strict=True):  # explicit loop over entries of each rank-1 term
        for k in range(at.shape[0]):
            expected += c * torch.outer(bt[:, k].double(), at[k].double())
    torch.testing.assert_close(b.double() @ a.double(), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- merges
@pytest.mark.peers
def test_concat_task_arithmetic_equals_full_merge(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = pool
    full = merge(_config(base, adapters, "task_arithmetic", **{"lambda": 0.7}), tmp_path / "full", threads=1)
    res = merge(_config(base, adapters, "task_arithmetic", {"format": "lora", "rank": "concat"}, **{"lambda": 0.7}),
                tmp_path / "lora", threads=1)
    out = tmp_path / "lora"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "merge_report.json", "provenance.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(base) and not cfg["use_rslora"]
    # ranks add up where targets overlap: q_proj 4 + 2, v_proj 4 + 3, up_proj 2, embed_tokens 3
    factors = load_file(out / "adapter_model.safetensors")
    ranks = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]: v.shape
             for k, v in factors.items() if "lora_A" in k or "lora_embedding_A" in k}
    assert ranks["model.layers.0.self_attn.q_proj"][0] == 6 and ranks["model.layers.1.self_attn.v_proj"][0] == 7
    assert ranks["model.layers.1.mlp.up_proj"][0] == 2 and ranks["model.embed_tokens"] == (3, 96)
    assert len(ranks) == 2 * 3 + 1 and res.report["lora"]["discarded_energy"] == 0.0

    reference = load_file(full.out / "model.safetensors")
    _assert_same_weights(_peft_merged(base, out), reference, atol=2e-6)
    base_sd = load_file(base / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reference[q], base_sd[q])  # the adapters really change it


@pytest.mark.peers
@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5, "lambda": 1.0, "scope": "tensor"}),
                                                ("neuromerging", {"density": 0.5, "scope": "tensor"})])
def test_svd_rank_reports_the_discarded_energy(pool: tuple[Path, list[Path]], tmp_path: Path, method: str,
                                               params: dict[str, Any]) -> None:
    base, adapters = pool
    rank = 2
    # row chunks (NeuroMerging; TIES with scope tensor needs whole tensors): ΔW assembled from several chunks
    full = merge(_config(base, adapters, method, **params), tmp_path / "full", threads=2, chunk_elements=256)
    res = merge(_config(base, adapters, method, {"format": "lora", "rank": rank}, **params), tmp_path / "lora",
                threads=2, chunk_elements=256)
    merged = load_file(full.out / "model.safetensors")
    base_sd = load_file(base / "model.safetensors")
    recon = _peft_merged(base, tmp_path / "lora")
    per_module = res.report["lora"]["per_module"]
    assert len(per_module) == 7 and res.report["lora"]["rank"] == rank
    num = den = 0.0
    for module, rep in per_module.items():
        name = f"{module}.weight"
        delta = (merged[name].double() - base_sd[name].double())
        delta = delta.t() if "embed" in module else delta  # PEFT's M for embeddings is ΔWᵀ
        tail = _rel_energy_tail(delta, rank)
        assert rep["discarded_energy"] == pytest.approx(tail, abs=1e-5), module
        assert 1e-3 < tail < 1.0  # TIES / NeuroMerging output is not rank 2: something is really discarded
        err = float((recon[name].double() - merged[name].double()).square().sum() / delta.square().sum())
        assert err == pytest.approx(rep["discarded_energy"], abs=1e-4), module  # PEFT's merge misses exactly that
        num, den = num + tail * float(delta.square().sum()), den + float(delta.square().sum())
    assert res.report["lora"]["discarded_energy"] == pytest.approx(num / den, abs=1e-5)
    for name in base_sd:  # untargeted tensors stay the base's
        if not any(name.startswith(m) for m in per_module):
            torch.testing.assert_close(recon[name], base_sd[name], rtol=0, atol=0)


@pytest.mark.peers
def test_rank_at_least_the_true_rank_discards_nothing(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = pool
    full = merge(_config(base, adapters, "task_arithmetic"), tmp_path / "full", threads=1)
    res = merge(_config(base, adapters, "task_arithmetic", {"format": "lora", "rank": 8}), tmp_path / "lora",
                threads=1)
    assert res.report["lora"]["discarded_energy"] < 1e-10
    assert max(r["discarded_energy"] for r in res.report["lora"]["per_module"].values()) < 1e-10
    _assert_same_weights(_peft_merged(base, tmp_path / "lora"), load_file(full.out / "model.safetensors"), atol=1e-5)


def test_cli_flags_override_the_config(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    import yaml

    base, adapters = pool
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(_config(base, adapters[:2], "dare_linear", density=0.7)))
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(path), "-o", str(out), "--rank", "3", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "LoRA adapter: 6 modules, rank 3, discarded energy" in res.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    report = json.loads((out / "merge_report.json").read_text())
    assert report["summary"]["output"] == {"format": "lora", "rank": 3, "modules": 6, "dropped_modules": []}
    res = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "dry"), "--output-format", "lora",
                              "--rank", "concat", "--dry-run"])
    assert res.exit_code == 2 and "rank concat" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "dry").exists()
    cfg = with_output(load_config(_config(base, adapters, "ties", {"format": "lora", "rank": 4})), "full")
    assert cfg.output.format == "full" and cfg.output.rank is None


# --------------------------------------------------------------------------------------------- bad input
def _refused(cfg: dict[str, Any], out: Path, error: type[NeuromergeError], needle: str) -> None:
    with pytest.raises(error, match=needle) as info:
        merge(cfg, out, threads=1)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.neuromerge-*"))


def test_bad_inputs_are_one_line_errors_and_write_nothing(pool: tuple[Path, list[Path]], tmp_path: Path,
                                                          make_family: Any) -> None:
    base, adapters = pool
    out = tmp_path / "out"
    lora = {"format": "lora", "rank": 2}
    _refused(_config(base, adapters, "ties", {"format": "lora", "rank": "concat"}), out, ConfigError,
             "rank concat is exact only")
    _refused(_config(base, adapters, "ties", {"format": "lora", "rank": 0}), out, ConfigError, "rank must be")
    _refused(_config(base, adapters, "ties", {"format": "lora"}), out, ConfigError, "needs a rank")
    _refused(_config(base, adapters, "ties", {"format": "full", "rank": 3}), out, ConfigError, "format lora only")
    _, experts = make_family("llama", n_experts=1)
    _refused(_config(base, [adapters[0], experts[0]], "ties", lora), out, CompatibilityError, "full checkpoint")
    # linear without normalisation and Σw = 0.5 + 1 scales the untargeted tensors too: refused at planning
    cfg = _config(base, adapters[:2], "linear", lora, normalize=False)
    _refused(cfg, out, ConfigError, "scales the base")
    cfg["output"] = {"format": "lora", "rank": "concat"}
    _refused(cfg, out, ConfigError, "scales the base")


def test_adapters_of_different_bases_are_refused(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, _ = pool
    a = _make_adapter(tmp_path / "a", 1, "org/base-a", r=2, target_modules=["q_proj"])
    b = _make_adapter(tmp_path / "b", 2, "org/base-b", r=2, target_modules=["q_proj"])
    _refused(_config(base, [a, b], "task_arithmetic", {"format": "lora", "rank": "concat"}), tmp_path / "out",
             CompatibilityError, "different base models")
    c = _make_adapter(tmp_path / "c", 3, "org/base-a", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _refused(_config(base, [a, c], "task_arithmetic", {"format": "lora", "rank": 2}), tmp_path / "out",
             CompatibilityError, "modules_to_save")
    # a GPT-2 adapter over the Llama base: its targets do not exist there
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "g")
    _refused(_config(base, [a, tmp_path / "g"], "task_arithmetic", {"format": "lora", "rank": 2}), tmp_path / "out",
             CompatibilityError, "c_attn")


@pytest.mark.peers
def test_gpt2_fan_in_fan_out_round_trip(tmp_path: Path) -> None:
    """Conv1D (stored in×out, ``fan_in_fan_out``): the written factors use PEFT's orientation."""
    from peft import LoraConfig, get_peft_model

    base = save(tiny_model("gpt2"), tmp_path / "base")
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                               fan_in_fan_out=True, init_lora_weights=False))
        model.save_pretrained(tmp_path / f"ad{i}")
        adapters.append(tmp_path / f"ad{i}")
    full = merge(_config(base, adapters, "task_arithmetic"), tmp_path / "full", threads=1)
    for rank in ("concat", 4):
        out = tmp_path / f"lora{rank}"
        res = merge(_config(base, adapters, "task_arithmetic", {"format": "lora", "rank": rank}), out, threads=1)
        assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        assert res.report["lora"]["discarded_energy"] < 1e-10
        import transformers as tf
        from peft import PeftModel

        merged = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
        want = load_file(full.out / "model.safetensors")
        got = merged.state_dict()
        for name in want:
            if "c_attn.weight" in name or "c_fc.weight" in name:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    assert math.isfinite(res.report["lora"]["discarded_energy"])
