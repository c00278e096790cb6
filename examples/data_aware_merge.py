"""A data-aware merge of "your own" models, end to end and offline (README, "Data-aware merges of your own models").

    python examples/data_aware_merge.py runs/data-aware-demo      # writes the folder below, then merges it

builds, under the folder given:

- ``base/``: a tiny BERT (2 layers, hidden 64) with a word-level tokenizer — stands for your pre-trained model;
- ``expert-sentiment/``, ``expert-topic/``: full checkpoints (the base plus seeded noise) — stand for your
  fine-tuned models (PEFT LoRA adapter folders work the same way);
- ``sentiment.jsonl``, ``topic.jsonl`` (``text``, ``label``) and ``tasks.yaml`` listing them;
- ``regmean.yaml``: the merge config (paths relative to it);

and runs ``neuromerge.merge("…/regmean.yaml", "…/merged")`` (the same as ``neuromerge merge … -o …``), printing
what RegMean read. ``--no-merge`` only writes the files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = {"sentiment": (["good", "great", "fine", "happy"], ["bad", "awful", "poor", "sad"]),
         "topic": (["goal", "match", "team", "score"], ["vote", "law", "party", "senate"])}
FILLER = ["the", "a", "this", "that", "was", "is", "very", "so"]

CONFIG = """\
merge_method: regmean          # or fisher, adamerging, adamerging++
base_model: base
models:
  - {model: expert-sentiment, task: sentiment}
  - {model: expert-topic, task: topic}
data: tasks.yaml               # or {tasks: tasks.yaml, seq_len: 64, train_examples: 1000, val_examples: 200}
parameters: {examples: 32, batch_size: 8}
"""


def build(folder: Path) -> Path:
    """Write the base, the experts, the task data and ``regmean.yaml`` under ``folder``; return the config path."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [w for pos, neg in WORDS.values() for w in pos + neg] + FILLER
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]) + "\n")
    cfg = BertConfig(vocab_size=len(vocab) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    base.save_pretrained(folder / "base")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    entries = []
    for task, classes in WORDS.items():
        expert = BertModel(cfg).eval()
        expert.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                for k, v in base.state_dict().items()})
        expert.save_pretrained(folder / f"expert-{task}")
        rows = []
        for i in range(80):
            label = i % 2
            words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(classes[label]) for _ in range(2)]
            rng.shuffle(words)
            rows.append(json.dumps({"text": " ".join(words), "label": ["positive", "negative"][label]
                                    if task == "sentiment" else ["sports", "politics"][label]}))
        (folder / f"{task}.jsonl").write_text("\n".join(rows) + "\n")
        entries.append(f"  - {{name: {task}, file: {task}.jsonl}}")
    (folder / "tasks.yaml").write_text("tasks:\n" + "\n".join(entries) + "\n")
    (folder / "regmean.yaml").write_text(CONFIG)
    return folder / "regmean.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, nargs="?", default=Path("runs/data-aware-demo"))
    ap.add_argument("--no-merge", action="store_true", help="only write the inputs")
    args = ap.parse_args()
    config = build(args.folder)
    print(f"wrote {config}")
    if args.no_merge:
        return
    import neuromerge

    result = neuromerge.merge(config, args.folder / "merged", force=True)
    report = result.report
    print(f"merged {report['summary']['merged_tensors']} tensors into {result.out}; RegMean read "
          f"{report['method']['examples']} {report['method']['split']} examples; heads: "
          f"{sorted(h for h in report['summary']['heads'].values() if h)}; peak RSS "
          f"{report['peak_rss_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
