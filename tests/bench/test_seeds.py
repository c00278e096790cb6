"""Seeds, resume, combine, per-example results and statistics of the bench, on the tiny synthetic suite of
test_protocol (fast): every figure of results.json recomputes from its per-example bits."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neuromerge.bench import combine, protocol, recompute, suites
from neuromerge.evaluation import statistics as st
from neuromerge.tasks.contract import Split
from tests.bench.test_protocol import ToySuite

METHODS = ["task_arithmetic", "ties", "dare_linear"]


class SeedToy(ToySuite):
    """The toy suite with per-example results, whose experts depend on the seed (each trains on a seeded 70 %
    of its train split), so that seeds differ."""

    def train_expert(self, task, budget, mode, seed):
        g = torch.Generator().manual_seed(1000 * seed + sum(map(ord, task.name)))
        idx = torch.randperm(len(task.train), generator=g)[: int(0.7 * len(task.train))]
        sub = dataclasses.replace(task, train=Split(task.train.inputs[idx], task.train.labels[idx]))
        return super().train_expert(sub, budget, mode, seed)

    def evaluate_examples(self, backbone, head, task, split, budget):
        s = getattr(task, split)
        return (self._feats(backbone, s.inputs) @ head["weight"].T + head["bias"]).argmax(-1) == s.labels


pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, tol=1e-9) -> bool:
    """Nested dicts / lists equal, numbers within ``tol`` (None and bools exactly)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(
            _close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and not isinstance(b, bool) and isinstance(b, int | float):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


def _scores(res):
    return {s: {r.name: (r.test, r.normalized, r.ood, r.examples, r.params, r.skipped) for r in rows}
            for s, rows in res.per_seed.items()}


def test_seeds_rows_intervals_and_per_example_results(cache_dir, tmp_path):
    out = tmp_path / "o"
    res = protocol.run_suite(SeedToy(), METHODS, quick=True, out=out, progress=False, seeds=[0, 1, 2])
    assert res.seeds == [0, 1, 2] and res.seed == 0 and sorted(res.per_seed) == [0, 1, 2]
    names = [protocol.BASE_ROW, protocol.EXPERT_ROW, *METHODS]
    sizes = {t["name"]: t["sizes"]["test"] for t in res.tasks}
    for s, rows in res.per_seed.items():
        assert [r.name for r in rows] == names
        for r in rows:  # every row, baselines and experts included, keeps per-example results for every task
            want = {"t0", "t1", "t2"} if r.kind == "experts" else set(sizes)  # experts have no OOD score
            assert r.seed == s and set(r.examples) == want, r.name
            for t, packed in r.examples.items():
                bits = st.unpack_correct(packed)
                assert bits.size == sizes[t]
                score = r.test.get(t, r.ood.get(t))
                assert score == pytest.approx(bits.mean(), abs=1e-12 if r.kind != "experts" else 0.02)
    assert len({res.per_seed[s][1].test["t0"] for s in (0, 1, 2)}) > 1  # the seeds' experts differ
    # mean rows and their t-intervals
    ta = res.row("task_arithmetic")
    per = [res.per_seed[s][2] for s in (0, 1, 2)]
    assert ta.test["t1"] == pytest.approx(np.mean([r.test["t1"] for r in per]))
    iv = res.statistics["intervals"]["task_arithmetic"]
    direct = st.t_interval([r.mean_normalized for r in per])
    assert iv["mean_normalized"]["low"] == pytest.approx(direct.low)
    assert iv["mean_normalized"]["high"] == pytest.approx(direct.high)
    assert iv["ood"]["ood"]["n"] == 3 and iv["ood"]["ood"]["low"] is not None
    # comparisons: TIES and DARE vs TA, TA and DARE vs TIES; Holm-adjusted over the 4
    comps = res.statistics["comparisons"]
    assert [(c["method"], c["reference"]) for c in comps] == [
        ("ties", "task_arithmetic"), ("dare_linear", "task_arithmetic"), ("task_arithmetic", "ties"),
        ("dare_linear", "ties")]
    assert [c["p_holm"] for c in comps] == pytest.approx(st.holm([c["p_value"] for c in comps]))
    exact = np.mean([np.mean([r2.normalized[t] - r1.normalized[t] for t in ("t0", "t1", "t2")])
                     for r1, r2 in zip(per, [res.per_seed[s][3] for s in (0, 1, 2)], strict=True)])
    assert comps[0]["estimate"] == pytest.approx(exact, abs=1e-9)
    assert comps[0]["mdd_seeds"] is not None and comps[0]["replicates"] == st.BOOTSTRAP_REPLICATES
    # the report: intervals in the table, the comparisons, the machine; results.json has all of it
    md = (out / "results.md").read_text()
    assert " ± " in md and "## Comparisons (paired bootstrap)" in md and "torch threads" in md
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]["0"]
    assert env["cpu_count"] == os.cpu_count() and env["torch_threads"] == 1
    assert set(env["versions"]) == {"torch", "neuromerge", "transformers", "numpy"}
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    for png in ("normalized_accuracy.png", "in_vs_out_of_domain.png"):
        assert (out / png).stat().st_size > 1000


