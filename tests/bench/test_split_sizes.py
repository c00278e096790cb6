"""Test-split sizes of the normal budgets (issue #18 §4) and each task's standard error in ``results.md``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from neuromerge.bench import data, protocol, report, vision_data
from neuromerge.bench.llm import IN_DOMAIN as LLM_IN_DOMAIN
from neuromerge.bench.llm import LLMSuite
from neuromerge.bench.text import TextSuite
from neuromerge.bench.vision import VisionSuite
from tests.bench.test_protocol import ToySuite


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROMERGE_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_standard_error_formula():
    for p, n in [(0.5, 100), (0.9, 250), (0.0, 10), (0.731, 2551)]:
        assert report.standard_error(p, n) == pytest.approx(math.sqrt(p * (1 - p) / n), rel=1e-12)
    assert math.isnan(report.standard_error(0.5, 0))
    # independent check: the spread of simulated accuracies matches the formula
    g = torch.Generator().manual_seed(0)
    draws = (torch.rand(4000, 400, generator=g, dtype=torch.float64) < 0.8).double().mean(1)
    assert float(draws.std()) == pytest.approx(report.standard_error(0.8, 400), rel=0.05)


def test_text_normal_budget_scores_whole_test_splits():
    suite = TextSuite()
    tasks = suite.tasks(suite.budget(quick=False))
    for t in tasks:
        whole = data.text_task(t.name, seed=0, sizes=None, in_domain=t.in_domain)
        assert len(t.test) == len(whole.test), t.name
    assert min(len(t.test) for t in tasks) >= 155  # debate_party, the smallest task
    assert all(len(t.test) == 80 for t in suite.tasks(suite.budget(quick=True)))  # --quick unchanged


def test_vision_normal_budget_scores_whole_test_splits():
    suite = VisionSuite()
    for t in suite.tasks(suite.budget(quick=False)):
        whole = vision_data.image_task(t.name, seed=0, sizes=(None, None, None))
        assert len(t.test) == len(whole.test), t.name


def test_llm_normal_budget_has_at_least_200_test_examples_per_task():
    suite = LLMSuite()
    tasks = {t.name: t for t in suite.tasks(suite.budget(quick=False))}
    for name in LLM_IN_DOMAIN:
        assert len(tasks[name].test) >= 200, name
    assert len(tasks["debate_party"].test) == 155  # all the held-out task has (20 % of 774 statements)


def test_results_md_gives_each_task_its_standard_error(tmp_path):
    out = tmp_path / "out"
    res = protocol.run_suite(ToySuite(), ["task_arithmetic"], quick=True, out=out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    experts = {r["name"]: r for r in saved["rows"]}["individual experts"]["test"]
    base_ood = {r["name"]: r for r in saved["rows"]}["pretrained + heads"]["ood"]
    for t in saved["tasks"]:
        p = experts[t["name"]] if t["in_domain"] else base_ood[t["name"]]
        n = t["sizes"]["test"]
        line = next(x for x in md.splitlines() if x.startswith(f"| {t['name']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[4]) == pytest.approx(100 * math.sqrt(p * (1 - p) / n), abs=0.051)
        assert float(cells[5]) == pytest.approx(100 * math.sqrt(0.25 / n), abs=0.051)
    assert re.search(r"\| task \| in domain \| classes \| train / val / test \| std\. error \|", md)
    assert res.in_domain
