"""Task Arithmetic and the machinery shared by its sparsified / sign-elected variants (TIES, DARE,
Breadcrumbs).

Every member of the family computes ``θ = θ0 + λ · combine({w_t · s_t(τ_t)})`` where ``s_t`` sparsifies the
task vector ``τ_t = θ_t − θ0`` (identity for Task Arithmetic) and ``combine`` is either the plain
(optionally normalised) sum or the TIES sign election + disjoint merge. This is mergekit's
``GeneralizedTaskArithmeticMerge``: each variant is one row of the table in :mod:`neuromerge.methods.variants`
(:class:`Variant`: name, sparsifier, consensus, combine, parameter model with its defaults), turned into a
:class:`TaskVectorMerge` subclass by :func:`variant_class`; this module holds the general formula and Task
Arithmetic's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..numeric import FiniteFloat
from ..tensors.consensus import SignMethod, elect_sign
from ..tensors.sparsify import (
    TiesVariant,
    ZeroSign,
    disjoint_merge_with_conflicts,
    elect_sign_positive,
    nonzero_fraction,
    sampled_sign_conflict_rate,
)
from .base import MergeInput, MergeMethod, MethodParams
from .define import class_name_of

#: |Σ w_t| below this counts as zero when normalising (mergekit's guard); the sum is then left undivided
WEIGHT_SUM_EPS = 1e-8


def lam_field(default: float, note: str) -> Any:
    """The ``λ`` field (python ``lam``, ``lambda`` in configs) with its default and where it comes from."""
    return Field(default, alias="lambda", description=f"scaling λ of the merged task vector ({note})")


class CombineParams(MethodParams):
    """Parameters of the ``combine`` step shared by the family: the scaling ``λ`` (``lambda`` in configs)."""

    lam: FiniteFloat = lam_field(1.0, "mergekit's default 1.0")


class LinearCombineParams(CombineParams):
    """Plain weighted sum of task vectors, optionally normalised by the weight sum."""

    lam: FiniteFloat = lam_field(0.3, "docs/methods/spec.md §4 / official Task Arithmetic default 0.3")
    normalize: bool = Field(False, description="divide Σ_t w_t τ_t by Σ_t w_t")


class ConsensusCombineParams(CombineParams):
    """TIES sign election + disjoint merge. mergekit's ``normalize: true/false`` is accepted as an alias of
    ``variant: dis-mean/dis-sum``."""

    variant: TiesVariant = Field(
        "dis-mean",
        description="disjoint merge: dis-mean = Σ m_t w_t τ̂_t / Σ m_t w_t (TIES paper), "
        "dis-sum = Σ m_t w_t τ̂_t",
    )
    sign_method: SignMethod = Field(
        "sum", description="sign election: sum = sign(Σ_t w_t τ̂_t) (TIES), count = majority of the signs"
    )
    zero_sign: ZeroSign = Field(
        "majority",
        description="elected sign where the election gives 0: majority = the majority sign of the tensor "
        "(TIES code, per tensor), positive = +1 (mergekit, PEFT; independent of chunking)",
    )

    normalize: bool | None = Field(
        None, description="mergekit's spelling of the variant: true = dis-mean, false = dis-sum (unset: use variant)"
    )

    @model_validator(mode="after")
    def _normalize_alias(self) -> ConsensusCombineParams:
        if self.normalize is None:
            return self
        variant = "dis-mean" if self.normalize else "dis-sum"
        if "variant" in self.model_fields_set and self.variant != variant:
            raise ValueError(f"normalize={self.normalize} contradicts variant={self.variant!r}")
        self.variant = variant
        return self


P = TypeVar("P", bound=CombineParams)


def require_whole_tensor(x: MergeInput, reason: str) -> None:
    """Raise when ``x`` is a row chunk of a bigger tensor although ``reason`` needs the whole tensor."""
    if x.full_shape and tuple(x.full_shape) != tuple(x.base.shape):
        raise ConfigError(
            f"{x.name}: {reason} needs the whole tensor, but rows {x.rows[0]}..{x.rows[1]} of "
            f"{tuple(x.full_shape)} were given (this parameter choice is not chunkable)"
        )


def weight_sum(weights: Sequence[float]) -> float:
    """``Σ_t w_t``, or 1 when it is (numerically) zero, as mergekit does."""
    total = float(sum(weights))
    return 1.0 if abs(total) < WEIGHT_SUM_EPS else total


ParamsFn = Callable[[Any], list[str]]


@dataclass(frozen=True)
class Sparsifier:
    """The sparsification step ``s_t`` of a variant: ``apply(x)`` returns ``[s_t(τ_t)]`` for every model.

    ``per_model``: the parameters it reads per model (beyond ``weight``); ``global_densities(params, per_model)``:
    the densities whose global thresholds the statistics pass must compute (None: no statistics);
    ``whole_tensor_reasons(params)``: why these parameters need whole tensors; ``chunkable``: False when it never
    works on row chunks (per-tensor ranks); ``random``: True when it draws (the engine attaches a generator);
    ``check``: refusals at planning."""

    apply: Callable[[MergeInput[Any]], list[torch.Tensor]]
    per_model: frozenset[str] = frozenset()
    global_densities: Callable[[Any, Sequence[Any]], list[float] | None] | None = None
    whole_tensor_reasons: ParamsFn | None = None
    chunkable: bool = True
    random: bool = False
    #: planning-time refusal ``check(method, tensor, params, per_model)`` (``--dry-run`` refuses it too)
    check: Callable[[str, str, Any, Sequence[Any]], None] | None = None


Consensus = Literal["sign_election"]
Combine = Literal["sum", "disjoint_merge"]


@dataclass(frozen=True)
class Variant:
    """One row of the variants table: a configured :class:`TaskVectorMerge`.

    ``sparsify``: ``s_t`` (None: the identity, Task Arithmetic); ``consensus``: ``"sign_election"`` (TIES' elected
    sign ``γ``, then ``combine="disjoint_merge"``) or None (``combine="sum"``: ``Σ_t w_t s_t(τ_t)``, divided by
    ``Σ_t w_t`` with ``normalize``); ``params``: the parameter model, which holds the variant's defaults (it must
    derive from :class:`ConsensusCombineParams` for a consensus variant, from :class:`LinearCombineParams`
    otherwise). ``summary`` / ``source`` / ``aliases`` are shown by ``neuromerge methods``; ``doc`` (the formula
    and its source) becomes the class docstring."""

    name: str
    sparsify: Sparsifier | None
    consensus: Consensus | None
    combine: Combine
    params: type[CombineParams]
    summary: str
    source: str
    doc: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.consensus is None) != (self.combine == "sum"):
            raise ValueError(f"variant {self.name!r}: the disjoint merge goes with the sign election, the sum without")
        expected = ConsensusCombineParams if self.consensus else LinearCombineParams
        if not issubclass(self.params, expected):
            raise ValueError(f"variant {self.name!r}: params must derive from {expected.__name__}")


class TaskVectorMerge(MergeMethod[P]):
    """Generalized task arithmetic: ``θ = θ0 + λ · combine({τ'_t})`` with ``τ'_t = w_t · s_t(τ_t)``.

    The class attributes ``sparsifier`` / ``consensus`` come from the variant's row (:func:`variant_class`). Without
    consensus ``combine`` is ``Σ_t τ'_t`` (divided by ``Σ_t w_t`` when ``normalize``); with ``sign_election`` it is
    TIES: ``γ = sign(Σ_t τ'_t)`` (or of the sign counts; ties by ``zero_sign``) and the weighted disjoint merge
    (``dis-mean``: ``Σ m_t τ'_t / Σ m_t w_t``, ``dis-sum``: ``Σ m_t τ'_t``). Reports ``sign_conflict`` (share of
    coordinates where the non-zero ``τ'_t`` disagree in sign: exact for the TIES combine, which computes it anyway;
    estimated on every 16th row for the sum, :func:`~neuromerge.tensors.sparsify.sampled_sign_conflict_rate`) and,
    for sparsifying variants, ``kept_density`` (mean share of non-zero entries of ``s_t(τ_t)``).
    """

    sparsifier: ClassVar[Sparsifier | None] = None
    consensus: ClassVar[Consensus | None] = None

    @property
    def sparsifying(self) -> bool:
        """True when the variant drops entries (then ``kept_density`` is reported)."""
        return self.sparsifier is not None

    def global_densities(self, params: P, per_model: Sequence[P]) -> list[float] | None:
        s = self.sparsifier
        return s.global_densities(params, per_model) if s is not None and s.global_densities else None

    def whole_tensor_reasons(self, params: P) -> list[str]:
        """Why these parameters need whole tensors although the method is ``chunkable`` (empty: they do not): a
        count election with the majority rule for ties (ties are frequent and the majority is per slice), then the
        sparsifier's reasons."""
        out = []
        if self.consensus and params.sign_method == "count" and params.zero_sign == "majority":  # type: ignore[attr-defined]
            out.append("sign_method='count' with zero_sign='majority'")
        s = self.sparsifier
        return [*out, *(s.whole_tensor_reasons(params) if s is not None and s.whole_tensor_reasons else [])]

    def check(self, name: str, params: P, per_model: Sequence[P]) -> None:
        s = self.sparsifier
        if s is not None and s.check is not None:
            s.check(self.name, name, params, per_model)

    def chunkable_for(self, params: P) -> bool:
        """Whether these parameters allow row chunks: ``chunkable`` holds for the default parameters; choices
        listed by :meth:`whole_tensor_reasons` need whole tensors and are refused on a row chunk."""
        return self.chunkable and not self.whole_tensor_reasons(params)

    def sparsify(self, x: MergeInput[P]) -> list[torch.Tensor]:
        """``s_t(τ_t)`` for every model (the identity without a sparsifier)."""
        return self.sparsifier.apply(x) if self.sparsifier is not None else x.deltas

    def merge(self, x: MergeInput[P]) -> torch.Tensor:
        params: Any = x.params
        for reason in self.whole_tensor_reasons(params):
            require_whole_tensor(x, f"{self.name} with {reason}")
        taus = self.sparsify(x)
        weights = x.weights
        if self.consensus == "sign_election":
            weighted = [w * tau if w != 1.0 else tau for w, tau in zip(weights, taus, strict=True)]
            if params.zero_sign == "majority":
                sign = elect_sign(weighted, params.sign_method)
            else:
                sign = elect_sign_positive(weighted, params.sign_method)
            mixed, x.report["sign_conflict"] = disjoint_merge_with_conflicts(weighted, weights, sign, params.variant)
        else:
            # Σ_t w_t τ_t accumulated in place, in model order (no (T, ...) stack)
            mixed = taus[0] * weights[0]
            for w, tau in zip(weights[1:], taus[1:], strict=True):
                mixed.add_(tau * w if w != 1.0 else tau)  # product, then sum: no fused multiply-add
            if params.normalize:
                mixed.div_(weight_sum(weights))
            total_rows = x.full_shape[0] if x.full_shape else None
            x.report["sign_conflict"] = sampled_sign_conflict_rate(taus, x.rows[0], total_rows)
        if self.sparsifying:
            x.report["kept_density"] = nonzero_fraction(taus)
        # θ0 + (λ τ_m): two roundings, as the fused kernels (torch's add(alpha=) may fuse them into one)
        return torch.add(x.base, mixed.mul_(params.lam))


def variant_class(v: Variant) -> type[TaskVectorMerge[Any]]:
    """The :class:`TaskVectorMerge` subclass of one row (not registered; :mod:`.variants` registers the table)."""
    s = v.sparsify
    attrs: dict[str, Any] = {
        "__module__": __name__, "__qualname__": class_name_of(v.name), "__doc__": v.doc,
        "name": v.name, "aliases": v.aliases, "Params": v.params, "summary": v.summary, "source": v.source,
        "chunkable": s.chunkable if s is not None else True, "random": s.random if s is not None else False,
        "per_model_params": frozenset({"weight"}) | (s.per_model if s is not None else frozenset()),
        "sparsifier": s, "consensus": v.consensus,
    }
    return type(class_name_of(v.name), (TaskVectorMerge,), attrs)


#: Task Arithmetic's docstring (Ilharco et al. 2023)
TASK_ARITHMETIC_DOC = """Task Arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv 2212.04089).

``θ = θ0 + λ Σ_t w_t τ_t`` (``normalize``: ``θ0 + λ Σ_t w_t τ_t / Σ_t w_t``). λ defaults to 0.3 as in the
official evaluation code; mergekit's ``task_arithmetic`` defaults to λ = 1.
"""
