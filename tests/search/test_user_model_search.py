"""MERGE on a user's own model (issue #17 item 3): ``neuromerge search`` with ``base:`` / ``tasks:`` / ``experts:``
on a tiny BERT with two experts — a PEFT LoRA adapter and a full checkpoint —, ``--resume``, refusal of changed
inputs, ``route build merge`` from the search folder then :func:`neuromerge.load_routed`, the Python API
(``neuromerge.search``, ``neuromerge.route_build``), one-line config errors, and a PostgreSQL worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import neuromerge
from neuromerge.cli import app
from neuromerge.errors import ConfigError
from neuromerge.search.merge_run import INPUTS_FILE, load_search_config
from tests.routing.test_routed_methods import hf_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SEARCH = {"base": "base", "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "full1"}, "probe_steps": 20,
          "population": 4, "budget": 4, "n_trees": 10}
IDS = torch.tensor([[2, 20, 21, 22, 3, 0], [2, 7, 8, 3, 0, 0]])


def full_checkpoint(folder: Path, model: torch.nn.Module, seed: int = 11, scale: float = 0.02) -> Path:
    """``model`` with every parameter (embeddings, norms, biases included) moved by seeded noise, saved as a full
    checkpoint folder: an expert that is no low-rank update of the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """``(folder of the user's files, search folder)``: ``neuromerge search user.yaml -o S --budget 4`` run from
    another working directory (the config's relative paths resolve against its folder)."""
    root = tmp_path_factory.mktemp("user-search")
    _, merged = hf_fixture(root)
    full_checkpoint(root / "full1", merged[1])
    (root / "user.yaml").write_text(yaml.safe_dump(SEARCH))
    elsewhere = tmp_path_factory.mktemp("cwd")
    here = Path.cwd()
    os.chdir(elsewhere)
    try:
        res = runner.invoke(app, ["search", str(root / "user.yaml"), "-o", "S", "--no-progress"])
    finally:
        os.chdir(here)
    assert res.exit_code == 0, res.output
    assert "all separate" in res.output and "static task_arithmetic" in res.output
    yield root, elsewhere / "S"


def _errors(args: list[str], out: Path | None = None) -> list[str]:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), res.output
    assert out is None or not out.exists()
    return [line.removeprefix("error: ") for line in lines]


def test_search_on_a_user_model_writes_the_front_with_measured_expert_scores(searched: tuple[Path, Path]) -> None:
    root, out = searched
    for name in ("pareto.json", "pareto.png", "hypervolume.png", "report.json", "representative.md", INPUTS_FILE):
        assert (out / name).stat().st_size > 0, name
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["tasks"] == ["t0", "t1"] and pareto["front"]
    assert set(pareto["reference_points"]) == {"static task_arithmetic", "all separate"}
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] is None and report["base"] == str(root / "base") and report["evaluations"] >= 4
    for t in ("t0", "t1"):  # the experts' test accuracy, measured with their probes (open_user_model leaves NaN)
        assert 0 < report["experts"][t]["test"] <= 1 and 0 < report["experts"][t]["val"] <= 1
    table = report["representative_table"]
    assert all(0 < row["test_score"] < 1e6 for row in table), table  # numbers, not NaN
    sep = next(r for r in table if r["row"] == "all separate")
    assert sep["backbones"] > 1  # two experts' components stored
    saved = json.loads((out / "search-config.json").read_text())  # absolute paths: loads from any folder
    assert saved["base"] == str(root / "base") and saved["tasks"] == str(root / "tasks.yaml")
    assert saved["experts"] == {"t0": str(root / "ad0"), "t1": str(root / "full1")}
    digest = json.loads((out / INPUTS_FILE).read_text())
    assert set(digest) == {"base", "tasks", "data", "experts"} and "adapter_config.json" in digest["experts"]["t0"]
    assert "model.safetensors" in digest["experts"]["t1"] and set(digest["data"]) == {"t0", "t1"}


def test_resume_continues_the_search(searched: tuple[Path, Path]) -> None:
    root, out = searched
    before = json.loads((out / "archive.json").read_text())
    again = _errors(["search", str(root / "user.yaml"), "-o", str(out), "--no-progress"])
    assert any("--resume" in line for line in again)
    res = runner.invoke(app, ["search", str(root / "user.yaml"), "-o", str(out), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "archive.json").read_text()) == before
    [line] = _errors(["search", str(root / "user.yaml"), "-o", str(out), "--resume", "--budget", "8"])
    assert "another config" in line


