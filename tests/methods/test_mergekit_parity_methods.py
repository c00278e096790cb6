"""The methods added for mergekit parity (NuSLERP, Multi-SLERP, Karcher, SCE, RAM / RAM+, DELLA, Arcee Fusion) as the
engine calls them (``run_method``): task vectors vs weights, per-model parameters, DELLA's draws and combine, chunking,
refusals, against float64 references. Their tensor formulas: ``tests/tensors/test_{spherical,sce,ram,magprune,
fusion}.py``; mergekit equality: ``tests/peers/test_mergekit_methods.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neuromerge.errors import NeuromergeError
from neuromerge.methods import get
from neuromerge.tensors.magprune import magprune_keep_probabilities
from neuromerge.tensors.spherical import karcher_mean
from tests.tensors.test_ram import sparse_taus
from tests.tensors.test_spherical import slerp_np


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_method_uses_task_vectors_with_a_base(run_method, with_base: bool) -> None:
    base, m0, m1 = rand((4, 6), 5), rand((4, 6), 6), rand((4, 6), 7)
    x_out, x = run_method("nuslerp", base, [m0, m1], {}, [{"weight": 1.0}, {"weight": 3.0}])
    if not with_base:  # the engine's input without base_model (x.base is then the first model's, and unused)
        x.base_given = False
        x_out = get("nuslerp")().merge(x)
    t = 3.0 / 4.0
    B, A0, A1 = base.numpy(), m0.numpy(), m1.numpy()
    want = (B + slerp_np(t, (A0 - B).ravel(), (A1 - B).ravel()).reshape(B.shape) if with_base
            else slerp_np(t, A0.ravel(), A1.ravel()).reshape(B.shape))
    np.testing.assert_allclose(x_out.numpy(), want, rtol=1e-4, atol=1e-5)


def test_multislerp_method_error_names_the_tensor(run_method) -> None:
    x = rand((3, 4), 21)
    base = torch.zeros_like(x)
    with pytest.raises(NeuromergeError, match=r"^w: multislerp"):
        run_method("multislerp", base, [x, -x, x, -x], {}, [{"weight": 1.0}] * 4)


def test_karcher_method_averages_the_listed_models(run_method) -> None:
    base = rand((3, 4), 42)
    ms = [base + rand((3, 4), 43 + i) for i in range(3)]
    out, _ = run_method("karcher", base, ms, {"max_iter": 50, "tol": 1e-7})
    want = karcher_mean(ms, [1 / 3] * 3, max_iter=50, tol=1e-7)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_ram_method_is_chunk_invariant(run_method) -> None:
    base = rand((8, 5), 62)
    models = [base + t for t in sparse_taus(63, (8, 5))]
    whole, _ = run_method("ram", base, models, {})
    parts = [run_method("ram", base, models, {}, rows=(a, b))[0] for a, b in ((0, 3), (3, 8))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_della_inverse_rescale_is_unbiased_and_chunk_invariant(run_method) -> None:
    """``rescale: inverse`` (the paper's 1/p_i) is chunkable: row chunks give the same draws and ranks; averaged over
    many seeds, θ − θ0 estimates τ."""
    base = rand((8, 40), 73)
    model = base + rand((8, 40), 74)
    params = {"density": 0.5, "epsilon": 0.2, "rescale": "inverse", "lambda": 1.0}
    whole, _ = run_method("della_linear", base, [model], params)
    parts = [run_method("della_linear", base, [model], params, rows=r)[0] for r in ((0, 5), (5, 8))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    mean = sum(run_method("della_linear", base, [model], params, seed=s)[0].double() for s in range(200)) / 200
    tau = (model - base).double()
    # per entry the estimate has variance τ²(1 − p)/p / 200 <= τ² · 2.33/200: check the mean error over entries
    assert float(((mean - base.double() - tau).abs() / tau.abs()).mean()) < 0.1


def test_della_ties_combine_matches_the_disjoint_reference(run_method, reference_disjoint_merge) -> None:
    base = rand((4, 6), 75)
    models = [base + rand((4, 6), 76 + i) for i in range(3)]
    weights = [0.5, 1.0, 1.5]
    per_model = [{"weight": w, "density": 0.5, "epsilon": 0.1} for w in weights]
    out, x = run_method("della", base, models, {"rescale": False}, per_model)
    taus = []
    for t, m in enumerate(models):
        d = (m - base).double()
        u = x.random_uniform(t).double()
        taus.append(np.where(u.numpy() < magprune_keep_probabilities(d, 0.5, 0.1).numpy(), d.numpy(), 0.0))
    want = base.double().numpy() + reference_disjoint_merge(taus, weights, zero_sign="positive")
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_della_rescale_l1_is_refused_on_a_row_chunk(run_method) -> None:
    base = rand((8, 5), 77)
    with pytest.raises(NeuromergeError, match="needs the whole tensor"):
        run_method("della", base, [base + 1], {"density": 0.5}, rows=(0, 4))


@pytest.mark.parametrize("name", ["sce", "karcher", "ram", "ramplus_tl", "arcee_fusion"])
def test_weight_on_a_method_without_weights_is_a_warning_and_changes_nothing(make_family, tmp_path, name: str) -> None:
    """mergekit's methods declare no ``weight`` here and ignore it: a config's ``weight`` merges with one warning per
    place it was given and the same output; built directly, the parameter model still refuses a weight ≠ 1."""
    import neuromerge
    from tests.peers.test_mergekit import load_dir

    with pytest.raises(ValidationError, match="does not use per-model weights"):
        get(name).Params.model_validate({"weight": 2.0})
    base, experts = make_family("llama", n_experts=1 if name == "arcee_fusion" else 3)
    plain = {"merge_method": name, "base_model": str(base), "models": [{"model": str(e)} for e in experts]}
    weighted = {**plain, "models": [{"model": str(e), "parameters": {"weight": 0.3 + i}} for i, e in
                                    enumerate(experts)]}
    res = neuromerge.merge(weighted, tmp_path / "w", progress=False)
    notes = [w for w in res.report["warnings"] if f"merge method {name!r} does not use 'weight'" in w]
    assert len(notes) == len(experts)
    neuromerge.merge(plain, tmp_path / "p", progress=False)
    a, b = load_dir(tmp_path / "w"), load_dir(tmp_path / "p")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


NEW_METHODS = {  # method -> (number of experts, per-model parameters)
    "nuslerp": (2, {"weight": 1.0}), "multislerp": (3, {"weight": 1.0}), "karcher": (3, {}), "sce": (3, {}),
    "ram": (3, {}), "ramplus_tl": (3, {}), "arcee_fusion": (1, {}), "della": (3, {"density": 0.5}),
    "della_linear": (3, {"density": 0.5}),
}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_new_methods_run_from_the_cli_and_the_python_api(make_family, tmp_path, method: str) -> None:
    """``neuromerge merge`` and ``neuromerge.functional.<method>`` give the same model, which differs from the base."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from neuromerge import functional
    from neuromerge.cli import app

    n, own = NEW_METHODS[method]
    base_dir, experts = make_family("llama", n_experts=n)
    cfg = {"merge_method": method, "base_model": str(base_dir),
           "models": [{"model": str(e), "parameters": own} for e in experts]}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    models = [load_file(e / "model.safetensors") for e in experts]
    in_memory = functional.merge_state_dicts(method, base, models, model_parameters=[own] * n)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(in_memory[name], merged[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(merged[name], base[name])


@pytest.mark.parametrize("method", ["della_linear", "ram"])
def test_row_chunked_merge_equals_the_whole_tensor_merge(make_family, tmp_path, method: str) -> None:
    """The engine streams the chunkable choices (``ram``; DELLA with ``rescale: inverse``) in row chunks: the same
    output as one tensor at a time, bit for bit (DELLA's draws are keyed by position, its ranks are per row)."""
    import neuromerge
    from neuromerge.engine.run import prepare
    from tests.peers.test_mergekit import load_dir

    base, experts = make_family("llama")
    params = {"rescale": "inverse", "density": 0.5, "epsilon": 0.2} if method == "della_linear" else {}
    cfg = {"merge_method": method, "base_model": str(base), "parameters": params,
           "models": [{"model": str(e)} for e in experts]}
    neuromerge.merge(cfg, tmp_path / "whole", progress=False)
    neuromerge.merge(cfg, tmp_path / "rows", progress=False, chunk_elements=64)  # a few rows per chunk
    whole, rows = load_dir(tmp_path / "whole"), load_dir(tmp_path / "rows")
    assert all(torch.equal(whole[k], rows[k]) for k in whole)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(whole[name], load_dir(base)[name])
    plan = prepare(cfg, chunk_elements=64)
    try:
        assert len(next(t for t in plan.tensors if t.name == name).chunks) > 1  # it really was chunked
    finally:
        plan.pool.close()
    if method == "della_linear":  # the default rescale (l1) needs whole tensors
        plan = prepare({**cfg, "parameters": {"density": 0.5}}, chunk_elements=64)
        try:
            assert len(next(t for t in plan.tensors if t.name == name).chunks) == 1
        finally:
            plan.pool.close()
