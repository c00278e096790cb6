"""The router: a small MLP from pooled input features to expert logits, and its deterministic training.

``logits = MLP((x − μ) / σ)`` with ``μ, σ`` the training features' mean and standard deviation (buffers, so
they travel with the router's state dict). Three linear layers with ReLU between them (MERGE's "3-layer MLP
router", arXiv 2602.06552; MIN-Merging's "lightweight MLP router", arXiv 2510.17890), trained with Adam on
cross-entropy against the task id (defaults from MERGE: 30 epochs, lr 5e-4).

Initialisation and shuffling use a seeded ``torch.Generator``; the global RNG is never touched.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuromerge.errors import ConfigError


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` init (``U(−1/√in, 1/√in)`` for weight and bias) from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features else 0.0
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)


class Router(nn.Module):
    """MLP ``in_dim → hidden → … → n_out`` (``layers`` linear layers, ReLU between) over standardized input.

    ``mean`` / ``std`` buffers hold the standardization (0 / 1 until :func:`train_router` or
    :meth:`set_standardization` sets them). Weights are initialised from ``generator`` (seed 0 if None).
    """

    def __init__(self, in_dim: int, n_out: int, hidden: int = 256, layers: int = 3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if in_dim < 1 or n_out < 1 or hidden < 1 or layers < 1:
            raise ConfigError(f"router sizes must be positive: in_dim={in_dim} n_out={n_out} hidden={hidden} "
                              f"layers={layers}")
        self.in_dim, self.n_out, self.hidden, self.layers = in_dim, n_out, hidden, layers
        dims = [in_dim] + [hidden] * (layers - 1) + [n_out]
        linears = [nn.Linear(a, b, device="meta") for a, b in itertools.pairwise(dims)]
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        mods: list[nn.Module] = []
        for i, lin in enumerate(linears):
            lin = lin.to_empty(device="cpu")
            _init_linear(lin, gen)
            mods.append(lin)
            if i < len(linears) - 1:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def config(self) -> dict[str, int]:
        """Constructor arguments (saved in the routed model's manifest)."""
        return {"in_dim": self.in_dim, "n_out": self.n_out, "hidden": self.hidden, "layers": self.layers}

    def set_standardization(self, features: torch.Tensor) -> None:
        """``μ = mean(features)``, ``σ = std(features)`` (population); ``σ < 1e-6`` → 1 (constant features)."""
        f = features.detach().to(self.mean.dtype)
        std = f.std(dim=0, unbiased=False) if f.shape[0] > 1 else torch.ones_like(f[0])
        self.mean.copy_(f.mean(dim=0))
        self.std.copy_(torch.where(std < 1e-6, torch.ones_like(std), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_out)`` for features ``x (B, in_dim)``."""
        x = x.to(self.mean.dtype)
        return self.net((x - self.mean) / self.std)


def train_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_out: int,
    *,
    epochs: int = 30,
    lr: float = 5e-4,
    batch_size: int | None = 64,
    hidden: int = 256,
    layers: int = 3,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> tuple[Router, dict[str, Any]]:
    """Train a :class:`Router` on ``features (N, d)`` → ``labels (N,)`` (expert / task ids in ``[0, n_out)``).

    Adam on mean cross-entropy; each epoch visits a seeded permutation in mini-batches of ``batch_size``
    (``None`` or ``≥ N``: full batch). Returns ``(router in eval mode, {"train_acc": float, "loss": [mean
    loss per epoch]})``. Deterministic for a given seed (CPU).
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ConfigError(f"train_router needs features (N, d) and labels (N,), got {tuple(features.shape)} "
                          f"and {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ConfigError("train_router needs at least one example")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= n_out:
        raise ConfigError(f"router labels must lie in [0, {n_out}), got [{int(labels.min())}, {int(labels.max())}]")
    gen = torch.Generator().manual_seed(seed)
    x = features.detach().float().cpu()
    y = labels.cpu()
    router = Router(x.shape[1], n_out, hidden=hidden, layers=layers, generator=gen)
    router.set_standardization(x)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    bs = n if batch_size is None or batch_size >= n else batch_size
    losses: list[float] = []
    router.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
            total = 0.0
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                loss = F.cross_entropy(router(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / n)
    router.eval()
    with torch.no_grad():
        acc = float((router(x).argmax(dim=-1) == y).float().mean())
    return router, {"train_acc": acc, "loss": losses}
