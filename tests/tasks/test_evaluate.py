"""``neuromerge evaluate`` / ``bench --base`` / :func:`neuromerge.evaluate`: a merged folder (``neuromerge merge``,
TIES) and a routed folder (``route build twin``) scored on a user's task file, normalised against the user's
experts — one a PEFT adapter (scored with a probe on its features), one a full ``BertForSequenceClassification``
checkpoint (scored with its own classifier) — and a folder's own ``heads/<task>.safetensors``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import neuromerge
from neuromerge.errors import TaskError
from neuromerge.evaluation import EvalResults, load_taskset
from neuromerge.evaluation.heads import ClassifierHead, check_head, folder_heads, label_order
from neuromerge.tasks.contract import Split, TaskData

from ..routing.test_routed_methods import ROUTER_FAST, hf_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = [f"w{i}" for i in range(30)]


def _task_rows(t: int, n: int = 60) -> str:
    """Label 0: words of one half of the task's 15 words, label 1: the other half (a probe on mean-pooled
    features learns it)."""
    g = torch.Generator().manual_seed(100 + t)
    rows = []
    for i in range(n):
        label = i % 2
        pool = WORDS[15 * t + 8 * label: 15 * t + 8 * label + 7]
        idx = torch.randint(0, len(pool), (5,), generator=g).tolist()
        rows.append({"text": " ".join(pool[k] for k in idx), "label": label})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def _classifier_expert(tmp: Path, expert: nn.Module) -> Path:
    """Expert t1 as a full checkpoint with a ``BertForSequenceClassification`` head: the adapter's merged backbone
    and a classifier fitted on its pooler outputs of the task's rows."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from neuromerge.tasks.probe import fit_linear

    clf = BertForSequenceClassification(expert.config.__class__(**{**expert.config.to_dict(), "num_labels": 2}))
    clf.bert.load_state_dict(expert.state_dict())
    clf.eval()
    tok = AutoTokenizer.from_pretrained(tmp / "base")
    assert tok.unk_token_id not in tok("w3 w17")["input_ids"]
    rows = [json.loads(line) for line in (tmp / "t1.jsonl").read_text().splitlines()]
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = clf.bert(**enc).pooler_output
    head = fit_linear(pooled, torch.tensor([r["label"] for r in rows]), 2, steps=200, l2=1e-4)
    with torch.no_grad():
        clf.classifier.weight.copy_(head["weight"])
        clf.classifier.bias.copy_(head["bias"])
    clf.save_pretrained(tmp / "full1")
    return tmp / "full1"


def _merge(tmp: Path) -> Path:
    from neuromerge.cli import app

    (tmp / "merge.yaml").write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "base",
                                                    "models": [{"model": "ad0"}, {"model": "ad1"}],
                                                    "parameters": {"density": 0.5}}))
    res = CliRunner().invoke(app, ["merge", str(tmp / "merge.yaml"), "-o", str(tmp / "merged"), "--no-progress"])
    assert res.exit_code == 0, res.output
    return tmp / "merged"


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):  # PEFT draws the adapters' A from the global generator
        torch.manual_seed(0)
        return _user(tmp_path_factory)


