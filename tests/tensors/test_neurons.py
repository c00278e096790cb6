"""``tensors/neurons.py`` (NeuroMerging's per-neuron operations, docs/methods/spec.md §1.3–§1.5): the split's
parts sum to τ and are orthogonal per neuron; every function against a per-row float64 loop; the Gram route of the
orthogonal merge against an explicit thin SVD of each row's stack."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.tensors.neurons import (
    GRAM_RTOL,
    cumulative_variance_keep,
    elect_sign_rowwise,
    gram64,
    gram_eigh,
    merge_coefficients,
    neuron_merge,
    orthogonal_merge,
    orthogonal_mix,
    reconstruct_parallel,
    split_parallel,
)
from tests.tensors.strategies import FAST, FEW, arrays

METHODS = st.sampled_from(["sum", "count"])


def _sign(v: float) -> float:
    return 1.0 if v > 0 else -1.0 if v < 0 else 0.0


@st.composite
def neurons(draw: st.DrawFn, max_t: int = 4, zero_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base (rows, d), deltas (T, rows, d))``, float64, sometimes with an all-zero base row."""
    t, rows, d = draw(st.integers(1, max_t)), draw(st.integers(1, 6)), draw(st.integers(1, 9))
    base = draw(arrays((rows, d)))
    deltas = draw(arrays((t, rows, d)))
    if zero_row and draw(st.booleans()):
        base[draw(st.integers(0, rows - 1))] = 0.0
    return base, deltas


# -------------------------------------------------------------------------------------------------------- the split


@FAST
@given(neurons())
def test_split_parallel_parts_sum_to_tau_and_are_orthogonal(case) -> None:
    """Per neuron ``k``: ``c_t^k = ⟨τ, w0⟩/‖w0‖²`` (0 for ``w0 = 0``), ``τ∥ + τ⊥ = τ`` and ``⟨τ⊥, w0⟩ = 0`` (to
    rounding relative to ``‖τ‖ ‖w0‖``)."""
    base, deltas = case
    coef, orth = split_parallel(deltas, base)
    t, rows, _ = deltas.shape
    for k in range(rows):
        w0 = base[k].tolist()
        sq = sum(v * v for v in w0)
        for i in range(t):
            tau = deltas[i, k].tolist()
            expected = sum(a * b for a, b in zip(tau, w0, strict=True)) / sq if sq > 0 else 0.0
            assert abs(float(coef[i, k]) - expected) <= 1e-12 * max(1.0, abs(expected))
    parallel = coef.unsqueeze(-1) * base
    torch.testing.assert_close(parallel + orth, deltas, rtol=0, atol=1e-12 * float(deltas.abs().max().clamp(min=1)))
    dots = torch.einsum("tki,ki->tk", orth, base)
    scale = torch.linalg.vector_norm(deltas, dim=-1) * torch.linalg.vector_norm(base, dim=-1)
    assert bool((dots.abs() <= 1e-12 * scale + 1e-300).all())
    zero = torch.linalg.vector_norm(base, dim=-1) == 0
    assert bool((coef[:, zero] == 0).all()) and torch.equal(orth[:, zero], deltas[:, zero])


# ------------------------------------------------------------------------------------------------ the parallel merge


@FAST
@given(arrays((4, 6), ints=True), METHODS)
def test_merge_coefficients_is_ties_on_the_scalars(coef, method) -> None:
    """Per row: elected sign ``sign(Σ_t c_t)`` (or the count), zero → the majority over the rows; disjoint mean."""
    rows = coef.shape[1]
    scores = [sum(coef[:, k].tolist()) if method == "sum" else sum(_sign(v) for v in coef[:, k].tolist())
              for k in range(rows)]
    gamma = [_sign(s) for s in scores]
    fill = 1.0 if sum(gamma) >= 0 else -1.0
    ref = []
    for k, g in enumerate(gamma):
        s = g if g != 0 else fill
        agree = [v for v in coef[:, k].tolist() if v != 0 and _sign(v) == s]
        ref.append(sum(agree) / max(1, len(agree)))
    torch.testing.assert_close(merge_coefficients(coef, method), torch.tensor(ref, dtype=torch.float64))


