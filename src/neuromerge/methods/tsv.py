"""TSV-Merge: Task Singular Vectors (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025, arXiv 2412.00081). Reference implementation: FusionBench
``fusion_bench.method.task_singular_vector.TSVM_utils.compute_and_sum_svd_mem_reduction``. docs/methods/spec.md §4.

Per 2-D tensor: thin SVD ``τ_t = U_t S_t V_tᵀ``; keep the first ``k = ⌊rank/T⌋`` components of each task
(``rank = min(out, in)``); concatenate ``U = [U_1,k … U_T,k]`` (``out × Tk``), ``S`` and ``V`` (``in × Tk``);
orthogonalize both by orthogonal Procrustes (``U = PΛQᵀ → PQᵀ``); ``τ_M = U⊥ diag(S) V⊥ᵀ``. Other tensors:
``τ_M = mean_t τ_t``. ``θ = θ0 + α τ_M``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..numeric import FiniteFloat
from .base import MergeInput, MergeMethod, MethodParams
from .registry import method


class TsvParams(MethodParams):
    """Parameters of TSV-Merge."""

    lam: FiniteFloat = Field(
        1.0, alias="lambda", description="scale α of the merged task vector (FusionBench's alpha, default 1)"
    )


def procrustes(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes / polar factor): ``A = PΛQᵀ → PQᵀ``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_merge_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """TSV merge of stacked 2-D task vectors ``deltas`` (``(T, out, in)``) → ``(out, in)``.

    ``k = ⌊min(out, in)/T⌋``; when ``k = 0`` (rank below the number of tasks) the merged update is 0, as in the
    reference implementation.
    """
    t, rows, cols = deltas.shape
    k = min(rows, cols) // t
    if k == 0:
        return torch.zeros(rows, cols, dtype=deltas.dtype, device=deltas.device)
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(rows, t * k)
    vh_cat = vh[:, :k, :].reshape(t * k, cols)
    s_cat = s[:, :k].reshape(t * k)
    return (procrustes(u_cat) * s_cat) @ procrustes(vh_cat.T).T


@method
class TsvMerge(MergeMethod[TsvParams]):
    """TSV-Merge (docs/methods/spec.md §4): per-task truncated SVD, Procrustes-orthogonalized concatenation."""

    name = "tsv"
    aliases = ("tsv_merge", "task_singular_vectors")
    Params = TsvParams
    summary = "task singular vectors: per-task rank-⌊r/T⌋ SVD, Procrustes-orthogonalized, summed"
    source = "Gargiulo et al. 2025, arXiv 2412.00081; FusionBench TaskSingularVectorMerging"
    chunkable = False

    def merge(self, x: MergeInput[TsvParams]) -> torch.Tensor:
        tau = x.weighted_deltas
        if x.kind == "neuronal" and tau.dim() == 3:
            merged = tsv_merge_matrix(tau)
            rank = min(tau.shape[1], tau.shape[2])
            x.report["tsv_rank_fraction"] = tau.shape[0] * (rank // tau.shape[0]) / rank
        else:
            merged = tau.mean(dim=0)
        return x.base + x.params.lam * merged
