"""Helpers for tests: tiny BERT / Llama / GPT-2 models made with transformers (no download) and configs."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "bert", "gpt2")



def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of the family ``arch`` (no download)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, num_labels=3)
        return tf.BertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add seeded Gaussian noise to every floating parameter (an 'expert' fine-tuned from the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (1 + p.abs().mean()))


def save(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def write_config(path: Path, method: str, base: Path | None, models: list[Path], **extra: object) -> Path:
    import yaml

    cfg: dict[str, object] = {"merge_method": method, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path