@FAST
@given(neurons(max_t=1), st.sampled_from(["paper", "official"]), st.data())
def test_reconstruct_parallel(case, mode, data) -> None:
    """``c̄ w0`` (paper) or ``c̄ w0/‖w0‖`` (official); a zero row gives 0."""
    base = case[0]
    coef = data.draw(arrays((base.shape[0],)))
    out = reconstruct_parallel(coef, base, mode)
    for k in range(base.shape[0]):
        norm = float(torch.linalg.vector_norm(base[k]))
        scale = float(coef[k]) if mode == "paper" else (float(coef[k]) / norm if norm > 0 else 0.0)
        torch.testing.assert_close(out[k], scale * base[k], rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------- the orthogonal merge


@FAST
@given(arrays((3, 4, 5), ints=True), METHODS)
def test_elect_sign_rowwise(x, method) -> None:
    """``(rows, r)`` signs: ``sign(Σ_t x_t)`` (or the count) per coordinate, zeros → that row's majority (+1 on a
    tie)."""
    out = elect_sign_rowwise(x, method)
    _, rows, r = x.shape
    for k in range(rows):
        row = [sum(x[:, k, j].tolist()) if method == "sum" else sum(_sign(v) for v in x[:, k, j].tolist())
               for j in range(r)]
        gamma = [_sign(s) for s in row]
        fill = 1.0 if sum(gamma) >= 0 else -1.0
        assert out[k].tolist() == [g if g != 0 else fill for g in gamma]


@FAST
@given(arrays((4, 5), ints=False), st.sampled_from([0.0, 0.3, 0.6, 0.9, 0.999, 1.0, 2.0]))
def test_cumulative_variance_keep(values, eta) -> None:
    """Keep the first ``min(#{j: cv_j < η} + 1, r)`` coordinates, ``cv_j = Σ_{i<=j} s_i² / Σ s_i²``; all for
    ``η >= 1``."""
    eig = values.abs().sort(dim=-1, descending=True).values
    eig[0] = 0.0  # an all-zero row keeps its first coordinate only (which is 0 anyway)
    mask = cumulative_variance_keep(eig, eta)
    for k in range(eig.shape[0]):
        e = eig[k].tolist()
        total = sum(e)
        if eta >= 1.0:
            keep = len(e)
        elif total <= 0:
            keep = 1
        else:
            cum = [sum(e[: j + 1]) / total for j in range(len(e))]
            keep = min(sum(c < eta for c in cum) + 1, len(e))
        assert mask[k].tolist() == [j < keep for j in range(len(e))]


@FAST
@given(arrays((3, 5, 7)), st.sampled_from([1, 7, 14, 1 << 18]))
def test_gram64(orth, block) -> None:
    """``G^k = O^k O^kᵀ`` in float64 per row, whatever the block size (blocks of ``block // (T·in)`` rows)."""
    gram = gram64(orth.float(), block)
    assert gram.dtype == torch.float64 and gram.shape == (5, 3, 3)
    o = orth.float().double()
    for k in range(5):
        torch.testing.assert_close(gram[k], o[:, k] @ o[:, k].T, rtol=1e-13, atol=1e-300)


@FAST
@given(arrays((4, 3, 6), ints=False), st.integers(0, 3))
def test_gram_eigh(orth, missing) -> None:
    """Descending ``s² >= 0``; ``G U = U diag(s²)``; orthonormal columns; each column's largest entry positive; a
    task with ``τ⊥ = 0`` has an all-zero row of ``U``; a rank-deficient row's extra eigenvalues are exactly 0."""
    orth = orth.permute(1, 0, 2).contiguous()  # (T=3, rows=4, in=6)
    orth[missing % 3, missing] = 0.0
    orth[:, 0] = orth[0, 0]  # row 0: three identical vectors, rank 1
    gram = gram64(orth)
    eig, u = gram_eigh(gram)
    assert bool((eig[:, :-1] >= eig[:, 1:]).all()) and bool((eig >= 0).all())
    assert bool((eig[0, 1:] == 0).all())
    for k in range(4):
        present = torch.diagonal(gram[k]) > 0
        assert bool((u[k][~present] == 0).all())
        live = eig[k] > GRAM_RTOL * eig[k, 0]
        uk = u[k][:, live]
        scale = float(eig[k, 0])
        torch.testing.assert_close(gram[k] @ uk, uk * eig[k][live], rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(uk.T @ uk, torch.eye(int(live.sum()), dtype=torch.float64), rtol=0, atol=1e-10)
        pivots = uk.gather(0, uk.abs().argmax(dim=0, keepdim=True))
        assert bool((pivots > 0).all())


def _svd_reference(orth: torch.Tensor, eta: float, method: str) -> torch.Tensor:
    """spec §1.5 literally, per row: thin SVD ``O = U S Vᵀ``, ``Z = O V``, per coordinate elected sign (zero → the
    row's majority), disjoint mean ``z̄_j``, keep coordinates by the cumulative variance, ``ψ⊥ = Σ_j z̄_j v_j``."""
    _, rows, d = orth.shape
    out = torch.zeros(rows, d, dtype=torch.float64)
    for k in range(rows):
        o = orth[:, k].double()
        if not o.any():
            continue
        _, s, vh = torch.linalg.svd(o, full_matrices=False)
        live = s**2 > GRAM_RTOL * s[0] ** 2
        z = (o @ vh.T)[:, live]
        v = vh[live]
        z = torch.where(o.norm(dim=1, keepdim=True) > 0, z, 0.0)  # a task with τ⊥ = 0 has no coordinates
        score = z.sum(0) if method == "sum" else z.sign().sum(0)
        gamma = score.sign()
        gamma = torch.where(gamma == 0, 1.0 if float(gamma.sum()) >= 0 else -1.0, gamma)
        agree = (z.sign() == gamma) & (z != 0)
        zbar = torch.where(agree, z, 0.0).sum(0) / agree.sum(0).clamp(min=1)
        e = s[live] ** 2
        if eta < 1.0:
            cum = torch.cumsum(e, 0) / e.sum()
            keep = min(int((cum < eta).sum()) + 1, e.numel())
            zbar[keep:] = 0.0
        out[k] = zbar @ v
    return out


@FAST
@given(arrays((3, 5, 8), ints=False), st.sampled_from([1.0, 0.9, 0.5]))
def test_orthogonal_merge_equals_the_svd_formula(orth, eta) -> None:
    """The Gram route (``ψ⊥ = Oᵀ U w``) equals the literal SVD formula on generic rows (sign ``sum``: an elected tie
    has probability 0, so the SVD's sign convention does not matter)."""
    got = orthogonal_merge(orth, eta, "sum")
    ref = _svd_reference(orth, eta, "sum")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9 * float(orth.abs().max()))


@FAST
@given(arrays((2, 4, 6), ints=False), st.integers(1, 4))
def test_orthogonal_merge_invariants(orth, copies) -> None:
    """One task: ``ψ⊥ = τ⊥``; T copies of one set of rows: the same; ψ⊥ lies in the span of the rows, so it stays
    orthogonal to ``w0`` when the inputs are."""
    one = orth[:1]
    torch.testing.assert_close(orthogonal_merge(one), one[0], rtol=1e-12, atol=1e-300)
    same = one.expand(copies, -1, -1).contiguous()
    torch.testing.assert_close(orthogonal_merge(same), one[0], rtol=1e-12, atol=1e-300)
    base = orth[1]
    _, perp = split_parallel(orth[:1].expand(3, -1, -1) * torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1), base)
    psi = orthogonal_merge(perp)
    dots = torch.einsum("ki,ki->k", psi, base)
    assert bool((dots.abs() <= 1e-10 * psi.norm(dim=-1) * base.norm(dim=-1) + 1e-300).all())


