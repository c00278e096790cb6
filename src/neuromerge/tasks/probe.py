"""The linear probe every task-data implementation shares: multinomial logistic regression on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

StateDict = dict[str, torch.Tensor]


def fit_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int, l2: float
               ) -> StateDict:
    """Multinomial logistic regression ``softmax(W f + b)`` minimizing mean cross-entropy + ``l2/2·‖W‖²`` by
    full-batch L-BFGS (strong Wolfe line search) from ``W = 0, b = 0``: deterministic, no RNG."""
    d = feats.shape[1]
    w = torch.zeros(num_classes, d, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w.T + b, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"weight": w.detach().clone(), "bias": b.detach().clone()}