def _user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT base + a task file + experts {t0: PEFT adapter, t1: BertForSequenceClassification}, a TIES merge
    of the two adapters, a Twin routed folder over them, copies of both with their own heads, and the evaluation of
    all four through the Python API."""
    from neuromerge.routing.cli import find_builder

    tmp = tmp_path_factory.mktemp("user")
    _, merged_modules = hf_fixture(tmp)
    # hf_fixture's tokenizer knows the words (a `tokenizers` WordPiece model; see word_tokenizer)
    for t in range(2):
        (tmp / f"t{t}.jsonl").write_text(_task_rows(t))
    (tmp / "tasks.yaml").write_text("tasks:\n  - {name: t0, file: t0.jsonl}\n  - {name: t1, file: t1.jsonl}\n")
    _classifier_expert(tmp, merged_modules[1])
    (tmp / "evaluate.yaml").write_text("base: base\ntasks: tasks.yaml\nexperts: {t0: ad0, t1: full1}\n")
    merged = _merge(tmp)
    twin = find_builder("twin")({"base": str(tmp / "base"), "tasks": str(tmp / "tasks.yaml"),
                                 "experts": {"t0": str(tmp / "ad0"), "t1": str(tmp / "ad1")},
                                 "params": ROUTER_FAST}, tmp / "twin", force=False)
    ts = load_taskset(tmp / "evaluate.yaml")
    # the folders' own heads: t0's probe negated in the merged folder (every prediction flips), t1's in the routed
    shutil.copytree(merged, tmp / "merged_h")
    shutil.copytree(twin, tmp / "twin_h")
    heads = {"merged_h": ("t0", ts.experts[0].head), "twin_h": ("t1", ts.experts[1].head)}
    for folder, (task, head) in heads.items():
        (tmp / folder / "heads").mkdir(exist_ok=True)  # route build saves the experts' heads already
        save_file({"weight": -head["weight"], "bias": -head["bias"]},
                  str(tmp / folder / "heads" / f"{task}.safetensors"))
    results = neuromerge.evaluate(ts, [merged, twin, tmp / "merged_h", tmp / "twin_h"],
                                  tmp / "report", splits=["test", "val"])
    return {"tmp": tmp, "ts": ts, "results": results, "merged": merged, "twin": twin}


# ------------------------------------------------------------------------------------------------ the report
def test_report_rows_heads_and_normalisation(user: dict[str, Any]) -> None:
    res: EvalResults = user["results"]
    report = user["tmp"] / "report"
    assert sorted(p.name for p in report.iterdir()) == ["normalized_accuracy.png", "results.json", "results.md"]
    doc = json.loads((report / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["experts", "base", "merged", "twin", "merged_h", "twin_h"]
    assert [r["kind"] for r in doc["rows"]] == ["experts", "base", "merged", "routed", "merged", "routed"]
    experts = res.row("experts")
    for split in ("test", "val"):
        assert experts.normalized[split] == {"t0": 100.0, "t1": 100.0}
        assert doc["rows"][0]["mean_normalized"][split] == 100.0
    assert experts.scores["test"]["t1"] >= 0.75  # the classifier expert is a real one (random: about 0.5)
    # which head scored each task is recorded: the adapter's probe, the checkpoint's own classifier
    assert experts.heads == {"t0": "probe", "t1": "classifier"} == res.row("merged").heads
    # `route build` saves every task's head into the routed folder (heads/<task>.safetensors): they score it
    assert res.row("twin").heads == {"t0": "folder", "t1": "folder"} == res.row("twin_h").heads
    assert res.row("merged_h").heads == {"t0": "folder", "t1": "classifier"}
    assert doc["tasks"][1]["expert_classifier"] == "BertForSequenceClassification"
    for r in res.rows[1:]:  # normalised = 100 · score / expert score, per task and split
        for split in ("test", "val"):
            for t in ("t0", "t1"):
                want = 100.0 * r.scores[split][t] / experts.scores[split][t]
                assert r.normalized[split][t] == pytest.approx(want)
    md = (report / "results.md").read_text()
    assert "| experts | experts (upper reference) |" in md and "| merged | merged (ties) |" in md
    assert "routed (twin)" in md and "## val split" in md and "classifier" in md



def _test_inputs(tmp: Path, ts: Any, task: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from transformers import AutoTokenizer

    t = next(x for x in ts.tasks if x.name == task)
    tok = AutoTokenizer.from_pretrained(tmp / "base")
    enc = tok([str(x) for x in t.test.inputs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return dict(enc), t.test.labels


def test_classifier_expert_is_scored_with_its_own_head(user: dict[str, Any]) -> None:
    from transformers import BertForSequenceClassification

    from neuromerge.evaluation.models import read_backbone

    tmp, ts, res = user["tmp"], user["ts"], user["results"]
    inputs, labels = _test_inputs(tmp, ts, "t1")
    clf = BertForSequenceClassification.from_pretrained(tmp / "full1").eval()
    with torch.no_grad():
        direct = clf(**inputs).logits
    assert res.row("experts").scores["test"]["t1"] == pytest.approx(float((direct.argmax(-1) == labels).float().mean()))
    # the merged backbone under the expert's classifier, computed directly
    clf.bert.load_state_dict(read_backbone(user["merged"], ts.base))
    with torch.no_grad():
        on_merged = clf(**inputs).logits
    assert res.row("merged").scores["test"]["t1"] == pytest.approx(
        float((on_merged.argmax(-1) == labels).float().mean()))
    # the head's logits themselves, on a batch of the suite
    head = ClassifierHead(tmp / "full1", ts.tasks[1])
    batch = ts.suite.batches(ts.tasks[1], "test", ts.budget, limit=4)[0]
    with torch.no_grad():
        got = head.logits(ts.suite.module(ts.experts[1].backbone), batch)
        ref = BertForSequenceClassification.from_pretrained(tmp / "full1").eval()(**batch.inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_routed_folder_goes_through_its_router_and_folder_heads_score(user: dict[str, Any]) -> None:
    from neuromerge.evaluation.models import read_backbone
    from neuromerge.routing import load_routed

    ts, res = user["ts"], user["results"]
    t0, t1 = ts.tasks
    routed = load_routed(user["twin"])
    want = ts.suite.evaluate_module(routed, ts.experts[0].head, t0, "test", ts.budget)
    assert routed.last_probs is not None  # the router weighted the experts
    assert res.row("twin").scores["test"]["t0"] == pytest.approx(want)
    # the folder's own head (the negated probe): the same backbone scored with it
    flipped = {k: -v for k, v in ts.experts[0].head.items()}
    merged = read_backbone(user["merged"], ts.base)
    assert res.row("merged_h").scores["test"]["t0"] == pytest.approx(
        ts.suite.evaluate(merged, flipped, t0, "test", ts.budget))
    assert res.row("merged_h").scores["test"]["t0"] != res.row("merged").scores["test"]["t0"]
    assert res.row("merged_h").scores["test"]["t1"] == res.row("merged").scores["test"]["t1"]
    flipped1 = {k: -v for k, v in ts.experts[1].head.items()}
    assert res.row("twin_h").scores["test"]["t1"] == pytest.approx(
        ts.suite.evaluate_module(load_routed(user["twin"]), flipped1, t1, "test", ts.budget))


def test_a_named_suite_config_goes_through_the_registered_provider(user: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from neuromerge.tasks import named

    seen: dict[str, Any] = {}

    def provider(name: str, **kwargs: Any) -> Any:
        seen.update(name=name, **kwargs)
        return user["ts"]

    monkeypatch.setattr(named, "_PROVIDER", [provider])
    res = neuromerge.evaluate({"suite": "mine", "tasks": ["t0", "t1"], "quick": True}, [user["merged"]])
    assert seen["name"] == "mine" and seen["tasks"] == ["t0", "t1"] and seen["quick"] is True
    assert res.row("merged").scores["test"] == pytest.approx(user["results"].row("merged").scores["test"])
    with pytest.raises(TaskError, match="quik: unknown key with suite:"):
        neuromerge.evaluate({"suite": "mine", "quik": True})


# ------------------------------------------------------------------------------------------------ the commands
def test_evaluate_and_bench_base_commands(user: dict[str, Any]) -> None:
    from neuromerge.cli import app

    tmp = user["tmp"]
    (tmp / "experts.yaml").write_text("t0: ad0\nt1: full1\n")  # relative to experts.yaml's folder
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        res = CliRunner().invoke(app, ["bench", "--base", "base", "--experts", "experts.yaml", "--task-file",
                                       "tasks.yaml", "--model", "merged", "-o", "bench-out", "--no-progress"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    assert "| merged | merged (ties) |" in res.output
    doc = json.loads((tmp / "bench-out" / "results.json").read_text())
    ref = user["results"]
    for name in ("experts", "base", "merged"):  # the same numbers as the Python API
        row = next(r for r in doc["rows"] if r["name"] == name)
        assert row["scores"]["test"] == pytest.approx(ref.row(name).scores["test"])
    res = CliRunner().invoke(app, ["evaluate", str(tmp / "evaluate.yaml"), "--model", str(user["twin"]),
                                   "--tasks", "t1", "--no-plot", "-o", str(tmp / "eval-out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp / "eval-out" / "results.json").read_text())
    assert [t["name"] for t in doc["tasks"]] == ["t1"] and doc["rows"][2]["heads"] == {"t1": "folder"}
    assert sorted(p.name for p in (tmp / "eval-out").iterdir()) == ["results.json", "results.md"]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nope"], "error: model nope does not exist"),
    (["--tasks", "t0,zz"], "error: task 'zz' has no expert (experts: t0, t1)"),
    (["--splits", "train"], "error: split 'train' is not one of test, val"),
])
def test_evaluate_errors_are_one_line_and_write_nothing(user: dict[str, Any], args: list[str], message: str) -> None:
    from neuromerge.cli import app

    tmp = user["tmp"]
    out = tmp / "never"
    res = CliRunner().invoke(app, ["evaluate", str(tmp / "evaluate.yaml"), "-o", str(out), "--no-progress", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert lines == [message], res.output
    assert not out.exists()


def test_a_report_that_would_replace_an_input_is_refused(user: dict[str, Any]) -> None:
    from neuromerge.cli import app

    tmp = user["tmp"]
    for out in (tmp / "full1", tmp / "base"):  # an expert (the config names it), the base
        before = sorted(p.name for p in out.iterdir())
        res = CliRunner().invoke(app, ["evaluate", str(tmp / "evaluate.yaml"), "-o", str(out), "--force",
                                       "--no-progress"])
        assert res.exit_code == 2 and res.output.count("error:") == 1 and str(out) in res.output, res.output
        assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: give a SUITE (text, vision, llm), or --base, --experts and --task-file"),
    (["--base", "b"], "error: --experts is needed with --base; --task-file is needed with --base"),
    (["--base", "b", "--experts", "e", "--task-file", "t", "--quick"], "--quick is for a suite's bench"),
    (["text", "--model", "a", "--model", "b"], "error: a suite's bench scores one --model"),
])
def test_bench_base_refusals(args: list[str], message: str) -> None:
    from neuromerge.cli import app

    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_causal_lm_label_words_and_a_decoder_classifier(tmp_path: Path) -> None:
    """A causal LM: a label-word task reads no head (a folder's head for it is ignored); a task whose expert is a
    ``LlamaForSequenceClassification`` is scored with its ``score`` head on the last real token of the scored
    causal LM's final hidden state."""
    from transformers import LlamaForSequenceClassification

    from .test_user_model import _rows, _tiny_llama

    _tiny_llama(tmp_path / "llama")
    (tmp_path / "a.jsonl").write_text(_rows())
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - {name: words, file: a.jsonl, label_words: ['no', 'yes'], prompt: 'Q: {text} A:'}\n"
        "  - {name: cls, file: a.jsonl}\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        clf = LlamaForSequenceClassification.from_pretrained(tmp_path / "llama", num_labels=2)
    clf.save_pretrained(tmp_path / "cls-expert")
    shutil.copytree(tmp_path / "llama", tmp_path / "merged")
    (tmp_path / "merged" / "heads").mkdir()
    for task in ("words", "cls"):
        save_file({"weight": torch.randn(2, 16), "bias": torch.zeros(2)},
                  str(tmp_path / "merged" / "heads" / f"{task}.safetensors"))
    cfg = {"base": "llama", "tasks": "t.yaml", "experts": {"words": "llama", "cls": "cls-expert"}, "seq_len": 8,
           "probe_steps": 5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = neuromerge.evaluate(tmp_path / "c.yaml", [tmp_path / "merged"])
    assert res.row("experts").heads == res.row("base").heads == {"words": "label_words", "cls": "classifier"}
    assert res.row("merged").heads == {"words": "label_words", "cls": "folder"}
    assert res.row("merged").scores["test"]["words"] == res.row("base").scores["test"]["words"]  # same weights
    ts = load_taskset(tmp_path / "c.yaml")
    head = ClassifierHead(tmp_path / "cls-expert", ts.tasks[1])
    batch = ts.suite.batches(ts.tasks[1], "test", ts.budget, limit=4)[0]
    with torch.no_grad():
        got = head.logits(ts.suite.module(ts.experts[1].backbone), batch)
        want = LlamaForSequenceClassification.from_pretrained(tmp_path / "cls-expert").eval()(**batch.inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ heads
def _task(classes: list[str]) -> TaskData:
    empty = Split([], torch.zeros(0, dtype=torch.long))
    return TaskData("t", classes, empty, empty, empty)


def test_label_order_maps_classifier_labels_to_task_classes() -> None:
    assert label_order({0: "LABEL_0", 1: "LABEL_1"}, _task(["neg", "pos"]), "x") is None
    assert label_order({0: "neg", 1: "pos"}, _task(["neg", "pos"]), "x") is None
    assert label_order({0: "pos", 1: "neg"}, _task(["neg", "pos"]), "x") == [1, 0]
    with pytest.raises(TaskError, match="its classifier has 3 labels"):
        label_order({0: "a", 1: "b", 2: "c"}, _task(["neg", "pos"]), "x")
    with pytest.raises(TaskError, match=r"labels \(good, bad\) are not the classes"):
        label_order({0: "good", 1: "bad"}, _task(["neg", "pos"]), "x")


def test_folder_heads_from_a_routed_models_attribute_or_files(tmp_path: Path) -> None:
    task = _task(["a", "b", "c"])
    head = {"weight": torch.randn(3, 8), "bias": torch.randn(3)}

    class WithHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = {"t": head}

    got = folder_heads(tmp_path, WithHeads(), [task], {"t": 8})
    torch.testing.assert_close(got["t"]["weight"], head["weight"])
    assert folder_heads(tmp_path, nn.Linear(1, 1), [task], {"t": 8}) == {}  # no attribute, no file
    (tmp_path / "heads").mkdir()
    save_file({"weight": torch.randn(2, 8), "bias": torch.randn(2)}, str(tmp_path / "heads" / "t.safetensors"))
    with pytest.raises(TaskError, match=r"weight \(2, 8\) and bias \(2,\) do not fit task 't' with 3 classes"):
        folder_heads(tmp_path, None, [task], {"t": 8})
    with pytest.raises(TaskError, match="reads 8 features, the model gives 16"):
        check_head(head, task, "h", features=16)
    with pytest.raises(TaskError, match="needs tensors 'weight'"):
        check_head({"w": head["weight"]}, task, "h")


def test_per_example_results_give_every_reported_score(user: dict[str, Any]) -> None:
    """The scorer's per-example results (expert heads, a classifier expert, label order of the split) average to
    the scores in the report, for the experts, the base and a merged folder."""
    from neuromerge.evaluation.models import read_backbone
    from neuromerge.evaluation.run import _Scorer

    ts, res = user["ts"], user["results"]
    scorer = _Scorer(ts)
    merged = read_backbone(user["merged"], ts.base)
    for t, e in zip(ts.tasks, ts.experts, strict=True):
        source = res.row("experts").heads[t.name]
        clf = ClassifierHead(user["tmp"] / "full1", t) if source == "classifier" else None
        for name, model in (("experts", e.backbone), ("base", ts.base), ("merged", merged)):
            ex = scorer.examples(model, t, "test", source, e.head, clf)
            assert ex.correct is not None and len(ex) == min(len(t.test), ts.budget.eval_examples)
            assert ex.score == pytest.approx(res.row(name).scores["test"][t.name], abs=1e-12), (name, t.name)