def test_route_build_merge_from_the_search_then_load_routed(searched: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = searched
    route = tmp_path / "route.yaml"
    route.write_text(yaml.safe_dump({"search": str(out), "point": "high accuracy", "router_epochs": 3,
                                     "router_examples": 16, "router_val_examples": 8}))
    res = runner.invoke(app, ["route", "build", "merge", "--config", str(route), "-o", str(tmp_path / "R")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "R" / "manifest.json").read_text())
    assert manifest["method"] == "merge" and manifest["tasks"] == ["t0", "t1"] and manifest["base"]["embedded"]
    assert manifest["extra"]["experts"] == {"t0": str(root / "ad0"), "t1": str(root / "full1")}
    model = neuromerge.load_routed(tmp_path / "R")
    mask = (IDS != 0).long()
    with torch.no_grad():
        hidden = model(input_ids=IDS, attention_mask=mask).last_hidden_state
        assert hidden.shape[:2] == IDS.shape and torch.isfinite(hidden).all()
        assert model.last_tasks is not None and set(model.last_tasks.tolist()) <= {0, 1}
        for t in range(2):  # forcing a task runs its chain of the library
            with model.force(torch.tensor([t, t])):
                forced = model(input_ids=IDS, attention_mask=mask).last_hidden_state
            plain = torch.func.functional_call(model.backbone, model.library.chain(t),
                                               kwargs={"input_ids": IDS, "attention_mask": mask})
            torch.testing.assert_close(forced, plain.last_hidden_state)

    # the Python API: the same builder (a mapping config, the search folder absolute)
    path = neuromerge.route_build("merge", {"search": str(out), "storage_mb": 1.0, "router_epochs": 2,
                                            "router_examples": 8, "router_val_examples": 4}, tmp_path / "R2")
    assert json.loads((Path(path) / "manifest.json").read_text())["method"] == "merge"


def test_python_api_search_matches_the_cli(searched: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = searched
    assert callable(neuromerge.search)  # the package is callable, even once its submodules are imported
    report = neuromerge.search(root / "user.yaml", tmp_path / "S2")
    assert report["fingerprint"] == json.loads((out / "report.json").read_text())["fingerprint"]
    assert json.loads((tmp_path / "S2" / "archive.json").read_text()) == json.loads((out / "archive.json").read_text())
    with pytest.raises(ConfigError, match="experts: MERGE needs at least 2 experts"):
        neuromerge.search({**SEARCH, "experts": {"t0": str(root / "ad0")}}, tmp_path / "S3")
    assert not (tmp_path / "S3").exists()


def test_config_errors_are_one_line_each_before_loading(searched: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from neuromerge.tasks.hf import HFSuite

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(HFSuite, "__init__", forbidden)
    root, _ = searched
    out = tmp_path / "out"

    def cfg(**raw: object) -> str:
        path = root / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    both = _errors(["search", cfg(suite="text", **SEARCH), "-o", str(out)], out)
    assert both == [f"{root / 'bad.yaml'}: give either `suite:` (a named suite) or `base:` + `tasks:` + `experts:` "
                    "(your own model), not both"]
    neither = _errors(["search", cfg(population=4), "-o", str(out)], out)
    assert neither == [f"{root / 'bad.yaml'}: give `suite:` (a named suite: text, vision, llm) or `base:` + `tasks:` "
                       "+ `experts:` (your own model)"]
    missing = _errors(["search", cfg(**{**SEARCH, "experts": {"t0": "ad0", "t1": "gone"}}), "-o", str(out)], out)
    assert len(missing) == 1 and missing[0].startswith(f"{root / 'bad.yaml'}: experts.t1: expert gone does not exist")
    several = _errors(["search", cfg(**{**SEARCH, "experts": {"t0": "ad0", "zz": "nowhere"}, "seq_len": 2,
                                        "mode": "lora"}), "-o", str(out), "--quick"], out)
    text = "\n".join(several)
    for part in ("seq_len: Input should be greater than or equal to 4", "quick: applies to a named suite only",
                 "mode: applies to a named suite only", "experts.zz: expert nowhere does not exist",
                 "experts.zz: no task 'zz'"):
        assert part in text, (part, several)
    assert len(several) == 5, several
    suite_keys = _errors(["search", cfg(suite="text", seq_len=8, tasks="tasks.yaml"), "-o", str(out)], out)
    assert [line.split(": ", 1)[1] for line in suite_keys] == [
        "seq_len: applies to your own model (base:), not to suite 'text'",
        "tasks: with `suite:`, a list of the suite's task names (a task file goes with `base:`)"]


def test_changed_inputs_refuse_resume_and_route_build(searched: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = searched
    copy = tmp_path / "S"
    shutil.copytree(out, copy)
    data = root / "t0.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original + b'{"text": "w1 w2 w3 w4", "label": 1}\n')
        [line] = _errors(["search", str(root / "user.yaml"), "-o", str(copy), "--resume", "--no-progress"])
        assert line.startswith(f"resume: the search in {copy} ran on other inputs; changed since: data.t0"), line
        route = tmp_path / "route.yaml"
        route.write_text(yaml.safe_dump({"search": str(copy), "point": "mid"}))
        [line] = _errors(["route", "build", "merge", "--config", str(route), "-o", str(tmp_path / "R")],
                         tmp_path / "R")
        assert "route build merge: the search in" in line and "changed since: data.t0" in line
    finally:
        data.write_bytes(original)
    # the same bytes again (a new modification time): the digest is content, so resume is accepted
    res = runner.invoke(app, ["search", str(root / "user.yaml"), "-o", str(copy), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output


def test_a_postgresql_worker_serves_the_user_model_search(searched: tuple[Path, Path], tmp_path: Path,
                                                          postgres_url: str) -> None:
    """The coordinator queues, a ``neuromerge search-worker`` process rebuilds the model from the same config and
    evaluates: the archive is the single-process one."""
    root, out = searched
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "neuromerge.cli", "search-worker", str(root / "user.yaml"),
                               "--storage", postgres_url, "--max-idle", "5"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cfg = load_search_config(root / "user.yaml", storage_url=postgres_url)
        report = neuromerge.search(cfg, tmp_path / "D")
    finally:
        stdout, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr[-2000:]
    assert "evaluated" in stdout and int(stdout.split()[1]) >= 1, stdout
    assert report["storage_url"] is not None and "evaluations" in report
    assert json.loads((tmp_path / "D" / "archive.json").read_text()) == json.loads((out / "archive.json").read_text())
