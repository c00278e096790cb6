"""``neuromerge inspect`` on constructed pools whose answers are known, against independent numpy references."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.inspection import InspectReport, figures, inspect, inspect_plan
from neuromerge.inspection import stats as stats_module
from neuromerge.inspection.components import component_of
from neuromerge.inspection.mergeability import component_groups, component_mergeability, merged_component
from neuromerge.inspection.stats import BINS
from neuromerge.inspection.suite_pool import SuiteExperts
from tests.helpers import write_config

runner = CliRunner()
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (12, 6),
    "model.layers.0.self_attn.q_proj.weight": (8, 6),
    "model.layers.0.mlp.up_proj.weight": (10, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.1.self_attn.q_proj.weight": (8, 6),
    "model.layers.1.mlp.up_proj.weight": (10, 6),
    "model.norm.weight": (6,),
    "lm_head.weight": (12, 6),
}
State = dict[str, torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base(seed: int = 0) -> State:
    g = _gen(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _write(folder: Path, state: State) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def _pool(root: Path, base: State, experts: list[State], **extra: Any) -> Path:
    b = _write(root / "base", base)
    models = [_write(root / f"expert{i}", e) for i, e in enumerate(experts)]
    return write_config(root / "config.yaml", "ties", b, models, **extra)


def _orthogonal_to_rows(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``r`` minus its projection on each row of ``w`` (float64)."""
    r, w = r.double(), w.double()
    return r - (r * w).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True) * w