@FEW
@given(arrays((3, 6, 5), ints=False), st.sampled_from([1.0, 0.6]), METHODS)
def test_orthogonal_mix_weights_the_orthogonal_parts(orth, eta, method) -> None:
    """``ψ⊥^k = Σ_t a_t^k τ⊥,t^k`` with the mix from the Gram matrices: exactly what ``orthogonal_merge`` returns."""
    mix = orthogonal_mix(gram64(orth), eta, method)
    assert mix.dtype == torch.float64 and mix.shape == (3, 6)
    torch.testing.assert_close(torch.einsum("tk,tki->ki", mix, orth), orthogonal_merge(orth, eta, method),
                               rtol=1e-12, atol=1e-300)


# ------------------------------------------------------------------------------------------------------- both halves


@FAST
@given(neurons(), st.sampled_from(["paper", "official"]), METHODS)
def test_neuron_merge_composes_the_halves(case, mode, method) -> None:
    base, deltas = case
    got = neuron_merge(base, deltas, reconstruction=mode, sign_method=method)
    coef, orth = split_parallel(deltas, base)
    torch.testing.assert_close(got.parallel, reconstruct_parallel(merge_coefficients(coef, method), base, mode))
    torch.testing.assert_close(got.orthogonal, orthogonal_merge(orth, 1.0, method))
    total = float((deltas**2).sum())
    expected = float(((coef.unsqueeze(-1) * base) ** 2).sum()) / total if total > 0 else 0.0
    assert abs(got.parallel_energy - expected) <= 1e-12
    assert 0.0 <= got.parallel_energy <= 1.0 + 1e-12


@FAST
@given(neurons(max_t=1))
def test_neuron_merge_of_one_task_gives_it_back(case) -> None:
    """spec §1.8: T = 1, paper reconstruction ⇒ ψ∥ + ψ⊥ = τ."""
    base, deltas = case
    got = neuron_merge(base, deltas)
    torch.testing.assert_close(got.parallel + got.orthogonal, deltas[0], rtol=0,
                               atol=1e-10 * float(deltas.abs().max().clamp(min=1e-300)))
