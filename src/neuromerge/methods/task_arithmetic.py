"""Task Arithmetic and the machinery shared by its sparsified / sign-elected variants (TIES, DARE,
Breadcrumbs).

Every member of the family computes ``θ = θ0 + λ · combine({w_t · s_t(τ_t)})`` where ``s_t`` sparsifies the
task vector ``τ_t = θ_t − θ0`` (identity for Task Arithmetic) and ``combine`` is either the plain
(optionally normalised) sum or the TIES sign election + disjoint merge. This is mergekit's
``GeneralizedTaskArithmeticMerge``; each variant is a configured subclass of :class:`TaskVectorMerge`, not a
copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import Field, model_validator

from .. import kernels
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
    sign_conflict_sample,
)
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method

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


class TaskVectorMerge(MergeMethod[P]):
    """Generalized task arithmetic: ``θ = θ0 + λ · combine({τ'_t})`` with ``τ'_t = w_t · s_t(τ_t)``.

    ``combine`` is chosen by the parameter model: :class:`LinearCombineParams` gives ``Σ_t τ'_t``
    (divided by ``Σ_t w_t`` when ``normalize``), :class:`ConsensusCombineParams` gives TIES: ``γ =
    sign(Σ_t τ'_t)`` (or of the sign counts; ties by ``zero_sign``) and the weighted disjoint merge
    (``dis-mean``: ``Σ m_t τ'_t / Σ m_t w_t``, ``dis-sum``: ``Σ m_t τ'_t``). Subclasses override
    :meth:`sparsify`. Reports ``sign_conflict`` (share of coordinates where the non-zero ``τ'_t``
    disagree in sign: exact for the TIES combine, which computes it anyway; estimated on every 16th row for the
    linear combine, :func:`~neuromerge.tensors.sparsify.sampled_sign_conflict_rate`) and, for sparsifying
    variants, ``kept_density`` (mean share of non-zero entries of ``s_t(τ_t)``).
    """

    #: True when :meth:`sparsify` drops entries (then ``kept_density`` is reported)
    sparsifying: ClassVar[bool] = False

    def whole_tensor_reasons(self, params: P) -> list[str]:
        """Why these parameters need whole tensors although the method is ``chunkable`` (empty: they do not).

        A count election with the majority rule for ties: ties are frequent and the majority is per slice."""
        if not isinstance(params, ConsensusCombineParams):
            return []
        if params.sign_method == "count" and params.zero_sign == "majority":
            return ["sign_method='count' with zero_sign='majority'"]
        return []

    def chunkable_for(self, params: P) -> bool:
        """Whether these parameters allow row chunks: ``chunkable`` holds for the default parameters; choices
        listed by :meth:`whole_tensor_reasons` need whole tensors and are refused on a row chunk."""
        return self.chunkable and not self.whole_tensor_reasons(params)

    def sparsify(self, x: MergeInput[P]) -> list[torch.Tensor]:
        """``s_t(τ_t)`` for every model (identity here)."""
        return x.deltas

    def merge(self, x: MergeInput[P]) -> torch.Tensor:
        params = x.params
        for reason in self.whole_tensor_reasons(params):
            require_whole_tensor(x, f"{self.name} with {reason}")
        taus = self.sparsify(x)
        weights = x.weights
        if isinstance(params, ConsensusCombineParams):
            weighted = [w * tau if w != 1.0 else tau for w, tau in zip(weights, taus, strict=True)]
            if params.zero_sign == "majority":
                sign = elect_sign(weighted, params.sign_method)
            else:
                sign = elect_sign_positive(weighted, params.sign_method)
            mixed, x.report["sign_conflict"] = disjoint_merge_with_conflicts(weighted, weights, sign, params.variant)
        elif isinstance(params, LinearCombineParams):
            # Σ_t w_t τ_t accumulated in place, in model order (no (T, ...) stack)
            mixed = taus[0] * weights[0]
            for w, tau in zip(weights[1:], taus[1:], strict=True):
                mixed.add_(tau * w if w != 1.0 else tau)  # product, then sum: no fused multiply-add
            if params.normalize:
                mixed.div_(weight_sum(weights))
            total_rows = x.full_shape[0] if x.full_shape else None
            x.report["sign_conflict"] = sampled_sign_conflict_rate(taus, x.rows[0], total_rows)
        else:  # pragma: no cover - programming error in a subclass
            raise TypeError(f"{type(self).__name__}.Params must derive from a combine parameter model")
        if self.sparsifying:
            x.report["kept_density"] = nonzero_fraction(taus)
        # θ0 + (λ τ_m): two roundings, as the fused kernels (torch's add(alpha=) may fuse them into one)
        return torch.add(x.base, mixed.mul_(params.lam))


@method
class TaskArithmetic(TaskVectorMerge[LinearCombineParams]):
    """Task Arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv 2212.04089).

    ``θ = θ0 + λ Σ_t w_t τ_t`` (``normalize``: ``θ0 + λ Σ_t w_t τ_t / Σ_t w_t``). λ defaults to 0.3 as in the
    official evaluation code and docs/methods/spec.md §4; mergekit's ``task_arithmetic`` defaults to λ = 1.
    """

    name = "task_arithmetic"
    Params = LinearCombineParams
    summary = "θ0 + λ Σ w_t τ_t"
    source = "Ilharco et al. 2023, arXiv 2212.04089; mergekit task_arithmetic"
    chunkable = True

    def fuses(self, params: LinearCombineParams, per_model: Sequence[LinearCombineParams]) -> bool:
        return kernels.available()

    def merge_fused(self, x: MergeInput[LinearCombineParams], out_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, int] | None:
        """:meth:`merge` in one pass (:func:`neuromerge.kernels.linear`), the same sampled sign-conflict rows."""
        if not kernels.supports(x.base, x.models):
            return None
        rows = x.base.shape[0] if x.base.dim() >= 2 else 1
        first, step = sign_conflict_sample(x.base.dim(), rows, x.rows[0], x.full_shape[0] if x.full_shape else None)
        weights = x.weights
        res = kernels.linear(
            x.base, x.models, weights, x.params.lam, normalize_by=weight_sum(weights) if x.params.normalize else None,
            out_dtype=kernels.output_dtype(out_dtype),
            row_len=x.base.numel() // max(1, rows), sample_first=first, sample_stride=step,
        )
        if res.out is None:
            return None
        sampled = res.counts["sampled"]
        x.report["sign_conflict"] = res.counts["conflicts"] / sampled if sampled else 0.0
        return res.out, res.nonfinite_out
