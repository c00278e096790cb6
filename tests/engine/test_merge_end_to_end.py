"""End-to-end merges of tiny transformers models through the CLI and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuromerge
from neuromerge import TaskVector, Weights
from neuromerge.cli import app
from neuromerge.functional import merge_state_dicts
from tests.helpers import write_config

runner = CliRunner()


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_cli_merge_loads_and_matches_in_memory_merge(make_family, tmp_path: Path, arch: str) -> None:
    import transformers as tf

    base, experts = make_family(arch)
    cfg = write_config(tmp_path / "m.yaml", "neuromerging", base, experts, parameters={"density": 0.3})
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--threads", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    for f in ("merge_report.json", "provenance.json", "README.md", "config.json"):
        assert (out / f).is_file(), f

    auto = {"llama": tf.AutoModelForCausalLM, "gpt2": tf.AutoModelForCausalLM,
            "bert": tf.AutoModelForSequenceClassification}[arch]
    merged_model = auto.from_pretrained(out).eval()
    # independent in-memory merge of the same state dicts
    base_sd = Weights.load(base)
    sds = [Weights.load(e) for e in experts]
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    expected = merge_state_dicts("neuromerging", base_sd, sds, parameters={"density": 0.3}, model_type=model_type)
    ref = auto.from_pretrained(base).eval()
    _, unexpected = ref.load_state_dict(expected, strict=False)
    assert not unexpected
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
        base_logits = auto.from_pretrained(base).eval()(input_ids=ids).logits
    assert not torch.equal(merged_model(input_ids=ids).logits, base_logits)


def test_task_arithmetic_output_is_formula(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", base, experts, parameters={"lambda": 0.5})
    out = tmp_path / "ta"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    got = _load_dir(out)
    b, e0, e1 = (Weights.load(p) for p in (base, *experts))
    expected = (0.5 * ((e0 - b) + (e1 - b))).apply_to(b)
    assert set(got) == set(b)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_task_vector_algebra(make_family) -> None:
    base, (a, b) = make_family("llama", n_experts=2)
    wb, wa, wbb = Weights.load(base), Weights.load(a), Weights.load(b)
    tau = (wa - wb) + (wbb - wb)
    assert isinstance(tau, TaskVector)
    merged = (0.5 * tau).apply_to(wb)
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[k], wb[k] + 0.5 * ((wa[k] - wb[k]) + (wbb[k] - wb[k])))
    assert sum([wa - wb, wbb - wb]).norm() == pytest.approx(tau.norm())
    torch.testing.assert_close((-(wa - wb)).apply_to(wa)[k], wb[k], atol=1e-6, rtol=0)


def test_bf16_inputs_written_in_base_dtype_unless_told(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2, dtype=torch.bfloat16)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts)
    out = tmp_path / "bf16"
    assert runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"]).exit_code == 0
    assert {t.dtype for t in _load_dir(out).values()} == {torch.bfloat16}
    cfg32 = write_config(tmp_path / "c32.yaml", "ties", base, experts, dtype="float32")
    out32 = tmp_path / "fp32"
    assert runner.invoke(app, ["merge", str(cfg32), "-o", str(out32), "--no-progress"]).exit_code == 0
    assert {t.dtype for t in _load_dir(out32).values()} == {torch.float32}
    assert json.loads((out32 / "config.json").read_text())["torch_dtype"] == "float32"


def test_report_and_provenance(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters={"density": 0.2})
    out = tmp_path / "o"
    assert runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"]).exit_code == 0
    rep = json.loads((out / "merge_report.json").read_text())
    assert set(rep["timings_s"]) >= {"plan", "statistics", "merge", "finalize"}
    assert rep["peak_rss_bytes"] > 0 and rep["bytes_read"] > 0 and rep["bytes_written"] > 0
    dens = rep["global_statistics"]["kept_density"]
    assert all(0.19 < d < 0.21 for d in dens), dens
    assert "sign_conflict" in rep["overall"]
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["inputs"]) == 3 and all(len(i["header_sha256"]) == 64 for i in prov["inputs"])
    assert prov["config"]["merge_method"] == "ties" and prov["seed"] == 0


def test_dry_run_writes_nothing_and_reports_plan(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", base, experts)
    out = tmp_path / "never"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "peak memory" in res.output and "output size" in res.output and "merged" in res.output
    assert not out.exists()


def test_mergekit_config_with_gradient_and_filters(make_family, tmp_path: Path) -> None:
    """A mergekit config accepted as is: per-layer gradient lists, filters, normalize / int8_mask."""
    import yaml

    base, experts = make_family("llama", n_experts=2)
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(experts[0]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": str(experts[1]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.5, 0.7, 1]}},
        ],
        "parameters": {"normalize": True, "int8_mask": True, "scope": "tensor"},
        "dtype": "float32",
    }
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "mk"
    res = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    # layer 0 of expert 1 has weight 0: its contribution vanishes there, layer 1 (t=1) has weight 1
    got = _load_dir(out)
    e0 = Weights.load(experts[0])
    k0 = "model.layers.0.self_attn.q_proj.weight"
    # at layer 0 expert 0 has density 1 and expert 1 weight 0: TIES of a single full vector is that vector
    torch.testing.assert_close(got[k0], e0[k0], atol=1e-6, rtol=0)


def test_threads_and_chunking_give_bitwise_identical_output(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=3)
    for method, params in [("neuromerging", {"density": 0.3}), ("ties", {"density": 0.2}),
                           ("dare_ties", {"density": 0.5})]:
        cfg = write_config(tmp_path / f"{method}.yaml", method, base, experts, parameters=params, seed=7)
        outs = []
        for threads, chunk in [(1, 16), (2, 16), (2, 1)]:
            out = tmp_path / f"{method}-{threads}-{chunk}"
            res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--threads", str(threads),
                                      "--chunk-mb", str(chunk), "--no-progress"])
            assert res.exit_code == 0, res.output
            outs.append(_load_dir(out))
        for other in outs[1:]:
            for k in outs[0]:
                assert torch.equal(outs[0][k], other[k]), (method, k)


@pytest.mark.parametrize("method", ["neuromerging", "ties"])
@pytest.mark.parametrize("window", [False, True])
def test_global_threshold_is_exact(make_family, tmp_path: Path, monkeypatch, method, window) -> None:
    """Thresholds, kept counts and removed L1 fractions against a sort of the concatenated magnitudes: with the
    two-pass radix select (few chunks), and with many small chunks, where a sample predicts a window and one full
    pass suffices (TIES: no L1 mass, the window pass alone; NeuroMerging: the window beside the high histograms)."""
    from neuromerge.engine import stats as engine_stats
    from neuromerge.tensors.selection import kept_count

    base, experts = make_family("bert", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", method, base, experts, parameters={"density": 0.13})
    out = tmp_path / "o"
    if window:
        passes: list[int] = []
        histogram_pass = engine_stats._histogram_pass
        monkeypatch.setattr(engine_stats, "_histogram_pass",
                            lambda jobs, *a: passes.append(len(jobs)) or histogram_pass(jobs, *a))
        neuromerge.merge(cfg, out, chunk_elements=256)
        assert len(passes) == 2 and passes[0] < passes[1]  # the sample, then one read of everything
    else:
        assert runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"]).exit_code == 0
    stats = json.loads((out / "merge_report.json").read_text())["global_statistics"]
    b = Weights.load(base)
    heads = ("classifier", "bert.pooler.dense")
    merged_names = [k for k, v in b.items() if v.is_floating_point() and not k.startswith(heads)]
    for t, e in enumerate(experts):
        w = Weights.load(e)
        mags = torch.cat([(w[k].float() - b[k].float()).abs().reshape(-1) for k in merged_names])
        k = kept_count(mags.numel(), 0.13)
        thr = torch.sort(mags, descending=True).values[k - 1].item()
        assert stats["thresholds"][t] == thr
        assert stats["kept"][t] == int((mags >= thr).sum())
        if method == "neuromerging":
            removed = float(mags[mags < thr].double().sum() / mags.double().sum())
            assert stats["removed_l1_fraction"][t] == pytest.approx(removed, rel=1e-9)


def test_lora_adapters_as_pool_members(tmp_path: Path) -> None:
    """PEFT adapter folders merge like full checkpoints: TA of two adapters equals TA of their merged models."""
    import peft

    from tests.helpers import tiny_model

    base_model = tiny_model("llama")
    base_model.save_pretrained(tmp_path / "base")
    adapters, full = [], []
    for i in range(2):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pm = peft.get_peft_model(tiny_model("llama"), cfg)
        pm.save_pretrained(tmp_path / f"adapter{i}")
        full.append({k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()})
        adapters.append(tmp_path / f"adapter{i}")
    cfg_path = write_config(tmp_path / "c.yaml", "task_arithmetic", tmp_path / "base", adapters,
                            parameters={"lambda": 0.5})
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(cfg_path), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    got = _load_dir(out)
    base_sd = Weights.load(tmp_path / "base")
    expected = merge_state_dicts("task_arithmetic", base_sd, full, parameters={"lambda": 0.5})
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[k], base_sd[k])
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["neuromerging", "ties"])
def test_per_tensor_trim_is_never_row_chunked(tmp_path: Path, method: str) -> None:
    """scope: tensor ranks a whole tensor's entries: a 1 MiB chunk budget must give the unchunked result."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = {"w.weight": torch.randn(640, 512, generator=g)}  # 1.25 MiB of fp32: chunked under --chunk-mb 1
    paths = []
    for i, state in enumerate([base] + [{k: v + 0.1 * torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()}
                                        for _ in range(3)]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    cfg = write_config(tmp_path / "cfg.yaml", method, paths[0], paths[1:], parameters={"density": 0.2,
                                                                                       "scope": "tensor"})
    outs = []
    for chunk in (1, 64):
        out = tmp_path / f"out-{chunk}"
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--chunk-mb", str(chunk), "--no-progress"])
        assert res.exit_code == 0, res.output
        outs.append(_load_dir(out))
    assert torch.equal(outs[0]["w.weight"], outs[1]["w.weight"])
    expected = merge_state_dicts(method, base, [load_file(str(p)) for p in paths[1:]],
                                 parameters={"density": 0.2, "scope": "tensor"})
    assert torch.equal(outs[0]["w.weight"], expected["w.weight"].to(outs[0]["w.weight"].dtype))


def test_console_entry_point_exits_with_the_command_status(make_family, tmp_path: Path) -> None:
    """``neuromerge merge`` as a process (``main`` ends it with ``os._exit`` after the command returned): a merge
    exits 0 with its output complete and its summary printed; a bad config exits 2 with the error on stderr."""
    import subprocess
    import sys

    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "ta.yaml", "task_arithmetic", base, experts)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "neuromerge.cli", "merge"]
    ok = subprocess.run([*cmd, str(cfg), "-o", str(out), "--no-progress"], capture_output=True, text=True,
                        timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "merged" in ok.stdout and json.loads((out / "merge_report.json").read_text())["summary"]
    assert _load_dir(out).keys() == _load_dir(base).keys()
    bad = subprocess.run([*cmd, str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o2")], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr and not (tmp_path / "o2").exists()


def test_cli_chunk_default_is_the_engine_default() -> None:
    from neuromerge.cli import CHUNK_MB
    from neuromerge.engine.plan import DEFAULT_CHUNK_ELEMENTS

    assert CHUNK_MB * 2**20 // 4 == DEFAULT_CHUNK_ELEMENTS
