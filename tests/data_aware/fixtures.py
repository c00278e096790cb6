"""Tiny models and tasks for the data-aware tests (a 2-layer MLP classifier backbone, a hidden-32 BertModel)."""

from __future__ import annotations

import torch
from torch import nn

from neuromerge.data_aware.access import SimpleBatch, SimpleTask, TensorAccess

StateDict = dict[str, torch.Tensor]


class MLPBackbone(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def perturbed(state: StateDict, scale: float, seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def mlp_setup(tasks: int = 2, n: int = 24, classes: int = 3, seed: int = 0
              ) -> tuple[TensorAccess, StateDict, list[StateDict], list[StateDict], list[SimpleTask]]:
    torch.manual_seed(seed)
    base = MLPBackbone().state_dict()
    experts = [perturbed(base, 0.3, 10 + t) for t in range(tasks)]
    g = torch.Generator().manual_seed(seed + 1)
    heads = [{"weight": torch.randn(classes, 5, generator=g), "bias": torch.randn(classes, generator=g)}
             for _ in range(tasks)]
    task_list = []
    for t in range(tasks):
        splits = {s: SimpleBatch({"x": torch.randn(n, 6, generator=g) + t},
                                 torch.randint(0, classes, (n,), generator=g)) for s in ("train", "val", "test")}
        task_list.append(SimpleTask(f"t{t}", splits))
    return TensorAccess(MLPBackbone), base, experts, heads, task_list


def bert_config() -> object:
    from transformers import BertConfig

    return BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def bert_factory() -> nn.Module:
    from transformers import BertModel

    return BertModel(bert_config(), add_pooling_layer=False)


def bert_setup(tasks: int = 2, n: int = 6, seq: int = 7, classes: int = 3
               ) -> tuple[TensorAccess, StateDict, list[StateDict], list[StateDict], list[SimpleTask]]:
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in bert_factory().state_dict().items()}
    experts = [{k: (v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(20 + t + i))
                    if v.is_floating_point() else v) for i, (k, v) in enumerate(base.items())} for t in range(tasks)]
    g = torch.Generator().manual_seed(3)
    heads = [{"weight": torch.randn(classes, 32, generator=g), "bias": torch.zeros(classes)} for _ in range(tasks)]
    task_list = []
    for t in range(tasks):
        splits = {}
        for s in ("train", "val", "test"):
            ids = torch.randint(1, 40, (n, seq), generator=g)
            mask = torch.ones(n, seq, dtype=torch.long)
            mask[: n // 2, seq - 2:] = 0  # padded tail for half the examples
            ids = ids * mask
            splits[s] = SimpleBatch({"input_ids": ids, "attention_mask": mask}, torch.randint(0, classes, (n,),
                                                                                              generator=g), mask)
        task_list.append(SimpleTask(f"b{t}", splits))
    return TensorAccess(bert_factory), base, experts, heads, task_list