def _random_experts(base: State, n: int, seed: int, scale: float = 0.1) -> list[State]:
    g = _gen(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


# ------------------------------------------------------------------------------------------- known answers
def test_identical_experts_have_cosine_one_and_no_conflicts(tmp_path: Path) -> None:
    base = _base()
    expert = _random_experts(base, 1, seed=1)[0]
    rep = inspect(_pool(tmp_path, base, [expert, expert, expert]), threads=1)
    for group in [rep.model, *rep.blocks, *rep.components, *rep.tensors]:
        assert all(c == pytest.approx(1.0, abs=1e-12) for row in group.cosine for c in row), group.name
        assert group.sign_conflict_rate == 0 and group.sign_agreement == 1.0, group.name
    assert rep.model.update_norm[0] == rep.model.update_norm[1] > 0
    assert rep.summary.most_conflicting_blocks == [] and "most conflicting blocks: none" in rep.summary.text
    assert rep.summary.suggestion.method == "linear" and rep.summary.suggestion.rule == "near-identical"


def test_rescaled_base_rows_are_fully_parallel(tmp_path: Path) -> None:
    base = _base()
    g = _gen(2)
    experts = []
    for _ in range(2):
        e = {}
        for k, v in base.items():  # θ_t row k = (1 + c_k)·w0^k: τ_t^k = c_k·w0^k
            c = torch.rand(v.shape[0], generator=g) * 0.8 - 0.4
            e[k] = v * (1 + c).unsqueeze(-1) if v.dim() == 2 else v * (1 + c)
        experts.append(e)
    rep = inspect(_pool(tmp_path, base, experts), threads=1)
    for group in [rep.model, *rep.blocks]:
        for share in group.parallel_share:
            assert share == pytest.approx(1.0, abs=1e-6), group.name
    hist = np.array(rep.model.neuron_histogram)
    assert hist[:, -1].sum() == hist.sum() == 2 * sum(s[0] for s in SHAPES.values() if len(s) == 2)
    assert all(s == pytest.approx(0.0, abs=1e-6) for s in rep.model.orthogonal_share)


def test_updates_orthogonal_to_base_rows_are_fully_orthogonal(tmp_path: Path) -> None:
    base = _base()
    g = _gen(3)
    experts = [{k: (v.double() + 0.1 * (_orthogonal_to_rows(torch.randn(v.shape, generator=g), v)
                                        if v.dim() == 2 else torch.randn(v.shape, generator=g))).float()
                for k, v in base.items()} for _ in range(3)]
    rep = inspect(_pool(tmp_path, base, experts), threads=1)
    for group in [rep.model, *rep.blocks, *(t for t in rep.tensors if t.neurons)]:
        assert all(s == pytest.approx(1.0, abs=1e-6) for s in group.orthogonal_share), group.name
    hist = np.array(rep.model.neuron_histogram)
    assert hist[:, 0].sum() == hist.sum() > 0
    # point tensors (norm weights) have no neurons: no parallel share
    norm = next(t for t in rep.tensors if t.name == "model.norm.weight")
    assert norm.neurons == 0 and norm.parallel_share == [None, None, None]
    # random independent updates: signs conflict as often as chance, most energy orthogonal → NeuroMerging
    assert abs(rep.model.sign_agreement) < 0.3
    assert rep.summary.suggestion.method == "neuromerging"


def test_suggestion_rules(tmp_path: Path) -> None:
    base = _base()
    g = _gen(4)
    # same-sign updates of random sizes: no conflicts, cosine well below 1 → task arithmetic
    agree = [{k: v + 0.1 * torch.rand(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    rep = inspect(_pool(tmp_path / "a", base, agree), threads=1)
    assert rep.model.sign_conflict_rate == 0 and rep.model.mean_cosine < 0.9
    assert rep.summary.suggestion.rule == "signs-agree" and rep.summary.suggestion.method == "task_arithmetic"
    # rescalings with random signs: conflicts and a parallel update → TIES
    rescale = [{k: v * (1 + 0.3 * torch.randn(v.shape[:1], generator=g)).reshape(-1, *[1] * (v.dim() - 1))
                for k, v in base.items()} for _ in range(3)]
    rep = inspect(_pool(tmp_path / "r", base, rescale), threads=1)
    assert rep.summary.suggestion.method == "ties" and rep.summary.suggestion.rule == "rescaling-conflicts"
    rep = inspect(_pool(tmp_path / "one", base, agree[:1]), threads=1)
    assert rep.summary.suggestion.rule == "single-expert" and rep.model.mean_cosine is None


# ------------------------------------------------------------------------------------------- numpy reference
def _reference(base: State, experts: list[State], density: float) -> dict[str, Any]:
    """Whole-model statistics by a direct, loop-based computation (independent of the streaming code)."""
    names = list(SHAPES)
    taus = [np.concatenate([(e[n] - base[n]).numpy().ravel() for n in names]) for e in experts]
    k = math.floor(density * taus[0].size)
    thresholds = [np.sort(np.abs(t))[::-1][k - 1] for t in taus]
    conflicts = overlap = 0
    for i in range(taus[0].size):
        signs = [np.sign(t[i]) for t, thr in zip(taus, thresholds, strict=True) if abs(t[i]) >= thr and t[i] != 0]
        overlap += len(signs) >= 2
        conflicts += len(signs) >= 2 and len(set(signs)) > 1
    t64 = [t.astype(np.float64) for t in taus]
    cos = [[float(a @ b / np.sqrt((a @ a) * (b @ b))) for b in t64] for a in t64]
    par, tot = np.zeros(len(experts)), np.zeros(len(experts))
    for n in names:
        if len(SHAPES[n]) != 2:
            continue
        w = base[n].numpy().astype(np.float64)
        for t, e in enumerate(experts):
            d = (e[n] - base[n]).numpy().astype(np.float64)
            for row in range(w.shape[0]):
                par[t] += (d[row] @ w[row]) ** 2 / (w[row] @ w[row])
                tot[t] += d[row] @ d[row]
    return {"thresholds": thresholds, "conflicts": conflicts, "overlap": overlap, "n": taus[0].size, "cos": cos,
            "parallel": par / tot, "norms": [float(np.sqrt(t @ t)) for t in t64]}


def test_whole_model_statistics_match_a_direct_computation(tmp_path: Path) -> None:
    base = _base()
    experts = _random_experts(base, 3, seed=5)
    ref = _reference(base, experts, density=0.3)
    rep = inspect(_pool(tmp_path, base, experts), density=0.3, threads=2, chunk_elements=20)
    m = rep.model
    assert rep.thresholds == [float(t) for t in ref["thresholds"]]
    assert m.numel == ref["n"] and m.tensors == len(SHAPES)
    assert m.sign_conflict_rate == ref["conflicts"] / ref["n"] and m.overlap_rate == ref["overlap"] / ref["n"]
    np.testing.assert_allclose(np.array(m.cosine, dtype=float), ref["cos"], atol=1e-12)
    np.testing.assert_allclose(m.parallel_share, ref["parallel"], rtol=1e-9)
    np.testing.assert_allclose(m.update_norm, ref["norms"], rtol=1e-9)
    # blocks and components partition the model
    assert sum(b.numel for b in rep.blocks) == sum(c.numel for c in rep.components) == m.numel
    assert [b.name for b in rep.blocks] == ["embeddings", "layer.0", "layer.1", "head"]
    assert [c.name for c in rep.components if c.block == "layer.0"] == [
        "layer.0/attention", "layer.0/mlp", "layer.0/other"]


def test_results_do_not_depend_on_threads_and_json_round_trips(tmp_path: Path) -> None:
    base = _base()
    cfg = _pool(tmp_path, base, _random_experts(base, 2, seed=6))
    one = inspect(cfg, tmp_path / "one", threads=1, chunk_elements=20, figures=False)
    two = inspect(cfg, threads=2, chunk_elements=20)
    for rep in (one, two):
        rep.timings_s = {}
    two.figures = {}
    assert one == two
    loaded = InspectReport.load(tmp_path / "one" / "inspect.json")
    loaded.timings_s = {}
    assert loaded == one and InspectReport.from_dict(json.loads(one.to_json())) == one


# ------------------------------------------------------------------------------------------- streaming, memory
def test_reads_stay_within_the_chunk_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _base()
    cfg = _pool(tmp_path, base, _random_experts(base, 2, seed=7))
    largest: list[int] = []
    original = stats_module.read_all

    def recording(*args: Any, **kwargs: Any) -> Any:
        b, models = original(*args, **kwargs)
        largest.append(max(t.numel() for t in [b, *models]))
        return b, models

    monkeypatch.setattr(stats_module, "read_all", recording)
    rep = inspect(cfg, threads=2, chunk_elements=24)
    assert max(largest) <= 24
    assert len(largest) == 3 * sum(math.ceil(s[0] / (24 // s[1])) if len(s) == 2 else 1 for s in SHAPES.values())
    assert rep.model.numel == sum(math.prod(s) for s in SHAPES.values())


# ------------------------------------------------------------------------------------------- figures, CLI
def test_figures_are_written_and_non_empty(tmp_path: Path) -> None:
    base = _base()
    rep = inspect(_pool(tmp_path, base, _random_experts(base, 3, seed=8)), tmp_path / "out", threads=1)
    assert set(rep.figures) == {"cosine_heatmap", "cosine_per_block", "sign_conflict_per_block",
                                "parallel_share_per_block", "parallel_share_histogram", "update_norm_per_block"}
    for file in rep.figures.values():
        path = tmp_path / "out" / file
        assert path.stat().st_size > 5000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 200
            assert len(set(img.convert("L").get_flattened_data())) > 10  # something is drawn


def test_cli_prints_the_summary_and_writes_the_report(tmp_path: Path) -> None:
    base = _base()
    cfg = _pool(tmp_path, base, _random_experts(base, 2, seed=9))
    res = runner.invoke(app, ["inspect", str(cfg), "-o", str(tmp_path / "o"), "--density", "0.5", "--threads", "1",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    for needle in ("most conflicting blocks:", "most orthogonal experts:", "suggested method:", "wrote inspect.json"):
        assert needle in res.output
    rep = InspectReport.load(tmp_path / "o" / "inspect.json")
    assert rep.density == 0.5 and rep.labels == ["expert0", "expert1"] and rep.summary.text in res.output
    assert neuromerge.inspect(cfg, density=0.5, threads=1).model == rep.model  # the Python API, same numbers


@pytest.mark.parametrize("edit, needle", [
    (lambda e: e.pop("model.layers.1.mlp.up_proj.weight"), "missing"),
    (lambda e: e.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(10, 5)}), "shape mismatch"),
    (lambda e: e["model.norm.weight"].__setitem__(0, float("nan")), "NaN"),
])
def test_bad_input_fails_like_merge(tmp_path: Path, edit: Any, needle: str) -> None:
    base = _base()
    experts = _random_experts(base, 2, seed=10)
    edit(experts[1])
    cfg = _pool(tmp_path, base, experts)
    res = runner.invoke(app, ["inspect", str(cfg), "-o", str(tmp_path / "o"), "--no-progress"])
    msg = res.output.strip()
    assert res.exit_code == 2 and msg.startswith("error: ") and len(msg.splitlines()) == 1 and needle in msg, msg
    assert not (tmp_path / "o").exists()


def test_config_without_base_and_bad_density_are_refused(tmp_path: Path) -> None:
    base = _base()
    experts = [_write(tmp_path / f"e{i}", e) for i, e in enumerate(_random_experts(base, 2, seed=11))]
    cfg = write_config(tmp_path / "c.yaml", "linear", None, experts)
    res = runner.invoke(app, ["inspect", str(cfg), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "base_model" in res.output
    res = runner.invoke(app, ["inspect", str(cfg), "--density", "0"])
    assert res.exit_code == 2 and "density" in res.output
    res = runner.invoke(app, ["inspect"])
    assert res.exit_code == 2 and "merge config" in res.output


# ------------------------------------------------------------------------------------------- LoRA pools
def test_pool_of_lora_adapters(tmp_path: Path) -> None:
    """Two hand-written adapters (identical factors): the update is s·B·A, the experts are identical."""
    from neuromerge.config import load_config
    from neuromerge.engine.plan import Pool, build_plan
    from neuromerge.io.checkpoint import open_checkpoint
    from neuromerge.io.lora import open_model

    base_state = _base()
    base_dir = _write(tmp_path / "base", base_state)
    g = _gen(12)
    a, b = torch.randn(2, 6, generator=g), torch.randn(10, 2, generator=g)
    key = "base_model.model.model.layers.1.mlp.up_proj"
    for i in range(2):
        folder = tmp_path / f"ad{i}"
        folder.mkdir()
        save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))
    cfg = load_config({"merge_method": "ties", "base_model": str(base_dir),
                       "models": [{"model": str(tmp_path / "ad0")}, {"model": str(tmp_path / "ad1")}]})
    base = open_checkpoint(base_dir)
    pool = Pool(base=base, models=[open_model(tmp_path / f"ad{i}", base) for i in range(2)], base_given=True)
    rep = inspect_plan(build_plan(cfg, pool), 0.2, threads=1)
    expected = float(torch.linalg.vector_norm((4.0 * (b.double() @ a.double())).float().double()))
    layer1 = rep.block("layer.1")
    assert layer1.update_norm == pytest.approx([expected, expected], rel=1e-6)
    assert rep.block("layer.0").update_norm == [0.0, 0.0]
    assert layer1.cosine[0][1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- mergeability
class _FakeSuite:
    """A suite whose score counts how many tensors differ from the task's own expert (no model at all)."""

    name = "fake"

    def __init__(self, experts: list[State]) -> None:
        self._experts = experts

    def merge_exclude(self) -> list[str]:
        return [r"^model\.norm\."]

    def evaluate(self, backbone: State, head: Any, task: Any, split: str, budget: Any) -> float:
        own = self._experts[task.index]
        return 1.0 - 0.1 * sum(not torch.equal(backbone[k], own[k]) for k in own)


def test_component_mergeability_merges_only_that_component(tmp_path: Path) -> None:
    from types import SimpleNamespace

    base = _base()
    experts = _random_experts(base, 3, seed=13)
    experts[1]["model.layers.0.mlp.up_proj.weight"] = experts[0]["model.layers.0.mlp.up_proj.weight"].clone()
    experts[2]["model.layers.0.mlp.up_proj.weight"] = experts[0]["model.layers.0.mlp.up_proj.weight"].clone()
    tasks = [SimpleNamespace(name=f"t{i}", index=i, metric="accuracy") for i in range(3)]
    se = SuiteExperts(_FakeSuite(experts), None, tasks, base,
                      [SimpleNamespace(backbone=e, head=None) for e in experts], "full", 0, True)
    merge = component_mergeability(se)
    rows = {r.component: r for r in merge.rows}
    assert merge.reference == {"t0": 1.0, "t1": 1.0, "t2": 1.0}
    assert all("model.norm.weight" not in names for _, names in component_groups(base, se.suite.merge_exclude()))
    # layer.0/attention: one tensor, changed by the merge for every task → 0.1 lost per task
    assert rows["layer.0/attention"].loss == pytest.approx({"t0": 0.1, "t1": 0.1, "t2": 0.1})
    # layer.0/mlp: the experts agree there, so the merge is each expert's own tensor → nothing lost
    assert rows["layer.0/mlp"].mean_loss == pytest.approx(0.0, abs=1e-12)
    assert rows["head"].tensors == 1 and rows["head"].mean_loss == pytest.approx(0.1)  # lm_head only
    merged = merged_component(base, experts, ["lm_head.weight"])["lm_head.weight"]
    torch.testing.assert_close(merged, torch.stack([e["lm_head.weight"] for e in experts]).mean(0))
    assert [r.component for r in merge.rows] == ["embeddings", "layer.0/attention", "layer.0/mlp", "layer.0/other",
                                                 "layer.1/attention", "layer.1/mlp", "head"]
    assert component_of("model.layers.1.mlp.up_proj.weight").name == "layer.1/mlp"
    path = figures.mergeability(merge, tmp_path / "m.png")
    with Image.open(path) as img:
        assert img.size[0] >= 300 and len(set(img.convert("L").get_flattened_data())) > 10


def test_mergeability_without_the_bench_is_reported_not_a_crash(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from neuromerge.tasks import named

    monkeypatch.setattr(named, "_PROVIDER", [])  # no provider of named suites (the bench) is registered
    base = _base()
    cfg = _pool(tmp_path, base, _random_experts(base, 2, seed=14))
    res = runner.invoke(app, ["inspect", str(cfg), "-o", str(tmp_path / "o"), "--suite", "text", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "mergeability needs the bench suites" in res.output
    rep = InspectReport.load(tmp_path / "o" / "inspect.json")
    assert rep.mergeability is not None and not rep.mergeability.available and "mergeability" not in rep.figures


def test_chunk_sums_histogram_bins() -> None:
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    expert = base + torch.tensor([[0.5, 0.5], [0.0, 2.0], [1.0, 0.0]])  # shares 0.5, 1.0, 0 (w0 = 0)
    s = stats_module.chunk_sums(base, [expert], [0.0], neuronal=True)
    hist = s.histogram[0]
    assert hist[BINS // 2] == 1 and hist[-1] == 1 and hist[0] == 1 and hist.sum() == 3
    assert s.parallel[0] == pytest.approx(0.25 + 4.0) and s.energy[0] == pytest.approx(0.5 + 4.0 + 1.0)
