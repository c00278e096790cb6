"""Merge semantics (issue #16): nothing lost, nothing silently wrong.

The output's dtype as transformers loads it, a base listed among the models of an average, filter conditions in
the model card, refused mergekit keys, tokenizer checks for embedding rows, the population of a global trim, what
``--dry-run`` refuses, unverifiable LoRA bases, duplicate models and a config path that is a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import neuromerge
from neuromerge import Weights
from neuromerge.cli import app
from neuromerge.functional import merge_state_dicts
from neuromerge.tensors.selection import kept_count
from tests.engine.test_bad_input import _fails
from tests.helpers import tiny_model, write_config

runner = CliRunner()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ok(cfg: Path, out: Path, *extra: str) -> str:
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--no-progress", *extra])
    assert res.exit_code == 0, res.output
    return res.output


def _dry_run_fails(cfg: Path, out: Path, *needles: str, extra: tuple[str, ...] = ()) -> None:
    """``--dry-run`` refuses with the message the run gives."""
    _fails(cfg, out, *needles, extra=("--dry-run", *extra))
    _fails(cfg, out, *needles, extra=extra)


# ------------------------------------------------------------------------------------------ 5: output dtype
@pytest.mark.parametrize("base_dtype", list(DTYPES))
def test_output_loads_in_the_dtype_written(make_family, tmp_path: Path, base_dtype: str) -> None:
    """Every base dtype × output dtype (None = the base's): ``from_pretrained`` — with transformers' default dtype
    and with ``dtype="auto"`` — returns the dtype of the weights written, and config.json's ``dtype`` and
    ``torch_dtype`` agree."""
    import transformers as tf

    base, experts = make_family("llama", n_experts=1, dtype=DTYPES[base_dtype])
    for out_dtype in (None, *DTYPES):
        extra = {"dtype": out_dtype} if out_dtype else {}
        cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, **extra)
        out = tmp_path / f"out-{out_dtype}"
        neuromerge.merge(cfg, out, threads=1, progress=False)
        want = DTYPES[out_dtype or base_dtype]
        assert {t.dtype for t in _load_dir(out).values() if t.is_floating_point()} == {want}
        # transformers 5's default is dtype="auto" (config.json's dtype); 4.x loads float32 unless told
        default = want if int(tf.__version__.split(".")[0]) >= 5 else torch.float32
        assert tf.AutoModelForCausalLM.from_pretrained(out).dtype == default, (base_dtype, out_dtype)
        assert tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == want, (base_dtype, out_dtype)
        doc = json.loads((out / "config.json").read_text())
        name = str(want).removeprefix("torch.")
        assert doc["dtype"] == doc.get("torch_dtype") == name, (base_dtype, out_dtype, doc.get("dtype"))


# ----------------------------------------------------------------------------- 6: a listed base, averaged
def test_linear_averages_a_base_listed_under_models(make_family, tmp_path: Path) -> None:
    """``linear`` averages the base like any other listed model (no 'skipped' note); a task-vector method still
    drops it with the note."""
    base, experts = make_family("llama", n_experts=1)
    cfg = write_config(tmp_path / "c.yaml", "linear", base, [base, experts[0]], dtype="float32")
    res = neuromerge.merge(cfg, tmp_path / "lin", threads=1, progress=False)
    assert not [w for w in res.report["warnings"] if "skipped" in w]
    assert res.report["summary"]["models"] == [str(base), str(experts[0])]
    got, b, e = _load_dir(tmp_path / "lin"), Weights.load(base), Weights.load(experts[0])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], (b[name] + e[name]) / 2)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, [base, experts[0]])
    res = neuromerge.merge(cfg, tmp_path / "ta", threads=1, progress=False)
    assert any("skipped" in w for w in res.report["warnings"])
    assert res.report["summary"]["models"] == [str(experts[0])]


# -------------------------------------------------------------------- 7: filter conditions in every scope
CONDITIONS = [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]


@pytest.mark.parametrize("scope", ["global", "per_model", "both"])
def test_filter_condition_parameters_are_written(make_family, tmp_path: Path, scope: str) -> None:
    """A parameter given as ``[{filter, value}, {value}]`` (globally, per model, or both) merges and writes the
    model card and provenance with the conditions as plain data."""
    base, experts = make_family("llama", n_experts=2)
    models = [{"model": str(e)} for e in experts]
    cfg: dict = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models}
    if scope in ("global", "both"):
        cfg["parameters"] = {"lambda": CONDITIONS}
    if scope in ("per_model", "both"):
        models[0]["parameters"] = {"weight": CONDITIONS}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    assert runner.invoke(app, ["merge", str(path), "-o", str(out), "--dry-run"]).exit_code == 0
    _ok(path, out)
    card = (out / "README.md").read_text()
    assert '{"filter": "self_attn", "value": 0.5}' in card
    prov = json.loads((out / "provenance.json").read_text())["config"]
    where = prov["parameters"]["lambda"] if scope != "per_model" else prov["models"][0]["parameters"]["weight"]
    assert where == [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["summary"]["merged_tensors"] > 0


# ------------------------------------------- 8: tokenizer vocabularies (tokenizer_source: test_tokenizer_merge.py)
def test_explicitly_unset_tokenizer_keys_are_accepted(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, tokenizer_source=None,
                       chat_template=None, tokenizer=None)
    assert runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--dry-run"]).exit_code == 0


def _vocab_txt(folder: Path, tokens: list[str]) -> None:
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens))


def _tokenizer_json(folder: Path, tokens: list[str], added: dict[int, str] | None = None) -> None:
    doc = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                                       "unk_token": tokens[0]},
           "added_tokens": [{"id": i, "content": c, "special": True} for i, c in (added or {}).items()]}
    (folder / "tokenizer.json").write_text(json.dumps(doc))


def test_shared_vocab_refuses_a_different_token_at_a_shared_id(make_family, tmp_path: Path) -> None:
    """Embedding rows merge by index: a model whose tokenizer gives a shared id another token is refused (dry run
    too), naming the first differing id; a vocabulary extended by added tokens (ids past the base's) merges."""
    base, experts = make_family("llama", n_experts=1)
    big = tiny_model("llama")
    big.resize_token_embeddings(100)
    big.save_pretrained(tmp_path / "big")
    tokens = [f"tok{i}" for i in range(96)]
    _tokenizer_json(base, tokens)
    _tokenizer_json(experts[0], tokens)
    _tokenizer_json(tmp_path / "big", tokens, added={96 + i: f"<added{i}>" for i in range(4)})  # extension: fine
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, [experts[0], tmp_path / "big"], vocab="shared")
    _ok(cfg, tmp_path / "ok")
    swapped = tokens.copy()
    swapped[7], swapped[9] = swapped[9], swapped[7]
    _tokenizer_json(tmp_path / "big", swapped, added={96: "<added0>"})
    _dry_run_fails(cfg, tmp_path / "o", "token id 7", "'tok9' there", "'tok7' in", "`tokenizer_source`")
    # the same check with equal sizes (vocab: error), slow-tokenizer files
    for folder in (tmp_path / "big", base, experts[0]):
        (folder / "tokenizer.json").unlink()
    _vocab_txt(base, tokens)
    _vocab_txt(experts[0], [*tokens[:3], "other", *tokens[4:]])
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts)
    _dry_run_fails(cfg, tmp_path / "o", "token id 3", "'other' there")


