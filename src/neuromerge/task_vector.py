"""A task-vector algebra for notebooks (after mlfoundations' ``task_vectors.py``, Ilharco et al. 2023).

```python
base, ft_a, ft_b = (Weights.load(p) for p in (base_dir, a_dir, b_dir))
tau = (ft_a - base) + (ft_b - base)           # TaskVector
merged = (0.3 * tau).apply_to(base)           # Weights: θ0 + 0.3 (τ_a + τ_b)
```
Only floating tensors take part; ``apply_to`` keeps the base's other tensors and dtypes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import CompatibilityError


def _floating(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if v.is_floating_point()}


class _TensorMap(Mapping[str, torch.Tensor]):
    """Read-only mapping of tensor names to tensors."""

    _d: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class Weights(_TensorMap):
    """A model's state dict (read-only mapping). ``Weights - Weights`` is a :class:`TaskVector`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._d = dict(tensors)

    @classmethod
    def load(cls, path: str | Path) -> Weights:
        """Every tensor of a checkpoint (HF folder, ``.safetensors``, sharded, ``.bin`` weights-only)."""
        from .io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        try:
            return cls({n: ckpt.read(n) for n in ckpt.names()})
        finally:
            ckpt.close()

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Weights:
        return cls({k: v.detach().clone() for k, v in module.state_dict().items()})

    def __sub__(self, other: Mapping[str, torch.Tensor]) -> TaskVector:
        return TaskVector.between(other, self)


class TaskVector(_TensorMap):
    """``τ = θ_ft − θ0`` over the floating tensors (fp32). Supports ``+``, ``-``, scalar ``*``, negation."""

    def __init__(self, deltas: Mapping[str, torch.Tensor]):
        self._d = {k: v.float() for k, v in deltas.items()}

    @classmethod
    def between(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> TaskVector:
        base_f, ft_f = _floating(base), _floating(finetuned)
        missing = sorted(set(base_f) ^ set(ft_f))
        if missing:
            raise CompatibilityError(f"the two models differ in floating tensors, e.g. {missing[0]!r}")
        out = {}
        for k, b in base_f.items():
            if b.shape != ft_f[k].shape:
                raise CompatibilityError(f"shape mismatch for {k!r}: {list(b.shape)} vs {list(ft_f[k].shape)}")
            out[k] = ft_f[k].float() - b.float()
        return cls(out)

    def _zip(self, other: TaskVector) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        if set(self._d) != set(other._d):
            raise CompatibilityError("task vectors cover different tensors")
        for k, v in self._d.items():
            yield k, v, other._d[k]

    def __add__(self, other: TaskVector) -> TaskVector:
        if isinstance(other, int) and other == 0:  # so that sum([...]) works
            return self
        return TaskVector({k: a + b for k, a, b in self._zip(other)})

    __radd__ = __add__

    def __sub__(self, other: TaskVector) -> TaskVector:
        return TaskVector({k: a - b for k, a, b in self._zip(other)})

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self._d.items()})

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: v * float(scale) for k, v in self._d.items()})

    __rmul__ = __mul__

    def norm(self) -> float:
        """Euclidean norm over every tensor (float64 accumulation)."""
        return float(sum(v.double().pow(2).sum() for v in self._d.values()) ** 0.5)

    def apply_to(self, base: Mapping[str, torch.Tensor] | torch.nn.Module, scale: float = 1.0) -> Weights:
        """``θ0 + scale · τ`` in the base's dtypes; tensors outside the task vector are kept from the base."""
        sd = base.state_dict() if isinstance(base, torch.nn.Module) else base
        out = {}
        for k, v in sd.items():
            out[k] = (v.float() + scale * self._d[k]).to(v.dtype) if k in self._d else v
        return Weights(out)
