"""The contract between the merge engine and a static merge method.

A method is a class registered with :func:`neuromerge.methods.registry.method`. It declares a pydantic
``Params`` model (validated before any weight is read, shown by ``neuromerge methods NAME``) and implements
:meth:`MergeMethod.merge`, which receives *one* tensor (or one row chunk of it) of every model in fp32 and returns
the merged tensor. Whole-model quantities (the global top-k threshold of TIES / NeuroMerging, removed L1 mass)
are computed by the engine's statistics pass and handed over in :class:`MergeInput.stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..numeric import FiniteFloat

TensorKind = Literal["neuronal", "point"]


class MethodParams(BaseModel):
    """Base of every method's parameter model. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: multiplier of each model's task vector (mergekit's per-model ``weight``)
    weight: FiniteFloat = Field(1.0, description="per-model multiplier of its task vector (or of its weights)")


class UnweightedParams(MethodParams):
    """Parameters of a method that ignores per-model weights. A config's ``weight`` is dropped with a warning (the
    method's ``ignored_params``, as mergekit ignores it); built directly, a ``weight`` other than 1 is an error."""

    @field_validator("weight")
    @classmethod
    def _unit_weight(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("this method does not use per-model weights; remove `weight`")
        return value


@dataclass(frozen=True)
class GlobalStats:
    """Whole-model statistics computed by the engine's statistics pass, one entry per model.

    ``thresholds[t]``: the exact global magnitude threshold of model ``t`` (entries ``|τ_t| >= thr`` are kept).
    ``removed_l1[t]`` / ``total_l1[t]``: L1 mass of ``τ_t`` below the threshold / in total (float64 sums; empty
    tuples unless the method asked for them with ``needs_l1_mass``).
    ``kept[t]`` / ``total[t]``: entry counts; ``total`` is the trim's population, the entries of the tensors some
    model changes (the engine leaves out ``unchanged_entries`` entries of ``unchanged_tensors`` tensors whose task
    vectors are exactly zero in every model).
    """

    thresholds: tuple[float, ...]
    removed_l1: tuple[float, ...]
    total_l1: tuple[float, ...]
    kept: tuple[int, ...]
    total: tuple[int, ...]
    unchanged_entries: int = 0
    unchanged_tensors: int = 0

    @property
    def removed_fraction(self) -> tuple[float, ...]:
        """``σ_t = ‖τ_t ⊙ (1 − m_t)‖₁ / ‖τ_t‖₁`` per model."""
        return tuple(r / t if t > 0 else 0.0 for r, t in zip(self.removed_l1, self.total_l1, strict=True))


P = TypeVar("P", bound=MethodParams)

UniformFn = Callable[[int, tuple[int, ...]], torch.Tensor]


@dataclass
class MergeInput(Generic[P]):
    """Everything a method sees for one tensor (or one row chunk of it).

    ``base`` and ``models`` are fp32 in *canonical layout*: a neuronal tensor is 2-D with one output neuron per
    row (GPT-2 Conv1D matrices are transposed, conv kernels reshaped to ``(out, in·k·k)``); a point tensor is
    1-D. When the tensor is processed in row chunks, ``rows`` gives the chunk's row range in the full tensor
    and ``full_shape`` the canonical shape of the whole tensor.
    """

    name: str
    kind: TensorKind
    base: torch.Tensor
    models: Sequence[torch.Tensor]
    params: P
    per_model: Sequence[P]
    stats: GlobalStats | None = None
    rows: tuple[int, int] = (0, 0)
    full_shape: tuple[int, ...] = ()
    uniform: UniformFn | None = None
    #: False when the config names no ``base_model``: ``base`` is then the first model (it provides the names), and
    #: methods with an optional base (``nuslerp``, ``multislerp``) combine the models' weights instead of task vectors
    base_given: bool = True
    report: dict[str, float] = field(default_factory=dict)
    _deltas: list[torch.Tensor] | None = None

    @property
    def deltas(self) -> list[torch.Tensor]:
        """Task vectors ``τ_t = θ_t − θ0`` (computed once, fp32)."""
        if self._deltas is None:
            self._deltas = [m - self.base for m in self.models]
        return self._deltas

    @property
    def stacked_deltas(self) -> torch.Tensor:
        """``τ`` stacked as ``(T, ...)``."""
        return torch.stack(self.deltas)

    @property
    def weighted_deltas(self) -> torch.Tensor:
        """``w_t τ_t`` stacked as ``(T, ...)`` (per-model ``weight`` applied; unit weights are not multiplied)."""
        return torch.stack([d * w if w != 1.0 else d for d, w in zip(self.deltas, self.weights, strict=True)])

    @property
    def weights(self) -> list[float]:
        return [p.weight for p in self.per_model]

    def random_uniform(self, model_index: int) -> torch.Tensor:
        """Uniform [0, 1) draws for every entry of this chunk of model ``model_index``'s tensor, from a
        counter-based generator keyed by (seed, method, tensor name, model index) and the entry's position in
        the full tensor, so the draw does not depend on chunking or threads."""
        if self.uniform is None:  # pragma: no cover - the engine always provides it
            raise RuntimeError("no random generator attached to this MergeInput")
        return self.uniform(model_index, tuple(self.base.shape))


class MergeMethod(Generic[P]):
    """A static merge method. Subclasses set the class attributes and implement :meth:`merge`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: one-line summary and the source of the formula (paper / official code)
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    #: True when the result on a row chunk depends only on that chunk (and global stats): elementwise or
    #: row-wise methods. Per-tensor methods (SVD, per-tensor top-k, cosines) set False.
    chunkable: ClassVar[bool] = True
    #: number of models (excluding a base that is not listed among them) the method accepts
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    #: True when the method draws random numbers (DARE): the engine then attaches a generator
    random: ClassVar[bool] = False
    #: False for methods that only combine the models' weights (linear averaging): ``base_model`` may then be
    #: omitted and the first model provides the tensor names, non-merged tensors and config files
    needs_base: ClassVar[bool] = True
    #: True for methods that combine the models' *weights* ``θ_t`` (linear averaging), not their task vectors: a base
    #: also listed under ``models`` is then a model like any other (averaged with its weight, as mergekit does);
    #: otherwise it is dropped from the experts (its task vector is zero). SLERP's two-model rule is separate.
    averages_weights: ClassVar[bool] = False
    #: True for SLERP: a base also listed under ``models`` is one of the two interpolated models (put first), not a
    #: zero task vector to drop
    interpolates_base: ClassVar[bool] = False
    #: parameters that may differ per model (``models[i].parameters``); every other one is global: the method reads
    #: it once per tensor from ``params``, so a per-model value would be silently ignored — the config refuses it
    per_model_params: ClassVar[frozenset[str]] = frozenset({"weight"})
    #: parameters mergekit accepts for this method and ignores (``weight`` on ``slerp`` / ``model_stock``): a config
    #: that gives one is merged with a one-line warning instead of an error; unknown keys stay errors
    ignored_params: ClassVar[frozenset[str]] = frozenset()

    def global_densities(self, params: P, per_model: Sequence[P]) -> list[float] | None:
        """Per-model densities whose exact *global* top-k thresholds the statistics pass must compute, or None
        when the method needs no whole-model statistics."""
        return None

    def check(self, name: str, params: P, per_model: Sequence[P]) -> None:
        """Refuse (:class:`~neuromerge.errors.ConfigError`) resolved parameters of tensor ``name`` that the merge
        would refuse; called for every merged tensor at planning, so that ``--dry-run`` refuses it too. Nothing
        by default."""

    def needs_l1_mass(self, params: P) -> bool:
        """Whether the statistics pass must also sum the L1 mass of ``τ_t`` below/above each global threshold
        (``GlobalStats.removed_l1`` / ``total_l1``; NeuroMerging's λ2 rule). Off by default: it costs a float64
        weighted histogram per chunk."""
        return False

    def chunkable_for(self, params: P) -> bool:
        """Whether this tensor may be processed in row chunks with these (resolved) parameters; defaults to the
        class attribute ``chunkable`` (e.g. TIES is chunkable with a global trim, not with a per-tensor one)."""
        return self.chunkable

    def merge(self, x: MergeInput[P]) -> torch.Tensor:
        """Return the merged tensor ``θ`` (fp32, canonical layout, shape of ``x.base``)."""
        raise NotImplementedError
