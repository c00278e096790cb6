"""``neuromerge route build``: bad configs give one ``error:`` line per problem, before anything is loaded or fitted;
relative paths resolve against the config file; no hub look-up without ``--allow-download`` (issue #16, item 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from neuromerge.cli import app
from neuromerge.tasks.hf import HFSuite

from .test_routed_methods import FAST, hf_fixture, tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()


def _errors(args: list[str], out: Path | None = None) -> list[str]:
    """Run the CLI; assert exit 2, only ``error:`` lines, no traceback, nothing written; the lines without the
    prefix."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if "neuromerge-tmp" in p.name]
    return [line.removeprefix("error: ") for line in lines]


def _config(tmp_path: Path, **cfg: Any) -> Path:
    path = tmp_path / "route.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def no_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and forbid) any model loading or probe fitting: validation must fail before."""
    calls: list[str] = []

    def forbidden(name: str):
        def f(*_a: Any, **_k: Any) -> None:
            calls.append(name)
            raise AssertionError(f"{name} ran before the config was validated")

        return f

    monkeypatch.setattr(HFSuite, "__init__", forbidden("HFSuite"))
    monkeypatch.setattr(HFSuite, "fit_probe", forbidden("fit_probe"))
    return calls


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _base_folder(path: Path, tokenizer: bool = True) -> Path:
    """A tiny BERT folder (config.json + weights), with or without a tokenizer file."""
    tiny_bert().save_pretrained(path)
    if tokenizer:
        (path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nw0\n")
    return path


def test_unknown_method_lists_the_real_ones() -> None:
    """In a fresh interpreter (no builder module imported yet) the message lists every registered builder."""
    code = ("from typer.testing import CliRunner; from neuromerge.cli import app; "
            "r = CliRunner().invoke(app, ['route', 'build', 'nosuch', '-o', 'x']); print(r.exit_code); "
            "print(r.output)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    code_line, *rest = res.stdout.strip().splitlines()
    assert code_line == "2", res.stdout + res.stderr
    msg = "\n".join(rest)
    assert "no routed-model builder for 'nosuch' (available: emr, merge, min_merging, twin, wemoe)" in msg, msg


def test_malformed_yaml_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "route.yaml"
    cfg.write_text("base: b\nexperts: {a: x\ntasks: t.yaml\n")
    [msg] = _errors(["route", "build", "min_merging", "--config", str(cfg), "-o", str(tmp_path / "out")],
                    tmp_path / "out")
    assert msg.startswith(f"route config {cfg} is not valid YAML: ") and "(line 3, column" in msg, msg
    cfg.write_text("method: min_merging\nbase: [b\n")
    [msg] = _errors(["route", "build", str(cfg), "-o", str(tmp_path / "out")], tmp_path / "out")
    assert "is not valid YAML" in msg


def test_missing_base_folder_no_hub_lookup(tmp_path: Path, no_probes: list[str], empty_hub_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromerge.io.hub as hub

    def no_download(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a hub download was attempted without --allow-download")

    monkeypatch.setattr(hub, "resolve_hf_id", no_download)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: a, suite: text, file: a.jsonl}\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 0}\n')
    out = tmp_path / "out"
    cfg = _config(tmp_path, base="models/bert-base", tasks="tasks.yaml", experts={"a": "ad"})
    [msg] = _errors(["route", "build", "min_merging", "--config", str(cfg), "-o", str(out)], out)
    assert msg.startswith(f"{cfg}: base: models/bert-base is neither a local folder (looked for "), msg
    assert str(tmp_path / "models/bert-base") in msg and str(empty_hub_cache) in msg and "--allow-download" in msg
    cfg = _config(tmp_path, base="no_such_base", tasks="tasks.yaml", experts={"a": "ad"})
    [msg] = _errors(["route", "build", "min_merging", "--config", str(cfg), "-o", str(out)], out)
    assert msg.startswith(f"{cfg}: base: model folder no_such_base does not exist (looked for "), msg
    assert no_probes == []


def test_allow_download_is_passed_to_the_hub(tmp_path: Path, no_probes: list[str], empty_hub_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromerge.io.hub as hub
    from neuromerge.errors import CheckpointError

    asked: list[tuple[str, bool]] = []

    def fake(repo_id: str, *, allow_download: bool = False) -> Path:
        asked.append((repo_id, allow_download))
        raise CheckpointError("offline")

    monkeypatch.setattr(hub, "resolve_hf_id", fake)
    out = tmp_path / "out"
    cfg = _config(tmp_path, method="twin", base="org/model", tasks="t.yaml", experts={"a": "ad"})
    lines = _errors(["route", "build", str(cfg), "-o", str(out), "--allow-download"], out)
    assert asked == [("org/model", True)]
    assert f"{cfg}: base: cannot download org/model from the Hugging Face hub: offline" in lines


def test_base_without_tokenizer_or_config(tmp_path: Path, no_probes: list[str]) -> None:
    base = _base_folder(tmp_path / "base", tokenizer=False)
    out = tmp_path / "out"
    cfg = _config(tmp_path, base="base", tasks="t.yaml", experts={"a": "ad"})
    lines = _errors(["route", "build", "emr", "--config", str(cfg), "-o", str(out)], out)
    assert f"{cfg}: base: {base} has no tokenizer (none of tokenizer.json, tokenizer_config.json, vocab.txt, " \
           "vocab.json, tokenizer.model, …); save it there with tokenizer.save_pretrained" in lines, lines
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path, base="empty", tasks="t.yaml", experts={"a": "ad"})
    lines = _errors(["route", "build", "emr", "--config", str(cfg), "-o", str(out)], out)
    assert f"{cfg}: base: {tmp_path / 'empty'} has no config.json; give a Hugging Face model folder" in lines


def test_every_problem_listed_one_line_each_before_any_probe(tmp_path: Path, no_probes: list[str]) -> None:
    _base_folder(tmp_path / "base")
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "adapter_config.json").write_text("{}")
    (tmp_path / "notpeft").mkdir()
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: a, suite: text, file: a.jsonl}\n"
                                         "  - {name: b, suite: text, file: b.jsonl}\n"
                                         "  - {name: c, suite: text, file: c.jsonl}\n")
    for t in "ab":
        (tmp_path / f"{t}.jsonl").write_text('{"text": "x", "label": 0}\n')
    out = tmp_path / "out"
    out.mkdir()  # exists, no --force
    cfg = _config(tmp_path, method="min_merging", base="base", tasks="tasks.yaml", seq_len=2, colour="red",
                  experts={"a": "good", "b": "gone", "c": "notpeft", "d": "good"},
                  params={"top_k": 0, "nope": 1})
    res = runner.invoke(app, ["route", "build", str(cfg), "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in res.output
    got = [line.removeprefix("error: ") for line in lines]
    want = [
        f"{cfg}: seq_len: Input should be greater than or equal to 4",
        f"{cfg}: colour: unknown key",
        f"{cfg}: experts.b: expert gone does not exist (looked for ",
        f"{cfg}: experts.c: {tmp_path / 'notpeft'} is neither a PEFT LoRA adapter folder (no adapter_config.json) "
        "nor a model checkpoint (",
        f"{cfg}: experts.d: no task 'd' in {tmp_path / 'tasks.yaml'} (found: a, b, c)",
        f"{cfg}: tasks: task 'c': data file {tmp_path / 'c.jsonl'} does not exist",
        f"{cfg}: params.top_k: Input should be greater than or equal to 1",
        f"{cfg}: params.nope: unknown key",
        f"output folder {out} exists; pass --force to replace it",
    ]
    for w in want:
        assert any(g.startswith(w) for g in got), (w, got)
    assert len(got) == len(want), got
    assert no_probes == [] and list(out.iterdir()) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices seen through PEFT
def test_relative_paths_resolve_against_the_config_and_load_anywhere(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    raw, merged = hf_fixture(tmp_path)
    cfg = {**raw, "base": "base", "tasks": "tasks.yaml", "experts": {"t0": "ad0", "t1": "ad1"},
           "params": {**FAST, "enhancement": False, "core_delta": -1.0}, "train_examples": 20, "val_examples": 8}
    (tmp_path / "route.yaml").write_text(yaml.safe_dump({"method": "min_merging", **cfg}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative paths do not exist from here: they resolve against route.yaml
    res = runner.invoke(app, ["route", "build", str(tmp_path / "route.yaml"), "-o", "routed"])
    assert res.exit_code == 0, res.output
    out = elsewhere / "routed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["ref"] == str(tmp_path / "base")
    assert manifest["extra"]["config"]["experts"] == {"t0": str(tmp_path / "ad0"), "t1": str(tmp_path / "ad1")}
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    from neuromerge.routing import load_routed

    model = load_routed(out)
    ids = torch.tensor([[2, 20, 21, 22, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad(), model.force(torch.tensor([[1.0, 0.0]])):
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, merged[0](input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-4,
                               rtol=1e-4)


def test_merge_builder_lists_problems_and_resolves_the_search_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, method="merge", storage_mb=-1, colour=1)
    out = tmp_path / "out"
    lines = _errors(["route", "build", str(cfg), "-o", str(out)], out)
    assert "route build merge: search: missing (required)" in lines and len(lines) >= 3, lines
    (tmp_path / "s").mkdir()
    cfg = _config(tmp_path, method="merge", search="s", point="mid")
    monkeypatch.chdir(tmp_path / "s")  # "s" does not exist from here: it resolves against route.yaml's folder
    [msg] = _errors(["route", "build", str(cfg), "-o", str(out)], out)
    assert msg == f"{tmp_path / 's'} holds no finished search (no pareto.json); run `neuromerge search` first", msg
    lines = _errors(["route", "build", str(cfg), "-o", str(out), "--allow-download"], out)
    assert lines == ["--allow-download does not apply to `route build merge` (it reads no hub model)"]