def test_every_figure_recomputes_from_the_per_example_results(cache_dir, tmp_path):
    out = tmp_path / "o"
    res = protocol.run_suite(SeedToy(), METHODS, quick=True, out=out, progress=False, seeds=[0, 1])
    data = json.loads((out / "results.json").read_text())
    # wipe every score of the per-seed rows: recompute must rebuild them from the bits
    for rows in data["per_seed"].values():
        for r in rows:
            if r["kind"] != "experts":
                r["test"] = dict.fromkeys(r["test"], -1.0)
                r["normalized"] = dict.fromkeys(r["normalized"], -1.0)
                r["ood"] = dict.fromkeys(r["ood"], -1.0)
    again = recompute(data)
    for a, b in zip(res.rows, again.rows, strict=True):
        assert a.name == b.name
        for part in ("test", "normalized", "ood"):
            assert getattr(b, part) == pytest.approx(getattr(a, part), abs=1e-9), (a.name, part)
    assert _close(again.statistics["comparisons"], res.statistics["comparisons"])
    assert _close(again.statistics["intervals"], res.statistics["intervals"])
    assert recompute(out / "results.json").markdown() == res.markdown()


def test_one_seed_has_no_interval(cache_dir, tmp_path):
    res = protocol.run_suite(SeedToy(), ["task_arithmetic", "ties"], quick=True, out=tmp_path / "o",
                             progress=False)
    iv = res.statistics["intervals"]["ties"]["mean_normalized"]
    assert iv["n"] == 1 and iv["low"] is None and iv["high"] is None
    md = (tmp_path / "o" / "results.md").read_text()
    assert "n/a (1 seed)" in md and " ± " not in md
    [c] = [c for c in res.statistics["comparisons"] if c["method"] == "ties"]
    assert c["mdd_seeds"] is None and c["mdd_examples"] > 0  # test-example resampling still works with one seed


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing records it as a failed row."""


def test_resume_after_a_kill_recomputes_only_the_rest(cache_dir, tmp_path, monkeypatch):
    suite = SeedToy()
    full = protocol.run_suite(suite, METHODS, quick=True, out=tmp_path / "full", progress=False, seeds=[0, 1])
    calls: list[str] = []
    real = protocol.run_method

    def dying(ctx, spec):
        if len(calls) == 4:  # seed 0's three methods and seed 1's first are done
            raise Killed
        calls.append(f"{ctx.seed}:{spec.name}")
        return real(ctx, spec)

    monkeypatch.setattr(protocol, "run_method", dying)
    out = tmp_path / "o"
    with pytest.raises(Killed):
        protocol.run_suite(suite, METHODS, quick=True, out=out, progress=False, seeds=[0, 1])
    assert sorted(p.name for p in (out / "rows" / "seed-1").glob("*.json")) == [
        "environment.json", "individual-experts.json", "pretrained-heads.json", "task_arithmetic.json"]
    assert not (out / "results.json").exists() and not list(out.rglob(".*tmp*"))
    calls.clear()
    monkeypatch.setattr(protocol, "run_method", lambda ctx, spec: (calls.append(f"{ctx.seed}:{spec.name}"),
                                                                    real(ctx, spec))[1])
    trained = sum(suite.trained.values())
    res = protocol.run_suite(suite, METHODS, quick=True, out=out, progress=False, seeds=[0, 1])
    assert calls == ["1:ties", "1:dare_linear"]  # only the rows the kill lost
    assert sum(suite.trained.values()) == trained  # seed 0 complete: its experts were not even loaded
    assert _scores(res) == _scores(full)
    assert res.statistics["comparisons"] == full.statistics["comparisons"]
    calls.clear()
    protocol.run_suite(suite, METHODS, quick=True, out=out, progress=False, seeds=[0, 1])
    assert calls == []  # a finished run recomputes nothing


def test_resume_after_sigkill_of_a_real_process(cache_dir, tmp_path):
    """A subprocess runs two seeds with a slow method; SIGKILL once a method row is on disk; the rerun computes
    the rest and the rows written before the kill are kept as they were."""
    out = tmp_path / "o"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import torch
        torch.set_num_threads(1)
        from neuromerge.bench import protocol
        from tests.bench.test_seeds import SeedToy
        real = protocol.run_method
        def slow(ctx, spec):
            row = real(ctx, spec)
            time.sleep(0.3 if spec.name == "task_arithmetic" else 30)
            return row
        protocol.run_method = slow
        protocol.run_suite(SeedToy(), {METHODS!r}, quick=True, out={str(out)!r}, progress=False, seeds=[0, 1])
    """))
    env = {**os.environ, "NEUROMERGE_CACHE": str(cache_dir), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = out / "rows" / "seed-0" / "task_arithmetic.json"
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = target.read_text()
    assert not (out / "rows" / "seed-0" / "ties.json").exists()
    res = protocol.run_suite(SeedToy(), METHODS, quick=True, out=out, progress=False, seeds=[0, 1])
    assert target.read_text() == before
    assert all(not r.skipped for rows in res.per_seed.values() for r in rows)
    full = protocol.run_suite(SeedToy(), METHODS, quick=True, out=tmp_path / "full", progress=False, seeds=[0, 1])
    assert _scores(res) == _scores(full)


def test_a_folder_of_another_run_is_refused(cache_dir, tmp_path):
    out = tmp_path / "o"
    protocol.run_suite(SeedToy(), ["task_arithmetic"], quick=True, out=out, progress=False)
    with pytest.raises(suites.BenchError, match=r"another run .*tasks"):
        protocol.run_suite(SeedToy(), ["task_arithmetic"], ["t0", "t1"], quick=True, out=out, progress=False)
    with pytest.raises(suites.BenchError, match=r"another run .*budget"):
        protocol.run_suite(SeedToy(), ["task_arithmetic"], quick=False, out=out, progress=False)
    with pytest.raises(suites.BenchError, match="twice"):
        protocol.run_suite(SeedToy(), ["task_arithmetic"], quick=True, progress=False, seeds=[1, 1])
    # more methods and more seeds join the same folder
    res = protocol.run_suite(SeedToy(), ["task_arithmetic", "ties"], quick=True, out=out, progress=False,
                             seeds=[0, 1])
    run = json.loads((out / "run.json").read_text())
    assert run["seeds"] == [0, 1] and run["rows"][-2:] == ["task_arithmetic", "ties"]
    assert res.seeds == [0, 1]


def test_combine_equals_one_run_of_all_seeds(cache_dir, tmp_path):
    suite = SeedToy()
    a = protocol.run_suite(suite, METHODS, quick=True, out=tmp_path / "s0", progress=False, seeds=[0])
    protocol.run_suite(suite, METHODS, quick=True, out=tmp_path / "s12", progress=False, seeds=[2, 1])
    both = protocol.run_suite(suite, METHODS, quick=True, out=tmp_path / "all", progress=False, seeds=[0, 1, 2])
    res = combine([tmp_path / "s0", tmp_path / "s12"], tmp_path / "c")
    assert res.seeds == [0, 1, 2] and a.seeds == [0]
    assert _scores(res) == _scores(both)
    assert _close(res.statistics["comparisons"], both.statistics["comparisons"])
    assert _close([r.test for r in res.rows], [r.test for r in both.rows])
    assert (tmp_path / "c" / "results.md").exists()
    assert sorted(json.loads((tmp_path / "c" / "results.json").read_text())["environment"]) == ["0", "1", "2"]
    # the combined folder is a run folder: combining it again refuses the duplicate seeds
    with pytest.raises(suites.BenchError, match="seed 0 is in both"):
        combine([tmp_path / "c", tmp_path / "s0"], tmp_path / "d")
    with pytest.raises(suites.BenchError, match="not an empty folder"):
        combine([tmp_path / "s0", tmp_path / "s12"], tmp_path / "c")
    protocol.run_suite(suite, ["task_arithmetic"], ["t0", "t1"], quick=True, out=tmp_path / "other",
                       progress=False, seeds=[5])
    with pytest.raises(suites.BenchError, match=r"not the same protocol .*tasks"):
        combine([tmp_path / "s0", tmp_path / "other"], tmp_path / "e")
    with pytest.raises(suites.BenchError, match="not a bench run folder"):
        combine([tmp_path / "s0", tmp_path], tmp_path / "f")


def test_combine_refuses_an_unfinished_run(cache_dir, tmp_path):
    protocol.run_suite(SeedToy(), ["task_arithmetic", "ties"], quick=True, out=tmp_path / "a", progress=False)
    protocol.run_suite(SeedToy(), ["task_arithmetic", "ties"], quick=True, out=tmp_path / "b", progress=False,
                       seeds=[1])
    (tmp_path / "b" / "rows" / "seed-1" / "ties.json").unlink()
    with pytest.raises(suites.BenchError, match=r"seed 1 is unfinished .*ties"):
        combine([tmp_path / "a", tmp_path / "b"], tmp_path / "c")


def test_cli_seeds_and_combine(cache_dir, tmp_path, monkeypatch):
    from neuromerge.cli import app

    monkeypatch.setattr(suites, "get_suite", lambda name: SeedToy())
    runner = CliRunner()
    base = ["bench", "toy", "--quick", "--methods", "task_arithmetic,ties", "--no-progress", "--threads", "1"]
    r0 = runner.invoke(app, [*base, "--seed", "0", "-o", str(tmp_path / "a")])
    assert r0.exit_code == 0, r0.output
    r1 = runner.invoke(app, [*base, "--seeds", "1,2", "-o", str(tmp_path / "b")])
    assert r1.exit_code == 0, r1.output
    assert " ± " in r1.output
    rc = runner.invoke(app, ["bench", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c")])
    assert rc.exit_code == 0, rc.output
    assert "seeds 0, 1, 2" in rc.output
    assert json.loads((tmp_path / "c" / "results.json").read_text())["seeds"] == [0, 1, 2]
    for args, message in [([*base, "--seeds", "1,x"], "comma-separated integers"),
                          ([*base, "--seeds", "1,1"], "distinct"),
                          ([*base, "--seed", "1", "--seeds", "2"], "not both"),
                          (["bench", "combine", str(tmp_path / "a")], "needs -o"),
                          (["bench", "combine", str(tmp_path / "a"), "-o", str(tmp_path / "z")], "at least two"),
                          (["bench", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--quick", "-o",
                            str(tmp_path / "z")], "not --quick"),
                          (["bench", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--seed", "0", "-o",
                            str(tmp_path / "z")], "not --seed"),
                          (["bench", "toy", str(tmp_path / "a")], "unexpected argument")]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_plots_carry_the_t_intervals_as_error_bars(cache_dir, tmp_path, monkeypatch, seeds):
    from neuromerge.bench import report

    res = protocol.run_suite(SeedToy(), ["task_arithmetic"], quick=True, progress=False, seeds=seeds)
    axes = []
    real = report._figure

    def keep(*args):
        fig, ax = real(*args)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(report, "_figure", keep)
    report.plot_normalized(res, tmp_path / "n.png")
    report.plot_in_vs_out(res, tmp_path / "o.png")
    bars = [c for c in axes[0].containers if hasattr(c, "errorbar")]
    assert len(bars) == 2  # pretrained + heads, task_arithmetic (the experts row is not plotted)
    if len(seeds) == 1:
        assert all(c.errorbar is None for c in bars) and not axes[1].containers  # no fake interval
        return
    ivs = res.statistics["intervals"]["task_arithmetic"]
    want = [ivs["normalized"][t]["high"] - ivs["normalized"][t]["mean"] for t in ("t0", "t1", "t2")]
    want.append(ivs["mean_normalized"]["high"] - ivs["mean_normalized"]["mean"])
    segments = bars[1].errorbar.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * w for w in want])
    # the toy's probes ignore the seed: the base row's accuracies are the same in both seeds (width 0, no bar in
    # the accuracy plot) while its normalized accuracies move with the experts (bars); TA moves in both
    assert bars[0].errorbar is not None and len(axes[1].containers) == 1


class PerplexityOOD(SeedToy):
    """The OOD task is scored by a perplexity-like number (lower is better) without per-example correctness."""

    def tasks(self, budget):
        out = super().tasks(budget)
        out[-1] = dataclasses.replace(out[-1], metric="perplexity")
        return out

    def evaluate(self, backbone, head, task, split, budget):
        if task.metric == "perplexity":
            return 1.0 + float(self._feats(backbone, getattr(task, split).inputs).abs().mean())
        return super().evaluate(backbone, head, task, split, budget)

    def evaluate_examples(self, backbone, head, task, split, budget):
        return None if task.metric == "perplexity" else super().evaluate_examples(backbone, head, task, split, budget)


def test_a_task_without_per_example_results_keeps_its_score(cache_dir, tmp_path):
    res = protocol.run_suite(PerplexityOOD(), ["task_arithmetic", "ties"], quick=True, out=tmp_path / "o",
                             progress=False, seeds=[0, 1])
    for rows in res.per_seed.values():
        for r in rows:
            assert "ood" not in r.examples  # nothing made up for the perplexity task
            if r.kind != "experts":
                assert r.ood["ood"] > 1 and r.ood_metrics["ood"] == "perplexity"
    iv = res.statistics["intervals"]["ties"]["ood"]["ood"]
    assert iv["mean"] == pytest.approx(np.mean([res.per_seed[s][3].ood["ood"] for s in (0, 1)]))  # not × 100
    assert len(res.statistics["comparisons"]) == 2  # the in-domain accuracy tasks still compare
    again = recompute(tmp_path / "o" / "results.json")
    assert _close([r.ood for r in again.rows], [r.ood for r in res.rows])
