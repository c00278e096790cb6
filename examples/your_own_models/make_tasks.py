"""Two small text tasks the project never shipped (objects: fruit vs vehicle; mood: positive vs negative), as
JSONL files plus a task file, for ``walkthrough.sh``. Deterministic (seeded)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(7)
    fruits = ["apple", "banana", "cherry", "grape", "mango", "peach", "pear", "plum", "lemon", "melon"]
    vehicles = ["car", "truck", "bus", "bicycle", "train", "tram", "scooter", "van", "ship", "plane"]
    starts = ["I saw a", "She bought a", "They talked about the", "We painted the", "He found an old",
              "My friend wants a"]
    adjectives = ["red", "small", "shiny", "big", "green", "cheap", "fast", "old"]
    with open(folder / "objects.jsonl", "w", encoding="utf-8") as f:
        for i in range(240):
            noun = r.choice(fruits if i % 2 == 0 else vehicles)
            text = f"{r.choice(starts)} {r.choice(adjectives)} {noun} yesterday"
            f.write(json.dumps({"text": text, "label": ["fruit", "vehicle"][i % 2]}) + "\n")
    subjects = ["the weather", "the meeting", "your sister", "this movie", "the report", "our garden", "the trip",
                "that song", "the food", "his answer"]
    good = ["wonderful", "great", "lovely", "excellent", "pleasant", "fantastic"]
    bad = ["awful", "terrible", "boring", "dreadful", "bad", "horrible"]
    with open(folder / "mood.jsonl", "w", encoding="utf-8") as f:
        for i in range(240):
            word = r.choice(good if i % 2 == 0 else bad)
            text = f"{r.choice(['I think', 'Honestly', 'Everyone said'])} {r.choice(subjects)} was {word} today"
            f.write(json.dumps({"text": text, "label": ["positive", "negative"][i % 2]}) + "\n")
    (folder / "tasks.yaml").write_text(
        "tasks:\n  - {name: objects, suite: text, file: objects.jsonl}\n  - {name: mood, suite: text, file: mood.jsonl}\n",
        encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "my-tasks"))
