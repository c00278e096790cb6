"""A task file the project has never seen, through ``neuromerge bench text --quick --task-file F --seeds 0,1``
(the CLI, the real text suite): the report has intervals over the two seeds and per-example results for every
row and task, in-domain and OOD, and recomputes from them. About a minute and a half on 2 cores."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from neuromerge.bench import recompute
from neuromerge.evaluation.statistics import unpack_correct


def _write_tasks(folder: Path) -> Path:
    """Three made-up tasks (colour vs animal, day vs month, small vs large), 15 % of labels flipped so that
    accuracies are not all 100 % (each text unique: a text seen with two labels would be refused); JSONL and CSV
    with custom columns; the third is out of domain."""
    r = random.Random(2026)

    def label(i: int, a: str, b: str) -> str:
        y = a if i % 2 else b
        return (b if y == a else a) if r.random() < 0.15 else y

    colors = ["crimson", "teal", "amber", "violet", "olive", "maroon", "indigo", "coral"]
    animals = ["otter", "heron", "badger", "lynx", "gecko", "walrus", "falcon", "moose"]
    with open(folder / "hue.jsonl", "w", encoding="utf-8") as f:
        for i in range(160):
            w = r.choice(colors if i % 2 else animals)
            text = f"{r.choice(['look at the', 'we noticed a', 'there was one'])} {w} near fence {i}"
            f.write(json.dumps({"text": text, "label": label(i, "color", "animal")}) + "\n")
    days, months = ["monday", "tuesday", "friday", "sunday"], ["march", "july", "october", "january"]
    with open(folder / "when.csv", "w", encoding="utf-8") as f:
        f.write("sentence,kind\n")
        for i in range(160):
            f.write(f"\"parcel {i} arrives in {r.choice(days if i % 2 else months)} probably\","
                    f"{label(i, 'day', 'month')}\n")
    with open(folder / "size.jsonl", "w", encoding="utf-8") as f:
        for i in range(160):
            w = r.choice(["tiny", "minute", "small"] if i % 2 else ["huge", "giant", "vast"])
            f.write(json.dumps({"text": f"a {w} box number {i}", "label": label(i, "small", "large")}) + "\n")
    path = folder / "tasks.yaml"
    path.write_text("tasks:\n  - {name: hue, suite: text, file: hue.jsonl}\n"
                    "  - {name: when, suite: text, file: when.csv, text_column: sentence, label_column: kind}\n"
                    "  - {name: size, suite: text, file: size.jsonl, in_domain: false}\n", encoding="utf-8")
    return path


def test_a_new_task_file_with_two_seeds(tmp_path, text_bench_cache):
    tasks = _write_tasks(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "NEUROMERGE_CACHE": str(text_bench_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "neuromerge.cli", "bench", "text", "--quick", "--task-file",
                           str(tasks), "--tasks", "hue,when,size", "--methods", "task_arithmetic,ties", "--seeds",
                           "0,1", "-o", str(out), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and sorted(data["per_seed"]) == ["0", "1"]
    sizes = {t["name"]: t["sizes"]["test"] for t in data["tasks"]}
    assert set(sizes) == {"hue", "when", "size"} and all(n > 0 for n in sizes.values())
    for rows in data["per_seed"].values():
        assert [r["name"] for r in rows] == ["pretrained + heads", "individual experts", "task_arithmetic", "ties"]
        for r in rows:
            want = {"hue", "when"} if r["kind"] == "experts" else {"hue", "when", "size"}
            assert set(r["examples"]) == want, r["name"]
            for t, packed in r["examples"].items():
                bits = unpack_correct(packed)
                assert bits.size == sizes[t]
                if r["kind"] != "experts":
                    assert abs(bits.mean() - {**r["test"], **r["ood"]}[t]) < 1e-12
    ivs = data["statistics"]["intervals"]
    for name in ("task_arithmetic", "ties"):
        for part, task in (("test", "hue"), ("test", "when"), ("ood", "size")):
            iv = ivs[name][part][task]
            assert iv["n"] == 2 and iv["low"] is not None and iv["low"] <= iv["mean"] <= iv["high"]
        assert ivs[name]["mean_normalized"]["low"] is not None
    comps = data["statistics"]["comparisons"]
    assert {(c["method"], c["reference"]) for c in comps} == {("ties", "task_arithmetic"), ("task_arithmetic", "ties")}
    assert all(c["low"] <= c["estimate"] <= c["high"] and c["seeds"] == [0, 1] for c in comps)
    md = (out / "results.md").read_text()
    assert " ± " in md and "ties | task_arithmetic" in md
    assert data["environment"]["0"]["torch_threads"] == 1
    again = recompute(out / "results.json")
    assert [r.mean_normalized for r in again.rows] == [r["mean_normalized"] for r in data["rows"]]
