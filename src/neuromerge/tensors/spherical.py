"""Interpolation on the hypersphere beyond two-model SLERP: NuSLERP, Multi-SLERP and the Karcher mean.

- NuSLERP (mergekit ``nuslerp``): SLERP of two tensors, whole (flattened) or one row / column at a time.
- Multi-SLERP (C. Goddard, "Multi-SLERP", goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit
  ``multislerp``): barycentric interpolation of several tensors through the tangent space at their normalised
  weighted mean.
- Karcher mean (Karcher 1977, "Riemannian center of mass and mollifier smoothing"; mergekit ``karcher``): the
  weighted Fréchet mean on the unit sphere by Riemannian gradient descent, rescaled by the weighted mean norm.

Pure functions of tensors: no parameters models, no engine state. Every formula follows mergekit 0.1.5 operation
for operation (the peer tests compare at fp32 tolerance); the float64 tests in ``tests/methods`` check them against
the closed forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: NuSLERP's norm clamp (mergekit ``nuslerp._normalize``) and its colinearity test ``1 − cos² <= NUSLERP_EPS²``
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
            eps: float = NUSLERP_EPS) -> torch.Tensor:
    """``sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩`` (norms clamped below
    at 1e-7, ``cos`` clamped to [−1, 1]); linear ``(1−t) v0 + t v1`` where ``1 − cos² Ω <= eps²`` (colinear).

    ``flatten``: one angle for the whole tensor; otherwise one per vector along ``dim`` (``-1``: per row of a
    matrix, ``0``: per column). Source: mergekit 0.1.5 ``merge_methods/nuslerp.nuslerp``.
    """
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros((), dtype=cos.dtype), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation of the flattened ``tensors`` ``x_i`` on the sphere (mergekit 0.1.5 ``multislerp``).

    With ``w`` the weights (divided by ``Σ w`` when ``normalize_weights``), ``u_i = x_i / (‖x_i‖ + eps)``, ``μ =
    Σ w_i u_i / ‖Σ w_i u_i‖``, tangent vectors ``v_i = u_i − ⟨u_i, μ⟩ μ`` and ``v = Σ w_i v_i``: the result is
    ``(cos ‖v‖' μ + sin ‖v‖' · v / ‖v‖') · Σ w_i ‖x_i‖`` with ``‖v‖' = ‖v‖ + eps`` (the exponential map at ``μ``).
    One tensor is returned as is; inputs that are all zero (a tensor no expert changes, as task vectors) give zero
    (mergekit raises there). When ``‖Σ w_i u_i‖ < eps`` two tensors are interpolated linearly (``w_0 x_0 + w_1 x_1``)
    and more raise :class:`ValueError` (antipodal inputs whose weights cancel).
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if not bool(stacked.any()):
        return torch.zeros_like(stacked[0])
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            return stacked[0] * w[0] + stacked[1] * w[1]
        raise ValueError(
            "multislerp: the weighted sum of the unit inputs is zero (antipodal inputs whose weights cancel, such as "
            "a and -a with equal weights); use different weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean on the unit sphere, rescaled by ``Σ α_i ‖x_i‖`` (mergekit 0.1.5 ``karcher``).

    Inputs of norm ``<= tol`` are left out of the direction (weights renormalised over the others). Starting from
    the normalised weighted mean of the unit vectors ``u_i`` (or ``u_0`` if that is ``< tol``), each of at most
    ``max_iter`` steps forms the Riemannian gradient ``g = Σ α_i θ_i/sin θ_i (u_i − cos θ_i μ)`` with ``cos θ_i =
    ⟨μ, u_i⟩`` (terms with ``θ_i < tol`` skipped), stops when ``‖g‖ < tol``, and moves along the geodesic ``μ ←
    cos‖g‖ μ + sin‖g‖ g/‖g‖`` (renormalised). Norms in float32 (float64 for float64 inputs), as mergekit.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if float(n) == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms,
                                                                                             strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / alpha_sum for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for alpha, u in zip(a, us, strict=True):
        mean += alpha * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = us[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, u in zip(a, us, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms, strict=True))
    return scale * mean