# --------------------------------------------------------------------------- 10: population of a global trim
def _bert_adapters(tmp_path: Path) -> tuple[Path, list[Path]]:
    import peft

    base = tmp_path / "base"
    tiny_model("bert").save_pretrained(base)
    adapters = []
    for i in range(2):
        torch.manual_seed(20 + i)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
        pm = peft.get_peft_model(tiny_model("bert"), lora)
        pm.save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
    return base, adapters


def test_global_trim_of_a_lora_pool_counts_the_adapted_entries(tmp_path: Path) -> None:
    """TIES over two adapters of query/value: the trim keeps ``density`` of the entries the adapters change, not
    of every merged entry, so densities 0.1 and 0.2 differ, and the report's kept density is the density."""
    base, adapters = _bert_adapters(tmp_path)
    b = Weights.load(base)
    adapted = [n for n in b if n.endswith(("query.weight", "value.weight"))]
    changed = sum(b[n].numel() for n in adapted)
    merged_total = sum(v.numel() for n, v in b.items() if v.is_floating_point()
                       and not n.startswith(("classifier", "bert.pooler.dense")))
    outs = {}
    for density in (0.1, 0.2):
        cfg = write_config(tmp_path / "c.yaml", "ties", base, adapters, parameters={"density": density})
        out = tmp_path / f"o{density}"
        _ok(cfg, out)
        stats = json.loads((out / "merge_report.json").read_text())["global_statistics"]
        assert stats["total"] == [changed, changed]
        assert stats["unchanged_entries"] == merged_total - changed
        for kept in stats["kept_density"]:
            assert kept == pytest.approx(density, abs=1e-3)
        outs[density] = _load_dir(out)
    assert any(not torch.equal(outs[0.1][n], outs[0.2][n]) for n in adapted)


