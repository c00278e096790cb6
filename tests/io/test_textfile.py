"""Non-UTF-8 and malformed text inputs: one line naming the file and the byte offset (issue #16, items 13 and 15).

Covers the shared helper (:mod:`neuromerge.textfile`) and every reader that uses it: the merge config
(``neuromerge merge``), the search config (``neuromerge search``), the route config (``neuromerge route build``)
and the bench's task files (the YAML file, JSONL and CSV data files).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neuromerge.bench.taskfile import load_task_file, read_entries
from neuromerge.cli import app
from neuromerge.errors import ConfigError, TaskError
from neuromerge.tasks.contract import Budget
from neuromerge.textfile import load_yaml, read_text

runner = CliRunner()
BUDGET = Budget(quick=True, eval_examples=10, extra={"train_examples": 30, "val_examples": 8})
#: "é" in Latin-1 (0xe9) on line 2, column 10: byte offset 17 (line 1 has 7 bytes + newline)
LATIN1 = "base: x\nname: caf\xe9\n".encode("latin-1")
LATIN1_AT = "byte 0xe9 at offset 17 (line 2, column 10)"


def _one_line_error(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    assert "Traceback" not in msg
    return msg


def test_read_text_names_file_offset_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(LATIN1)
    with pytest.raises(ConfigError) as err:
        read_text(f, "config file")
    assert str(err.value) == f"config file {f} is not UTF-8 text: {LATIN1_AT}; save it as UTF-8"
    f.write_bytes(b"\xef\xbb\xbfa: 1\n")  # a byte-order mark is dropped
    assert read_text(f) == "a: 1\n" and load_yaml(f) == {"a": 1}
    with pytest.raises(TaskError, match=r"d\.txt cannot be read"):
        read_text(tmp_path / "d.txt", error=TaskError)


def test_load_yaml_malformed_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(f, "search config")
    msg = str(err.value)
    assert msg.startswith(f"search config {f} is not valid YAML: ") and "(line " in msg and "\n" not in msg


def test_merge_config_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "merge.yaml"
    f.write_bytes(b"merge_method: ties\nbase_model: caf\xe9\nmodels: []\n")
    msg = _one_line_error(["merge", str(f), "-o", str(tmp_path / "out"), "--no-progress"])
    assert str(f) in msg and "not UTF-8" in msg and "offset 34" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body", [LATIN1, b"suite: text\ntasks: [a, b\n"])
def test_search_config_not_utf8_or_malformed(tmp_path: Path, body: bytes) -> None:
    f = tmp_path / "search.yaml"
    f.write_bytes(body)
    msg = _one_line_error(["search", str(f), "-o", str(tmp_path / "out")])
    assert f"search config {f}" in msg
    assert (LATIN1_AT in msg) if body is LATIN1 else ("is not valid YAML" in msg and "line 3" in msg)
    assert not (tmp_path / "out").exists()


def test_route_config_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "route.yaml"
    f.write_bytes(LATIN1)
    msg = _one_line_error(["route", "build", "min_merging", "--config", str(f), "-o", str(tmp_path / "out")])
    assert f"route config {f} is not UTF-8 text: {LATIN1_AT}" in msg
    assert not (tmp_path / "out").exists()


def test_task_file_yaml_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "tasks.yaml"
    f.write_bytes(b"tasks:\n  - {name: caf\xe9, suite: text, file: d.csv}\n")
    with pytest.raises(TaskError, match=r"task file .*tasks\.yaml is not UTF-8 text: byte 0xe9 at offset 21 "
                                         r"\(line 2, column 15\)"):
        read_entries(f)


def test_task_data_jsonl_and_csv_not_utf8(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"text {i}", "label": i % 2}) for i in range(12)]
    good = ("\n".join(lines) + "\n").encode()
    (tmp_path / "d.jsonl").write_bytes(good[:40] + b"\xff" + good[40:])
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n  - {name: mine, suite: text, file: d.jsonl}\n")
    with pytest.raises(TaskError) as err:
        load_task_file(f, "text", BUDGET)
    msg = str(err.value)
    assert msg.startswith(f"task file {f}: task 'mine': data file ") and "d.jsonl is not UTF-8 text: byte 0xff at " \
        "offset 40 (line 2, column 10)" in msg, msg
    (tmp_path / "d.csv").write_bytes(b"text,label\nhello,1\nwor\xffld,2\n")
    f.write_text("tasks:\n  - {name: mine, suite: text, file: d.csv}\n")
    with pytest.raises(TaskError, match=r"d\.csv is not UTF-8 text: byte 0xff at offset 22 \(line 3, column 4\)"):
        load_task_file(f, "text", BUDGET)
