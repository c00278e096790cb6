"""NeuroMerging (docs/methods/spec.md §1): a loop-based numpy reference, the §1.8 invariants, chunking and the λ2
rule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from neuromerge.methods import GlobalStats, MergeInput, get
from neuromerge.tensors.consensus import disjoint_merge
from neuromerge.tensors.neurons import elect_sign_rowwise, neuron_merge, orthogonal_merge, split_parallel

# --------------------------------------------------------------------------------------------- reference


def brute_stats(deltas: list[list[np.ndarray]], density: float) -> GlobalStats:
    """Exact global top-k thresholds by sorting every |τ_t| of the whole "model" (list of tensors)."""
    thresholds, removed, total, kept, count = [], [], [], [], []
    for per_tensor in deltas:
        flat = np.abs(np.concatenate([d.ravel() for d in per_tensor]).astype(np.float64))
        k = math.floor(density * flat.size + 1e-9)
        thr = float(np.sort(flat)[::-1][k - 1]) if k > 0 else math.inf
        thr = 0.0 if k >= flat.size else thr
        thresholds.append(thr)
        removed.append(float(flat[flat < thr].sum()))
        total.append(float(flat.sum()))
        kept.append(int((flat >= thr).sum()))
        count.append(flat.size)
    return GlobalStats(tuple(thresholds), tuple(removed), tuple(total), tuple(kept), tuple(count))


def ref_ties(values: np.ndarray, sign_method: str = "sum") -> np.ndarray:
    """TIES with explicit loops over the columns of ``values`` (T × n); zero signs → majority over columns."""
    t, n = values.shape
    gamma = np.zeros(n)
    for j in range(n):
        col = values[:, j]
        gamma[j] = np.sign(col.sum()) if sign_method == "sum" else np.sign(np.sign(col).sum())
    majority = 1.0 if gamma.sum() >= 0 else -1.0
    out = np.zeros(n)
    for j in range(n):
        g = gamma[j] if gamma[j] != 0 else majority
        agree = [values[i, j] for i in range(t) if values[i, j] != 0 and np.sign(values[i, j]) == g]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out


def svd_fixed_signs(o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD of ``o`` keeping the non-zero singular values (``s > 1e-9 s_max``), each ``u_j`` signed so that
    its largest-magnitude entry is positive (the convention of ``neurons.py``; it only matters when a
    coordinate's elected sign is a tie)."""
    u, s, vh = np.linalg.svd(o, full_matrices=False)
    live = s > 1e-9 * s.max() if s.size and s.max() > 0 else np.zeros(s.shape, dtype=bool)
    u, s, vh = u[:, live], s[live], vh[live]
    flip = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return s, vh * flip[:, None]


def ref_neuronal(
    w0: np.ndarray, taus: list[np.ndarray], recon: str, eta: float, sign_method: str
) -> tuple[np.ndarray, np.ndarray]:
    """ψ∥ and ψ⊥ row by row with ``np.linalg.svd`` (float64)."""
    rows, _ = w0.shape
    coef = np.zeros((len(taus), rows))
    orth = np.zeros((len(taus), *w0.shape))
    for k in range(rows):
        sq = float(w0[k] @ w0[k])
        for t, tau in enumerate(taus):
            coef[t, k] = (tau[k] @ w0[k]) / sq if sq > 0 else 0.0
            orth[t, k] = tau[k] - coef[t, k] * w0[k]
    cbar = ref_ties(coef, sign_method)
    parallel = np.zeros_like(w0)
    for k in range(rows):
        norm = np.linalg.norm(w0[k])
        unit = w0[k] if recon == "paper" else (w0[k] / norm if norm > 0 else 0 * w0[k])
        parallel[k] = cbar[k] * unit
    perp = np.zeros_like(w0)
    for k in range(rows):
        o = orth[:, k, :]
        s, vh = svd_fixed_signs(o)
        z = o @ vh.T
        z[~o.any(axis=1)] = 0.0  # a task without an orthogonal part has no coordinates (no round-off votes)
        zbar = ref_ties(z, sign_method)
        var = s**2
        if var.sum() == 0:
            continue
        cum = np.cumsum(var) / var.sum()
        rank = len(s) if eta >= 1 else min(int((cum < eta).sum()) + 1, len(s))
        for j in range(rank):
            perp[k] += zbar[j] * vh[j]
    return parallel, perp


def ref_merge(
    base: dict[str, np.ndarray], models: list[dict[str, np.ndarray]], stats: GlobalStats | None,
    p: dict[str, Any],
) -> dict[str, np.ndarray]:
    out = {}
    for name, w0 in base.items():
        taus = [m[name] - w0 for m in models]
        if stats is not None:
            taus = [np.where(np.abs(tau) >= thr, tau, 0.0) for tau, thr in zip(taus, stats.thresholds, strict=True)]
        if w0.ndim == 1:
            out[name] = w0 + p["lambda2"] * ref_ties(np.stack(taus), p["sign_method"])
            continue
        par, perp = ref_neuronal(w0, taus, p["parallel_reconstruction"], p["cum_threshold"], p["sign_method"])
        out[name] = w0 + p["lambda1"] * par + p["lambda2"] * perp
    return out


