"""The protocol on a tiny synthetic suite (fast): rows, tuning, normalized accuracy, caching, grids, errors."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from neuromerge.bench import grids, protocol, suites
from neuromerge.bench.taskfile import make_tensor_splits
from neuromerge.bench.text import fit_linear
from neuromerge.errors import TaskError
from neuromerge.functional import merge_state_dicts
from neuromerge.methods import available, get
from neuromerge.tasks.contract import Budget, Expert, Suite, TaskData

D = 6


class ToySuite(Suite):
    """Backbone ``tanh(W x + b)`` on 6-D Gaussian inputs; task k labels by a random hyperplane."""

    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "toy suite"

    def __init__(self, n_tasks: int = 3) -> None:
        self.n_tasks = n_tasks
        self.trained: Counter[str] = Counter()

    def budget(self, quick: bool) -> Budget:
        return Budget(quick=quick, train_steps=40, batch_size=64, eval_examples=60, probe_steps=30)

    def tasks(self, budget: Budget) -> list[TaskData]:
        out = []
        for k in range(self.n_tasks + 1):
            g = torch.Generator().manual_seed(100 + k)
            x = torch.randn(300, D, generator=g)
            y = (x @ torch.randn(D, generator=g) > 0).long().tolist()
            out.append(make_tensor_splits(f"t{k}" if k < self.n_tasks else "ood", x, y, ["neg", "pos"], seed=0,
                                          sizes=(None, budget.eval_examples, budget.eval_examples),
                                          in_domain=k < self.n_tasks))
        return out

    def backbone_state(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"encoder.layer.0.dense.weight": torch.eye(D) + 0.1 * torch.randn(D, D, generator=g),
                "encoder.layer.0.dense.bias": torch.zeros(D), "frozen.weight": torch.ones(3)}

    def merge_exclude(self) -> list[str]:
        return [r"^frozen\."]

    @staticmethod
    def _feats(bb: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ bb["encoder.layer.0.dense.weight"].T + bb["encoder.layer.0.dense.bias"])

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        self.trained[task.name] += 1
        bb = {k: v.clone().requires_grad_(not k.startswith("frozen")) for k, v in self.backbone_state().items()}
        head = {"weight": torch.zeros(2, D, requires_grad=True), "bias": torch.zeros(2, requires_grad=True)}
        params = [v for v in bb.values() if v.requires_grad] + list(head.values())
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(budget.train_steps):
            loss = F.cross_entropy(self._feats(bb, task.train.inputs) @ head["weight"].T + head["bias"],
                                   task.train.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bb = {k: v.detach() for k, v in bb.items()}
        head = {k: v.detach() for k, v in head.items()}
        return Expert(task.name, bb, head, self.evaluate(bb, head, task, "test", budget), {"mode": mode})

    def fit_probe(self, backbone, task, budget, seed):
        return fit_linear(self._feats(backbone, task.train.inputs), task.train.labels, 2, steps=30, l2=1e-3)

    def evaluate(self, backbone, head, task, split, budget):
        s = getattr(task, split)
        logits = self._feats(backbone, s.inputs) @ head["weight"].T + head["bias"]
        return float((logits.argmax(-1) == s.labels).float().mean())

    def fingerprint(self) -> dict[str, Any]:
        return {"suite": "toy", "n": self.n_tasks}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_normalized_accuracy_and_report(cache_dir, tmp_path):
    suite = ToySuite()
    out = tmp_path / "out"
    res = protocol.run_suite(suite, ["task_arithmetic", "ties", "slerp"], quick=True, out=out, progress=False)
    names = [r.name for r in res.rows]
    assert names == [protocol.BASE_ROW, protocol.EXPERT_ROW, "task_arithmetic", "ties", "slerp"]
    experts = res.row(protocol.EXPERT_ROW)
    assert all(v > 0.6 for v in experts.test.values())  # the experts learned their tasks
    for r in res.rows:
        if r.skipped:
            continue
        assert r.transductive is False
        for t, acc in r.test.items():
            assert 0 <= acc <= 1
            assert r.normalized[t] == pytest.approx(100 * acc / experts.test[t])
        assert r.mean_normalized == pytest.approx(sum(r.normalized.values()) / 3)
        assert r.mean == pytest.approx(sum(r.test.values()) / 3)
    ta = res.row("task_arithmetic")
    assert ta.params in grids.grid_for("task_arithmetic", quick=True)
    assert ta.val_mean == max(g["val_mean"] for g in ta.grid)
    assert [g["params"] for g in ta.grid] == grids.grid_for("task_arithmetic", quick=True)
    assert set(ta.ood) == {"ood"} and 0 <= ta.ood["ood"] <= 1
    assert "exactly 2" in res.row("slerp").skipped
    assert res.row(protocol.BASE_ROW).ood["ood"] > 0.5
    for f in ("results.json", "results.md", "normalized_accuracy.png", "in_vs_out_of_domain.png"):
        assert (out / f).stat().st_size > 0
    js = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in js["rows"]] == names
    md = (out / "results.md").read_text()
    assert "| task_arithmetic |" in md and "transductive" in md and "skipped" in md


def test_test_score_is_the_chosen_point_merged(cache_dir):
    suite = ToySuite()
    res = protocol.run_suite(suite, ["ties"], quick=True, progress=False)
    row = res.row("ties")
    tasks = {t.name: t for t in suite.tasks(suite.budget(True))}
    experts = {n: protocol.cached_expert(suite, tasks[n], suite.budget(True), "full", 0, suite.backbone_state())[0]
               for n in ("t0", "t1", "t2")}
    merged = merge_state_dicts("ties", suite.backbone_state(), [experts[n].backbone for n in ("t0", "t1", "t2")],
                               parameters=row.params, exclude=suite.merge_exclude())
    for n in ("t0", "t1", "t2"):
        assert row.test[n] == pytest.approx(suite.evaluate(merged, experts[n].head, tasks[n], "test",
                                                           suite.budget(True)))


def test_cache_hit_rebuild_and_corrupt_entry(cache_dir):
    suite = ToySuite()
    first = protocol.run_suite(suite, ["linear"], quick=True, progress=False)
    assert suite.trained == Counter({"t0": 1, "t1": 1, "t2": 1})
    assert not any(e["cached"] for e in first.experts.values())
    second = protocol.run_suite(suite, ["linear"], quick=True, progress=False)
    assert suite.trained == Counter({"t0": 1, "t1": 1, "t2": 1})  # all hits
    assert all(e["cached"] for e in second.experts.values())
    assert second.row("linear").test == first.row("linear").test
    # corrupt one stored expert: detected by its hash, rebuilt (only that one), never reused
    entries = sorted((cache_dir / "experts").iterdir())
    assert len(entries) == 3 and not list((cache_dir / "experts").glob(".*tmp*"))
    victim = entries[0] / "backbone.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        protocol.run_suite(suite, ["linear"], quick=True, progress=False)
    assert sum(suite.trained.values()) == 4
    protocol.run_suite(suite, ["linear"], quick=True, progress=False, rebuild=True)
    assert sum(suite.trained.values()) == 7 and min(suite.trained.values()) == 2


def test_cache_entry_of_another_version_is_rebuilt(cache_dir):
    suite = ToySuite()
    protocol.run_suite(suite, ["linear"], tasks=["t0", "t1"], quick=True, progress=False)
    for meta in (cache_dir / "experts").glob("*/meta.json"):
        m = json.loads(meta.read_text())
        m["format"] = -1
        meta.write_text(json.dumps(m))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        protocol.run_suite(suite, ["linear"], tasks=["t0", "t1"], quick=True, progress=False)
    assert suite.trained == Counter({"t0": 2, "t1": 2})
    assert any("another version" in str(w.message) for w in caught)


def test_bad_input_errors(cache_dir, monkeypatch):
    suite = ToySuite()
    with pytest.raises(TaskError, match="unknown method 'nope'"):
        protocol.run_suite(suite, ["nope"], quick=True, progress=False)
    with pytest.raises(TaskError, match=r"unknown task 'zz'.*t0, t1, t2, ood"):
        protocol.run_suite(suite, ["linear"], tasks=["zz"], quick=True, progress=False)
    with pytest.raises(TaskError, match="no in-domain task"):
        protocol.run_suite(suite, ["linear"], tasks=["ood"], quick=True, progress=False)
    with pytest.raises(TaskError, match="unknown suite 'nope'; available: text, vision, llm"):
        suites.get_suite("nope")
    monkeypatch.setitem(suites.SUITES, "ghost", ("ghost_module_xyz", "Ghost", "not there"))
    with pytest.raises(TaskError, match="registered but its module"):
        suites.get_suite("ghost")
    assert suite.trained == Counter()  # validation happens before any training


def test_normalized_accuracy_formula():
    assert protocol.normalized_accuracy(0.45, 0.9) == pytest.approx(50.0)
    assert protocol.normalized_accuracy(0.9, 0.9) == pytest.approx(100.0)
    assert math.isnan(protocol.normalized_accuracy(0.5, 0.0))
    assert protocol.normalized_accuracy(20.0, 10.0, "perplexity") == pytest.approx(50.0)


def test_grids_are_valid_and_capped():
    for name, cls in available().items():
        normal, quick = grids.grid_for(name), grids.grid_for(name, quick=True)
        assert 1 <= len(quick) <= grids.QUICK_MAX_POINTS
        for point in normal + quick:
            cls.Params(**point)  # every grid parameter exists and is in range
        if name != "slerp":  # two models, a few interpolations: not an affine family
            assert len(grids.scale_groups(name, quick)) == 1  # quick grids cost one merge
    assert grids.grid_for("not_in_table") == [{}]
    # the default method set: every method with a grid, each a registered static method; the others when named
    assert [s.name for s in protocol.resolve_methods(None)] == list(grids.DEFAULT_METHODS) == list(grids.GRIDS)
    assert [s.name for s in protocol.resolve_methods(["della", "nuslerp"])] == ["della", "nuslerp"]
    groups = grids.scale_groups("ties", grids.grid_for("ties"))
    assert [g[0] for g in groups] == [{"density": 0.1, "lam": 1.0}, {"density": 0.2, "lam": 1.0}]
    assert [s for _, m in groups for _, s in m] == [0.7, 1.0, 1.5, 2.0, 0.7, 1.0, 1.5, 2.0]
    assert grids.scale_groups("neuromerging", [{"lambda2": "auto"}]) == [({"lambda2": "auto"}, [(0, None)])]
    assert grids.product(a=[1, 2], b=[3]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


@pytest.mark.parametrize("method", sorted(grids.SCALE_PARAMS))
def test_scale_parameter_is_affine(method):
    """θ(s) = θ0 + s·(θ(1) − θ0): the identity the protocol relies on to derive grid points."""
    g = torch.Generator().manual_seed(1)
    base = {"encoder.layer.0.attention.self.query.weight": torch.randn(8, 5, generator=g),
            "encoder.layer.0.attention.self.query.bias": torch.randn(8, generator=g),
            "encoder.layer.1.output.dense.weight": torch.randn(6, 8, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    scale = grids.SCALE_PARAMS[method]
    at_one = merge_state_dicts(method, base, experts, parameters={scale: 1.0}, seed=3, model_type="bert")
    direct = merge_state_dicts(method, base, experts, parameters={scale: 0.6}, seed=3, model_type="bert")
    derived = protocol.scaled(base, at_one, 0.6)
    assert any(not torch.allclose(direct[k], base[k]) for k in base)
    for k in base:
        torch.testing.assert_close(derived[k], direct[k], rtol=1e-5, atol=1e-6)


def test_model_count_problem():
    assert "exactly 2" in protocol.model_count_problem(get("slerp"), 5)
    assert protocol.model_count_problem(get("slerp"), 2) is None
    assert protocol.model_count_problem(get("ties"), 1) is None


def test_methods_resolve_aliases_once():
    specs = protocol.resolve_methods(["average", "linear", "ties"])
    assert [s.name for s in specs] == ["linear", "ties"]
    assert all(s.transductive is False for s in specs)


def test_model_folder_is_evaluated_by_tensor_name(cache_dir, tmp_path):
    from safetensors.torch import save_file

    suite = ToySuite()
    base = suite.backbone_state()
    folder = tmp_path / "merged"
    folder.mkdir()
    save_file({f"toy.{k}": v for k, v in base.items()} | {"classifier.weight": torch.zeros(2, D)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    got = protocol.load_merged_backbone(folder, base)
    assert set(got) == set(base) and all(torch.equal(got[k], base[k]) for k in base)
    res = protocol.run_suite(suite, tasks=["t0", "t1", "ood"], quick=True, model=folder, progress=False)
    row = res.rows[-1]
    assert row.kind == "model" and [r.kind for r in res.rows] == ["baseline", "experts", "model"]
    # the folder holds the pre-trained backbone: with the experts' heads, not the probes' heads
    assert set(row.test) == {"t0", "t1"} and set(row.ood) == {"ood"}
    only_ood = protocol.run_suite(suite, tasks=["ood"], quick=True, model=folder, progress=False)
    assert only_ood.rows[-1].ood["ood"] == pytest.approx(only_ood.row(protocol.BASE_ROW).ood["ood"])
    assert only_ood.rows[-1].test == {} and only_ood.rows[-1].mean is None
    save_file({"toy.encoder.layer.0.dense.weight": base["encoder.layer.0.dense.weight"]},
              str(folder / "model.safetensors"))
    with pytest.raises(TaskError, match=r"no tensor named 'encoder\.layer\.0\.dense\.bias'"):
        protocol.load_merged_backbone(folder, base)
    trained = sum(suite.trained.values())
    with pytest.raises(TaskError, match="does not exist"):
        protocol.run_suite(suite, tasks=["t0"], quick=True, model=tmp_path / "nowhere", progress=False)
    assert sum(suite.trained.values()) == trained  # refused before any training


def test_results_json_is_strict(cache_dir, tmp_path):
    res = protocol.run_suite(ToySuite(), ["linear"], quick=True, out=tmp_path / "o", progress=False)
    text = (Path(res.out) / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


class IdleSuite(ToySuite):
    """Experts that did not move: every grid point merges to the base, every validation score ties."""

    def budget(self, quick: bool) -> Budget:
        return Budget(quick=quick, train_steps=0, batch_size=64, eval_examples=60, probe_steps=30)


def test_ties_go_to_the_first_grid_point(cache_dir):
    res = protocol.run_suite(IdleSuite(), ["task_arithmetic"], quick=True, progress=False)
    row = res.row("task_arithmetic")
    assert len({g["val_mean"] for g in row.grid}) == 1
    assert row.params == grids.grid_for("task_arithmetic", quick=True)[0]


def test_a_failing_method_is_recorded_and_the_run_goes_on(cache_dir, tmp_path, monkeypatch):
    from neuromerge.errors import NotApplicable

    real = protocol.run_method

    def flaky(ctx, spec):
        if spec.name == "ties":
            raise RuntimeError("boom")
        if spec.name == "linear":
            raise NotApplicable("nothing to do here")
        return real(ctx, spec)

    monkeypatch.setattr(protocol, "run_method", flaky)
    res = protocol.run_suite(ToySuite(), ["ties", "linear", "task_arithmetic"], quick=True, out=tmp_path / "o",
                             progress=False)
    assert res.row("ties").skipped == "failed: RuntimeError: boom"
    assert res.row("linear").skipped == "not applicable: nothing to do here"
    assert res.row("task_arithmetic").skipped is None and res.row("task_arithmetic").test
    assert (tmp_path / "o" / "results.json").exists()
