"""What a mergekit user's configs and commands need beyond the methods: keys mergekit ignores, ``MODEL+LORA``
references, and the ``mergekit-yaml`` command line (``neuromerge mergekit-yaml`` / ``neuromerge-yaml``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.errors import CheckpointError, ConfigError
from neuromerge.mergekit_cli import ignored_flag_notes, parse_kmb
from tests.helpers import perturb, save, tiny_model

runner = CliRunner()


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_weight_on_an_unweighted_method_is_a_warning_and_changes_nothing(make_family, tmp_path: Path,
                                                                          method: str) -> None:
    base, experts = make_family("llama", n_experts=2 if method == "slerp" else 3)
    params = {"t": 0.4} if method == "slerp" else {}
    plain = {"merge_method": method, "base_model": str(base), "parameters": params,
             "models": [{"model": str(e)} for e in experts]}
    weighted = {**plain, "models": [{"model": str(e), "parameters": {"weight": 0.3 + i}}
                                    for i, e in enumerate(experts)],
                "parameters": {**params, "weight": 0.7}}
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "w.yaml", weighted)), "-o", str(tmp_path / "w"),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"merge method {method!r} does not use 'weight'; ignored" in res.output
    assert res.output.count("does not use 'weight'") == 1 + len(experts)  # one line per place it was given
    ours = neuromerge.merge(plain, tmp_path / "p", progress=False)
    assert not any("does not use" in w for w in ours.report["warnings"])
    a, b = _load_dir(tmp_path / "w"), _load_dir(tmp_path / "p")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_unknown_keys_stay_errors(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5, "densty": 0.2},
           "models": [{"model": str(e)} for e in experts]}
    with pytest.raises(ConfigError, match="unknown parameter 'densty'"):
        neuromerge.merge(cfg, tmp_path / "o", progress=False)
    # weight stays meaningful (and checked) where the method reads it
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
           "parameters": {"weight": float("nan")}}
    with pytest.raises(ConfigError, match="weight"):
        neuromerge.merge(cfg, tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------------- MODEL+LORA
@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A base, a full fine-tune of it, a LoRA adapter trained on the fine-tune, and a second expert."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("applied")
    base = save(tiny_model("llama"), root / "base")
    tuned = tiny_model("llama")
    perturb(tuned, 1)
    tuned_dir = save(tuned, root / "tuned")
    other = tiny_model("llama")
    perturb(other, 2)
    other_dir = save(other, root / "other")
    torch.manual_seed(3)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                          target_modules=["q_proj", "up_proj"]))
    lora.save_pretrained(root / "lora")
    cfg = json.loads((root / "lora" / "adapter_config.json").read_text())
    (root / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tuned_dir)}))
    return base, tuned_dir, root / "lora", other_dir


def _peft_applied(model: Path, lora: Path) -> dict[str, torch.Tensor]:
    import transformers as tf
    from peft import PeftModel

    merged = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model), lora).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_model_plus_lora_reads_the_adapter_applied_to_the_model(applied, tmp_path: Path) -> None:
    base, tuned, lora, other = applied
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 1.0},
           "models": [{"model": f"{tuned}+{lora}"}, {"model": str(other)}], "dtype": "float32"}
    got = _load_dir(neuromerge.merge(cfg, tmp_path / "out", progress=False).out)
    applied_sd = _peft_applied(tuned, lora)
    b, o = load_file(base / "model.safetensors"), load_file(other / "model.safetensors")
    changed = 0
    for name, ref_model in applied_sd.items():
        if name not in got:
            continue
        want = b[name] + (ref_model - b[name]) + (o[name] - b[name])
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
        changed += int(not torch.equal(ref_model, load_file(tuned / "model.safetensors")[name]))
    assert changed == 4  # q_proj and up_proj of both layers carry the adapter


@pytest.mark.peers
def test_model_plus_lora_equals_mergekit(applied, tmp_path: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, tuned, lora, other = applied
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": f"{tuned}+{lora}"}, {"model": str(other)}], "dtype": "float32"}
    ours = _load_dir(neuromerge.merge({**cfg, "parameters": {**cfg["parameters"], "scope": "tensor"}},
                                      tmp_path / "ours", progress=False).out)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              options=MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                                   lora_merge_cache=str(tmp_path / "cache")))
    theirs = _load_dir(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_model_plus_lora_references(applied, tmp_path: Path) -> None:
    base, tuned, lora, other = applied
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(other)}]}
    for ref, match in [(f"{tuned}+{other}", "not a PEFT LoRA adapter folder"),
                       (f"{tuned}+{lora}+{lora}", "expected MODEL\\+LORA"),
                       (f"{tuned}+", "expected MODEL\\+LORA")]:
        with pytest.raises(CheckpointError, match=match):
            neuromerge.merge({**cfg, "models": [{"model": ref}, *cfg["models"]]}, tmp_path / "o", progress=False)
    lora_out = {**cfg, "models": [{"model": f"{tuned}+{lora}"}], "output": {"format": "lora", "rank": 2}}
    with pytest.raises(neuromerge.errors.CompatibilityError, match="applies an adapter to another model"):
        neuromerge.merge(lora_out, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- mergekit-yaml
def test_parse_kmb_and_flag_notes() -> None:
    assert [parse_kmb(v) for v in ("1000", "5k", "500M", "5B")] == [1000, 5000, 500_000_000, 5_000_000_000]
    for bad in ("", "5x", "-3", "0"):
        with pytest.raises(ConfigError):
            parse_kmb(bad)
    notes = ignored_flag_notes(["--lazy-unpickle", "--no-allow-crimes", "-vv", "--transformers-cache", "/x",
                                "--write-threads=4"])
    assert len(notes) == 5 and all("accepted and ignored" in n for n in notes)
    with pytest.raises(ConfigError, match="unknown option '--frobnicate'"):
        ignored_flag_notes(["--frobnicate"])
    with pytest.raises(ConfigError, match="needs a value"):
        ignored_flag_notes(["--lora-merge-cache"])


def test_mergekit_yaml_command(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = _write(tmp_path / "c.yaml", {"merge_method": "dare_ties", "base_model": str(base), "dtype": "float32",
                                       "parameters": {"density": 0.5, "weight": 1.0},
                                       "models": [{"model": str(e)} for e in experts]})
    total = sum(v.numel() for v in load_file(base / "model.safetensors").values())
    out = tmp_path / "mk-style"
    res = runner.invoke(app, ["mergekit-yaml", str(cfg), str(out), "--out-shard-size", str(total // 3),
                              "--no-copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "--random-seed", "5",
                              "-j", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "note: --lazy-unpickle is accepted and ignored" in res.output
    assert "note: --allow-crimes is accepted and ignored" in res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    for shard in shards:  # at most total // 3 parameters per shard, unless one tensor is larger on its own
        sd = load_file(out / shard)
        assert sum(v.numel() for v in sd.values()) <= total // 3 or len(sd) == 1
    # the seed is the config's seed: the same merge through `merge` with seed 5
    ref = tmp_path / "ref"
    plain = yaml.safe_load(cfg.read_text()) | {"seed": 5}
    neuromerge.merge(plain, ref, progress=False)
    a, b = _load_dir(out), _load_dir(ref)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    res = runner.invoke(app, ["mergekit-yaml", str(cfg), str(tmp_path / "x"), "--frobnicate"])
    assert res.exit_code == 2 and "unknown option '--frobnicate'" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, ["mergekit-yaml", str(cfg), str(out)])
    assert res.exit_code == 2 and "exists" in res.output


def test_copy_tokenizer_false_leaves_the_tokenizer_out(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    (base / "tokenizer_config.json").write_text("{}")
    cfg = {"merge_method": "linear", "base_model": str(base), "models": [{"model": str(e)} for e in experts]}
    with_tok = neuromerge.merge(cfg, tmp_path / "a", progress=False).out
    without = neuromerge.merge({**cfg, "output": {"copy_tokenizer": False}}, tmp_path / "b", progress=False).out
    assert (with_tok / "tokenizer_config.json").is_file()
    assert not (without / "tokenizer_config.json").exists() and (without / "config.json").is_file()


def test_mergekit_spellings_pattern_and_empty_parameters(make_family, tmp_path: Path) -> None:
    """``pattern:`` conditions (older mergekit examples) filter, with a note saying mergekit 0.1.5 ignores the key;
    ``parameters:`` left empty is no parameters; relative ``MODEL+LORA`` parts resolve against the config's
    folder."""
    base, experts = make_family("llama", n_experts=2)
    t = [{"pattern": "self_attn", "value": [0, 0.5, 1]}, {"pattern": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": t},
           "models": [{"model": str(experts[0]), "parameters": None}, {"model": str(experts[1])}]}
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "p.yaml", cfg)), "-o", str(tmp_path / "p"),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "`pattern:` read as `filter:`" in res.output
    filtered = {**cfg, "parameters": {"t": [{("filter" if k == "pattern" else k): v for k, v in c.items()}
                                            for c in t]}}
    neuromerge.merge(filtered, tmp_path / "f", progress=False)
    a, b = _load_dir(tmp_path / "p"), _load_dir(tmp_path / "f")
    assert all(torch.equal(a[k], b[k]) for k in b)
    ties = {"merge_method": "ties", "base_model": str(base), "parameters": None,
            "models": [{"model": str(e), "parameters": {"density": 0.5, "weight": 0.5}} for e in experts]}
    neuromerge.merge(ties, tmp_path / "t", progress=False)


def test_relative_model_plus_lora_resolves_each_part(applied, tmp_path: Path) -> None:
    import shutil

    base, tuned, lora, other = applied
    root = tmp_path / "cfgdir"
    for p in (base, tuned, lora, other):
        shutil.copytree(p, root / p.name)
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 1.0},
           "models": [{"model": "tuned+lora"}, {"model": "other"}], "dtype": "float32"}
    out = neuromerge.merge(_write(root / "c.yaml", cfg), tmp_path / "o", progress=False).out
    absolute = {**cfg, "base_model": str(base), "models": [{"model": f"{tuned}+{lora}"}, {"model": str(other)}]}
    ref = neuromerge.merge(absolute, tmp_path / "r", progress=False).out
    a, b = _load_dir(out), _load_dir(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)