# --------------------------------------------------------------------------------------------- helpers


def make_x(
    base: torch.Tensor, models: list[torch.Tensor], params: dict[str, Any], stats: GlobalStats | None = None,
    rows: tuple[int, int] | None = None, per_model: list[dict[str, Any]] | None = None,
) -> MergeInput:
    cls = get("neuromerging")
    full = tuple(base.shape)
    a, b = rows if rows is not None else (0, full[0] if full else 1)
    sl = (lambda t: t[a:b]) if rows is not None else (lambda t: t)
    own = per_model or [{} for _ in models]
    return MergeInput(
        name="w", kind="neuronal" if base.dim() == 2 else "point", base=sl(base).clone(),
        models=[sl(m).clone() for m in models], params=cls.Params.model_validate(params),
        per_model=[cls.Params.model_validate({**params, **o}) for o in own], stats=stats, rows=(a, b),
        full_shape=full,
    )


def run(base: torch.Tensor, models: list[torch.Tensor], params: dict[str, Any], **kw: Any) -> torch.Tensor:
    return get("neuromerging")().merge(make_x(base, models, params, **kw))


def random_model(gen: torch.Generator, t: int, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[dict]]:
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    models = [{n: b + 0.1 * torch.randn(b.shape, generator=gen) for n, b in base.items()} for _ in range(t)]
    return base, models


def to_np(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in d.items()}


SHAPES = {"a.weight": (12, 7), "b.weight": (6, 16), "norm.weight": (9,)}

# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("recon", ["paper", "official"])
@pytest.mark.parametrize("eta", [1.0, 0.6])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_matches_loop_reference(recon: str, eta: float, sign_method: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base, models = random_model(gen, 3, SHAPES)
    base["a.weight"][[2, 5]] = 0.0  # neurons with w0 = 0: all of τ is orthogonal
    for m in models:
        m["a.weight"][[2, 5]] = 0.05 * torch.randn(2, 7, generator=gen)
    names = list(SHAPES)
    stats = brute_stats([[m[n].numpy() - base[n].numpy() for n in names] for m in models], 0.5)
    params = {"density": 0.5, "lambda1": 0.7, "lambda2": 1.3, "parallel_reconstruction": recon,
              "cum_threshold": eta, "sign_method": sign_method}
    expected = ref_merge(to_np(base), [to_np(m) for m in models], stats, params)
    for n in names:
        got = run(base[n], [m[n] for m in models], params, stats=stats)
        np.testing.assert_allclose(got.double().numpy(), expected[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_single_model_full_density_is_identity() -> None:
    gen = torch.Generator().manual_seed(2)
    base, models = random_model(gen, 1, {"w": (10, 33), "b": (10,)})
    base["w"][3] = 0.0
    params = {"density": 1.0, "lambda1": 1.0, "lambda2": 1.0}
    for n in ("w", "b"):
        got = run(base[n], [models[0][n]], params)
        torch.testing.assert_close(got - base[n], models[0][n] - base[n], rtol=1e-5, atol=1e-5)


def test_identical_task_vectors_merge_back() -> None:
    gen = torch.Generator().manual_seed(3)
    base, models = random_model(gen, 1, {"w": (8, 20), "b": (8,)})
    params = {"density": 1.0, "lambda1": 1.0, "lambda2": 1.0}
    for n in ("w", "b"):
        got = run(base[n], [models[0][n]] * 4, params)
        torch.testing.assert_close(got, models[0][n], rtol=1e-5, atol=1e-5)


def test_orthogonal_part_is_perpendicular_to_base_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(16, 40, generator=gen)
    deltas = torch.randn(3, 16, 40, generator=gen)
    parts = neuron_merge(base, deltas, cum_threshold=0.8)
    cos = (parts.orthogonal * base).sum(-1) / (parts.orthogonal.norm(dim=-1) * base.norm(dim=-1))
    assert float(parts.orthogonal.norm()) > 1.0
    assert float(cos.abs().max()) < 1e-5
    # ψ∥ (paper) is parallel to w0: w0 and ψ∥ are colinear row by row
    cross = parts.parallel.norm(dim=-1) * base.norm(dim=-1) - ((parts.parallel * base).sum(-1)).abs()
    assert float(cross.abs().max()) < 1e-4 * float(base.norm(dim=-1).max() * parts.parallel.norm(dim=-1).max())


def test_rank_deficient_and_narrow_rows_match_svd_reference() -> None:
    """Zero singular values (τ_4 = τ_1 + τ_2, an all-zero task, in < T) are handled like an exact SVD."""
    gen = torch.Generator().manual_seed(5)
    for width in (30, 2):
        orth = torch.randn(5, 9, width, generator=gen, dtype=torch.float64).float()
        orth[3] = orth[0] + orth[1]
        orth[4] = 0.0
        orth[:, 7] = 0.0  # a row with nothing at all
        got = orthogonal_merge(orth).double().numpy()
        expected = np.zeros((9, width))
        for k in range(9):
            o = orth[:, k, :].double().numpy()
            _, vh = svd_fixed_signs(o)
            z = o @ vh.T
            z[~o.any(axis=1)] = 0.0
            expected[k] = ref_ties(z) @ vh
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_official_reconstruction_divides_by_row_norm() -> None:
    gen = torch.Generator().manual_seed(6)
    base, models = random_model(gen, 3, {"w": (10, 12)})
    base["w"][4] = 0.0
    ms = [m["w"] for m in models]
    common = {"density": 1.0, "lambda1": 1.0, "lambda2": 0.0}
    paper = run(base["w"], ms, {**common, "parallel_reconstruction": "paper"}) - base["w"]
    official = run(base["w"], ms, {**common, "parallel_reconstruction": "official"}) - base["w"]
    norms = base["w"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(official * norms, paper, rtol=1e-5, atol=1e-6)
    assert float(paper[4].abs().max()) == 0.0 and float(paper.abs().max()) > 0


def test_chunks_equal_whole_tensor() -> None:
    gen = torch.Generator().manual_seed(7)
    base, models = random_model(gen, 3, {"w": (20, 11)})
    stats = brute_stats([[m["w"].numpy() - base["w"].numpy()] for m in models], 0.3)
    ms = [m["w"] for m in models]
    params = {"density": 0.3, "lambda1": 0.5, "cum_threshold": 0.9}
    whole = run(base["w"], ms, params, stats=stats)
    parts = [run(base["w"], ms, params, stats=stats, rows=r) for r in ((0, 7), (7, 20))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-7)


def test_lambda2_auto_is_one_over_one_minus_sigma() -> None:
    gen = torch.Generator().manual_seed(8)
    base, models = random_model(gen, 2, {"w": (9, 13)})
    models[1]["w"] = base["w"] + 3.0 * (models[1]["w"] - base["w"]) ** 3  # heavier tail: a different σ
    stats = brute_stats([[m["w"].numpy() - base["w"].numpy()] for m in models], 0.25)
    sigmas = [r / t for r, t in zip(stats.removed_l1, stats.total_l1, strict=True)]
    ms = [m["w"] for m in models]
    x = make_x(base["w"], ms, {"density": 0.25}, stats=stats)
    auto = get("neuromerging")().merge(x)
    explicit = run(base["w"], ms, {"density": 0.25, "lambda2": 1.0 / (1.0 - max(sigmas))}, stats=stats)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
    assert x.report["lambda2"] == pytest.approx(1.0 / (1.0 - max(sigmas)))
    assert x.report["sigma"] == pytest.approx(max(sigmas))
    assert x.report["lambda2_kept_mass_reading"] == pytest.approx(1.0 / min(sigmas))
    assert 0.0 < x.report["parallel_energy_share"] < 1.0


def test_global_densities_and_per_model_weight() -> None:
    nm = get("neuromerging")()
    params = nm.Params.model_validate({"density": 0.3})
    per_model = [nm.Params.model_validate({"density": d}) for d in (0.3, 0.1)]
    assert nm.global_densities(params, per_model) == [0.3, 0.1]
    fixed = nm.Params.model_validate({"scope": "tensor", "lambda2": 1.0})
    assert nm.global_densities(fixed, [fixed]) is None
    gen = torch.Generator().manual_seed(9)
    base, models = random_model(gen, 1, {"w": (5, 6)})
    got = run(base["w"], [models[0]["w"]], {"density": 1.0, "lambda1": 1.0, "lambda2": 1.0},
              per_model=[{"weight": 2.0}])
    torch.testing.assert_close(got - base["w"], 2.0 * (models[0]["w"] - base["w"]), rtol=1e-5, atol=1e-5)


def test_split_parallel_zero_rows() -> None:
    base = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    deltas = torch.tensor([[[1.0, 2.0], [5.0, -1.0]]])
    coef, orth = split_parallel(deltas, base)
    assert coef[0].tolist() == pytest.approx([11.0 / 25.0, 0.0])
    torch.testing.assert_close(orth[0, 1], deltas[0, 1])
    assert float((orth[0, 0] * base[0]).sum()) == pytest.approx(0.0, abs=1e-6)


def orthogonal_merge_coords(z: torch.Tensor) -> np.ndarray:
    """Disjoint mean of coordinates ``z`` (T × r) of one row with the row-wise election, as neurons.py does."""
    zr = z.unsqueeze(1)
    return disjoint_merge(zr, elect_sign_rowwise(zr), "mean")[0].double().numpy()


def test_zero_signs_take_the_majority_of_their_own_row() -> None:
    # row 0: coordinates lean negative and coordinate 2 is a tie; row 1: positive with a tie at coordinate 0
    x = torch.tensor([[[-1.0, -2.0, 1.0], [1.0, 0.5, 3.0]], [[-1.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]])
    got = elect_sign_rowwise(x, "sum")
    assert got.tolist() == [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]
    for r in range(2):
        expected = ref_ties(x[:, r, :].double().numpy())
        np.testing.assert_allclose(orthogonal_merge_coords(x[:, r, :]), expected)
    assert elect_sign_rowwise(x, "count").tolist() == [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]