def test_global_trim_leaves_out_unchanged_tensors(make_family, tmp_path: Path) -> None:
    """Full checkpoints where layer 1 is frozen (equal to the base in every expert): the thresholds are those of
    a sort over the other tensors' task vectors, the in-memory merge agrees, and the report says what was left
    out."""
    base, experts = make_family("llama", n_experts=2)
    b = load_file(base / "model.safetensors")
    frozen = [n for n in b if ".layers.1." in n]
    for e in experts:
        sd = load_file(e / "model.safetensors")
        sd.update({n: b[n].clone() for n in frozen})
        save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters={"density": 0.13})
    out = tmp_path / "o"
    neuromerge.merge(cfg, out, threads=2, chunk_elements=256, progress=False)  # many chunks: the window pass
    stats = json.loads((out / "merge_report.json").read_text())["global_statistics"]
    merged = [n for n, v in b.items() if v.is_floating_point()]
    population = [n for n in merged if n not in frozen]
    assert stats["unchanged_tensors"] == len(frozen)
    assert stats["unchanged_entries"] == sum(b[n].numel() for n in frozen)
    for t, e in enumerate(experts):
        w = Weights.load(e)
        mags = torch.cat([(w[n].float() - b[n].float()).abs().reshape(-1) for n in population])
        k = kept_count(mags.numel(), 0.13)
        thr = torch.sort(mags, descending=True).values[k - 1].item()
        assert stats["thresholds"][t] == thr and stats["total"][t] == mags.numel()
        assert stats["kept"][t] == int((mags >= thr).sum())
    in_memory = merge_state_dicts("ties", b, [load_file(e / "model.safetensors") for e in experts],
                                  parameters={"density": 0.13})
    got = _load_dir(out)
    for n in merged:
        assert torch.equal(got[n], in_memory[n]), n


# --------------------------------------------------------------------------- a density varying under a global trim
def _group_thresholds(base: Path, expert: Path, names: list[str], density: float) -> tuple[float, int, int]:
    """(threshold, kept, population) of a global trim at ``density`` of ``expert``'s task vector over ``names``:
    the k-th largest |τ| of a float64-free sort (the values are fp32), k = ⌊density · N⌋."""
    b, w = Weights.load(base), Weights.load(expert)
    mags = torch.cat([(w[n].float() - b[n].float()).abs().reshape(-1) for n in names])
    k = kept_count(mags.numel(), density)
    thr = torch.sort(mags, descending=True).values[k - 1].item()
    return thr, int((mags >= thr).sum()), mags.numel()


