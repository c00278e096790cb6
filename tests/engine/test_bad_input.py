"""Bad input: a one-line error, exit code 2, and no output folder left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from neuromerge.cli import app
from tests.helpers import write_config

runner = CliRunner()


def _fails(cfg: Path, out: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "neuromerge-tmp" in p.name]
    return msg


def _edit_expert(expert: Path, edit) -> None:
    f = expert / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture
def family(make_family):
    return make_family("llama", n_experts=2)


def test_unknown_method(family, tmp_path: Path) -> None:
    base, experts = family
    _fails(write_config(tmp_path / "c.yaml", "tiess", base, experts), tmp_path / "o", "unknown merge method 'tiess'")


def test_unknown_and_out_of_range_parameter(family, tmp_path: Path) -> None:
    base, experts = family
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters={"densty": 0.2})
    _fails(cfg, tmp_path / "o", "unknown parameter 'densty'")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters={"density": 1.5})
    _fails(cfg, tmp_path / "o", "density")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters={"density": [0.5, -0.1]})
    _fails(cfg, tmp_path / "o", "density")


def test_unknown_top_level_key(family, tmp_path: Path) -> None:
    base, experts = family
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts, dtpye="float32"), tmp_path / "o", "dtpye")


def test_missing_file(family, tmp_path: Path) -> None:
    base, experts = family
    _fails(write_config(tmp_path / "c.yaml", "ties", base, [*experts, tmp_path / "nope"]), tmp_path / "o", "nope")


def test_truncated_shard(family, tmp_path: Path) -> None:
    base, experts = family
    f = experts[0] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts), tmp_path / "o", "truncated")


def test_missing_tensor(family, tmp_path: Path) -> None:
    base, experts = family
    _edit_expert(experts[1], lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts), tmp_path / "o",
           "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_mismatch(family, tmp_path: Path) -> None:
    base, experts = family

    def edit(sd):
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 31)

    _edit_expert(experts[0], edit)
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts), tmp_path / "o", "shape mismatch")


def test_non_floating_where_floating_expected(family, tmp_path: Path) -> None:
    base, experts = family

    def edit(sd):
        sd["model.norm.weight"] = torch.ones(32, dtype=torch.int64)

    _edit_expert(experts[0], edit)
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts), tmp_path / "o", "int64", "floating")


def test_nan_is_an_error_unless_allowed(family, tmp_path: Path) -> None:
    base, experts = family

    def edit(sd):
        sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")

    _edit_expert(experts[1], edit)
    _fails(write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts), tmp_path / "o", "NaN",
           "allow_nonfinite")
    cfg = write_config(tmp_path / "c2.yaml", "task_arithmetic", base, experts, allow_nonfinite=True)
    assert runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "ok"), "--no-progress"]).exit_code == 0


def test_quantized_and_gguf_inputs(family, tmp_path: Path) -> None:
    base, experts = family
    cfg_path = experts[0] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    cfg_path.write_text(json.dumps(cfg))
    _fails(write_config(tmp_path / "c.yaml", "ties", base, experts), tmp_path / "o", "quantized")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    _fails(write_config(tmp_path / "c.yaml", "ties", base, [gguf, experts[1]]), tmp_path / "o", "GGUF")


def test_vocab_mismatch_error_and_shared_mode(make_family, tmp_path: Path) -> None:
    from tests.helpers import perturb, tiny_model

    base, experts = make_family("llama", n_experts=1)
    big = tiny_model("llama")
    perturb(big, seed=5)
    big.resize_token_embeddings(100)
    big.save_pretrained(tmp_path / "big")
    experts = [*experts, tmp_path / "big"]
    _fails(write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts), tmp_path / "o", "vocab")
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, vocab="shared")
    out = tmp_path / "shared"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    got = load_file(out / "model.safetensors")
    big_sd = load_file(tmp_path / "big" / "model.safetensors")
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (100, 32)
    assert torch.equal(emb[96:], big_sd["model.embed_tokens.weight"][96:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 100


def test_slerp_needs_two_models(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=3)
    _fails(write_config(tmp_path / "c.yaml", "slerp", base, experts), tmp_path / "o", "slerp", "2")


def test_output_exists_needs_force(family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts)
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exit_code == 2 and "--force" in res.output
    assert (out / "keep.txt").read_text() == "precious"
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", "--force"])
    assert res.exit_code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_that_needs_code_is_refused(family, tmp_path: Path) -> None:
    base, experts = family
    bad = tmp_path / "binmodel"
    bad.mkdir()
    shutil.copy(experts[0] / "config.json", bad / "config.json")
    torch.save({"model.norm.weight": _Evil()}, bad / "pytorch_model.bin")
    _fails(write_config(tmp_path / "c.yaml", "ties", base, [bad, experts[1]]), tmp_path / "o", "pytorch_model.bin")


def test_bin_weights_are_read_safely(family, tmp_path: Path) -> None:
    base, experts = family
    binm = tmp_path / "binmodel"
    binm.mkdir()
    shutil.copy(experts[0] / "config.json", binm / "config.json")
    torch.save(load_file(experts[0] / "model.safetensors"), binm / "pytorch_model.bin")
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, [binm, experts[1]])
    cfg_st = write_config(tmp_path / "c2.yaml", "task_arithmetic", base, experts)
    for c, o in ((cfg, "a"), (cfg_st, "b")):
        assert runner.invoke(app, ["merge", str(c), "-o", str(tmp_path / o), "--no-progress"]).exit_code == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_merge_leaves_no_output(make_family, tmp_path: Path) -> None:
    """SIGKILL in the middle of a merge: the output path must not exist afterwards."""
    base, experts = make_family("llama", n_experts=3)
    cfg = write_config(tmp_path / "c.yaml", "neuromerging", base, experts)
    out = tmp_path / "killed"
    code = (
        "import sys, time\n"
        "import neuromerge.engine.run as r\n"
        "orig = r._merge_chunk\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.2)\n"
        "    print('chunk', flush=True)\n"
        "    return orig(*a, **k)\n"
        "r._merge_chunk = slow\n"
        f"r.merge({str(cfg)!r}, {str(out)!r}, threads=1, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "chunk"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    # SIGTERM is cleaned up completely, temp folder included
    proc = subprocess.Popen([sys.executable, "-c", "from neuromerge.io.writer import install_signal_cleanup;"
                             "install_signal_cleanup()\n" + code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "chunk"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "killed" in p.name and p.name != "killed" and proc.pid
                and str(proc.pid) in p.name]


def test_missing_tokenizer_is_a_warning(family, tmp_path: Path) -> None:
    base, experts = family
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts)
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0
    assert "tokenizer" in res.output


def test_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: [unclosed\n")
    _fails(p, tmp_path / "o", "invalid YAML")
    p.write_text(yaml.safe_dump({"merge_method": "ties", "models": []}))
    _fails(p, tmp_path / "o", "models")
