"""Load the demo's merged model with transformers and show what the merge did (`make demo`, last step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers as tf


def main(models: Path, merged: Path) -> None:
    torch.set_grad_enabled(False)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("base", "expert0", "expert1", "expert2"):
        logits[name] = tf.AutoModelForCausalLM.from_pretrained(models / name).eval()(input_ids=ids).logits.float()
    out = tf.AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits.float()
    report = json.loads((merged / "merge_report.json").read_text())
    print(f"merged model loads with transformers: {type(tf.AutoModelForCausalLM.from_pretrained(merged)).__name__}")
    for name, ref in logits.items():
        cos = torch.nn.functional.cosine_similarity((out - logits["base"]).flatten(),
                                                    (ref - logits["base"]).flatten(), dim=0)
        print(f"  logit shift vs base, cosine with {name:<8}: {float(cos):+.3f}" if name != "base" else
              f"  mean |logit - base logit|: {float((out - ref).abs().mean()):.4f}")
    stats = report["global_statistics"]
    print(f"global trim thresholds: {[f'{t:.3g}' for t in stats['thresholds']]}, "
          f"kept density {[round(d, 4) for d in stats['kept_density']]}")
    print(f"timings (s): {report['timings_s']}, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"report: {merged / 'merge_report.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