def test_global_trim_with_a_density_gradient_has_one_threshold_per_model_and_density(make_family,
                                                                                    tmp_path: Path) -> None:
    """mergekit's ``examples/ties.yml`` shape: density ``[1, 0.7, 0.1]``-style gradients under TIES's default global
    trim. Each (model, density value) is a global trim of its own over the tensors where the model has that density:
    the report's thresholds are the exact k-th largest |τ| of those tensors, the CLI, ``--dry-run`` and the in-memory
    merge agree, and a per-tensor check of the kept entries holds."""
    base, experts = make_family("llama", n_experts=2)
    b = Weights.load(base)
    merged = [n for n, v in b.items() if v.is_floating_point()]
    # expert 0: a gradient over 2 layers (layer 0 and the tensors outside the stack: 0.3; layer 1: 0.6);
    # expert 1: one density everywhere, so its single trim covers every tensor
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "parameters": {"lambda": 1.0},
           "models": [{"model": str(experts[0]), "parameters": {"density": [0.3, 0.6]}},
                      {"model": str(experts[1]), "parameters": {"density": 0.25}}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert "density varies" not in _ok(path, tmp_path / "dry", "--dry-run")
    _ok(path, tmp_path / "o")
    stats = json.loads((tmp_path / "o" / "merge_report.json").read_text())["global_statistics"]
    groups = {(tuple(g["models"]), tuple(g["densities"])): g for g in stats["groups"]}
    layer1 = [n for n in merged if ".layers.1." in n]
    rest = [n for n in merged if n not in layer1]
    expected = {((0,), (0.3,)): (0, rest, 0.3), ((0,), (0.6,)): (0, layer1, 0.6), ((1,), (0.25,)): (1, merged, 0.25)}
    assert set(groups) == set(expected)
    for key, (t, names, density) in expected.items():
        thr, kept, total = _group_thresholds(base, experts[t], names, density)
        g = groups[key]
        assert g["tensors"] == len(names) and g["thresholds"] == [thr] and g["kept"] == [kept] and g["total"] == [total]
    # the merge itself: TIES with the masks of those thresholds (formula), and the in-memory merge
    got = _load_dir(tmp_path / "o")
    sds = [Weights.load(e) for e in experts]
    in_memory = merge_state_dicts("ties", b, sds, parameters={"lambda": 1.0},
                                  model_parameters=[{"density": [0.3, 0.6]}, {"density": 0.25}],
                                  model_type="llama")
    thr = {(t, n): groups[k]["thresholds"][0] for k, (t, names, _) in expected.items() for n in names}
    for n in merged:
        taus = [sd[n].double() - b[n].double() for sd in sds]
        trimmed = [tau * (tau.abs() >= thr[(t, n)]) for t, tau in enumerate(taus)]
        stacked = torch.stack(trimmed)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[n].double(), b[n].double() + mean, rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(got[n], in_memory[n]), n


def test_global_and_tensor_scopes_mixed_by_filter(make_family, tmp_path: Path) -> None:
    """``scope`` chosen per tensor by a filter: the global trim's statistics cover the tensors trimmed globally
    (before: a crash in the merge pass, 'no statistics were computed')."""
    base, experts = make_family("llama", n_experts=2)
    params = {"density": 0.2, "scope": [{"filter": "mlp", "value": "tensor"}, {"value": "global"}]}
    cfg = write_config(tmp_path / "c.yaml", "ties", base, experts, parameters=params)
    _ok(cfg, tmp_path / "o")
    stats = json.loads((tmp_path / "o" / "merge_report.json").read_text())["global_statistics"]
    b = Weights.load(base)
    globally = [n for n, v in b.items() if v.is_floating_point() and "mlp" not in n]
    assert stats["total"] == [sum(b[n].numel() for n in globally)] * 2


def test_dry_run_refuses_a_zero_weight_sum_of_linear(make_family, tmp_path: Path) -> None:
    _, experts = make_family("llama", n_experts=2)
    cfg = {"merge_method": "linear", "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}},
                                                {"model": str(experts[1]), "parameters": {"weight": -1.0}}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _dry_run_fails(path, tmp_path / "o", "the weights sum to 0")


def test_dry_run_refuses_a_linear_lora_output_that_scales_the_base(tmp_path: Path) -> None:
    base, adapters = _bert_adapters(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", "linear", base, adapters, parameters={"normalize": False})
    for rank in ("concat", "4"):
        _dry_run_fails(cfg, tmp_path / "o", "scales the base model itself", extra=("--rank", rank))


def test_dry_run_refuses_a_bad_shard_size(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts, shard_size="5 gigs")
    _dry_run_fails(cfg, tmp_path / "o", "shard_size '5 gigs' is not a size")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_refuses_an_unusable_device(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, experts)
    _dry_run_fails(cfg, tmp_path / "o", "no CUDA device", extra=("--device", "cuda"))
    _dry_run_fails(cfg, tmp_path / "o", "unknown device 'tpu'", extra=("--device", "tpu"))


# ---------------------------------------------------------------- 17, 18, 19: warnings and a folder config
def test_unverifiable_lora_base_is_warned_and_recorded(tmp_path: Path) -> None:
    base, adapters = _bert_adapters(tmp_path)
    doc = json.loads((adapters[0] / "adapter_config.json").read_text())
    doc["base_model_name_or_path"] = "some-org/some-bert"
    (adapters[0] / "adapter_config.json").write_text(json.dumps(doc))
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, adapters)
    dry = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--dry-run"])
    assert dry.exit_code == 0 and "'some-org/some-bert', which cannot be compared" in dry.output, dry.output
    res = runner.invoke(app, ["merge", str(cfg), "-o", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "warning: LoRA adapter" in res.output and "'some-org/some-bert'" in res.output
    inputs = json.loads((tmp_path / "o" / "provenance.json").read_text())["inputs"]
    records = {Path(i["path"]).name: i.get("lora_adapter") for i in inputs}
    assert records["adapter0"] == {"base_model_name_or_path": "some-org/some-bert", "local_base": str(base),
                                   "base_verified": False}
    assert records["base"] is None


def test_a_model_listed_twice_is_warned(make_family, tmp_path: Path) -> None:
    base, experts = make_family("llama", n_experts=2)
    same = experts[0].parent / "." / experts[0].name  # another spelling of the same folder
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, [experts[0], same, experts[1]])
    out = _ok(cfg, tmp_path / "o")
    assert "is listed 2 times under `models`" in out and "counts 2 times" in out


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    _fails(folder, tmp_path / "o", "is a folder, expected a YAML file")


@pytest.mark.parametrize("command", ["search", "route"])
def test_search_and_route_config_that_is_a_folder(tmp_path: Path, command: str) -> None:
    """Item 19 for the other YAML configs: a folder is named as one, not as a missing file."""
    from typer.testing import CliRunner

    from neuromerge.cli import app

    folder = tmp_path / "cfg.yaml"
    folder.mkdir()
    args = (["search", str(folder), "-o", str(tmp_path / "o"), "--no-progress"] if command == "search"
            else ["route", "build", "min_merging", "--config", str(folder), "-o", str(tmp_path / "o")])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "is a folder, expected a YAML file" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_task_file_that_is_a_folder(tmp_path: Path) -> None:
    from neuromerge.bench.taskfile import read_entries
    from neuromerge.errors import TaskError

    (tmp_path / "tasks.yaml").mkdir()
    with pytest.raises(TaskError, match="is a folder, expected a YAML file"):
        read_entries(tmp_path / "tasks.yaml")
