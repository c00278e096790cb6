"""Create a small Llama-architecture base model and three "experts" for `make demo` (no download).

Each expert is the base plus a seeded low-rank update of its attention and MLP weights (the shape fine-tuning
updates tend to have) and a little dense noise, saved as Hugging Face folders in bf16, with a merge config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as tf
import yaml


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    experts = []
    for i in range(3):
        g = torch.Generator().manual_seed(1000 + i)
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    u = torch.randn(p.shape[0], 4, generator=g)
                    v = torch.randn(4, p.shape[1], generator=g)
                    noise = torch.randn(p.shape, generator=g)
                    p.add_((0.02 * (u @ v) / 4 + 0.002 * noise).to(p.dtype))
        model.save_pretrained(root / f"expert{i}")
        experts.append(f"expert{i}")
    config = {
        "merge_method": "neuromerging",
        "base_model": "base",
        "models": [{"model": e} for e in experts],
        "parameters": {"density": 0.2},
        "dtype": "bfloat16",
        "seed": 0,
    }
    (root / "neuromerging.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"demo models written to {root}: base + {len(experts)} experts, config {root / 'neuromerging.yaml'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/models"))
