"""WEMoE — Weight-Ensembling Mixture of Experts (Tang et al. 2024, "Merging Multi-Task Models via Weight-Ensembling
Mixture of Experts", ICML, arXiv 2402.00433), for transformer backbones.

* Every tensor outside the MLPs is merged by Task Arithmetic, ``θ = θ0 + λ Σ_t τ_t`` with ``λ = init_lambda``
  (0.3; fusion-bench merges the non-MLP part with ``scaling_factor = init_lambda``).
* Each MLP (BERT: ``intermediate.dense`` + ``output.dense``; LLaMA / GPT-style: the linears under ``*.mlp``) becomes
  input-dependent: for sample ``b`` every linear of the MLP uses ``W(b) = W0 + Σ_t r_t(b) τ_t^W`` (and the bias
  likewise), with routing weights ``r(b) = mean_tokens(R(h))`` from a per-MLP router ``R`` over the MLP's input
  hidden states ``h`` (the token average of the router *outputs*, as fusion-bench's ``WeightEnsemblingMoE``).
  Since ``W(b) x = W0 x + Σ_t r_t(b) (τ_t^W x)``, the per-sample weights are never materialized: each routed
  linear adds ``Σ_t r_t(b) (τ_t x + τ_t^b)`` to its base output in one batched matmul.
* Router (fusion-bench ``construct_weight_ensembling_gate``): ``router_hidden_layers = 2``:
  ``Linear(d, d) → ReLU → Linear(d, T)``, weights ``N(0, 0.01²)``, hidden bias 0, output bias ``init_lambda`` (so at
  initialization every MLP is Task Arithmetic with λ = 0.3); 1: ``Linear(d, T)``; 0: a free vector.
* Routers are trained by entropy minimization on *unlabelled test inputs* of every task (transductive, as in the
  paper), each task's logits through its own expert head, the backbone frozen; fusion-bench defaults: Adam lr 1e-4,
  1000 steps, batch 16, gradients accumulated over tasks.

``gate``: ``linear`` (default) uses the router outputs directly as routing weights — the official code and
fusion-bench, which apply no normalization; ``softmax`` normalizes them over experts (weights sum to 1: the MLP is
then a convex combination of the experts' MLPs). :meth:`WEMoEModel.forced` overrides the routing weights (e.g.
one-hot: the MLPs become exactly the chosen expert's).

Sources: official code ``tanganke/weight-ensembling_MoE``; fusion-bench ``fusion_bench.models.we_moe``
(``WeightEnsemblingMoE``) and ``fusion_bench.method.we_moe``.

Differences from fusion-bench: the token average of the router outputs skips padding tokens when the forward call
carries an ``attention_mask`` (fusion-bench's CLIP inputs have none); the routed MLP is computed as base output plus
routed deltas in one pass instead of a per-sample ``functional_call`` loop (same function); no ``batch_reduce``
option (per-sample routing always); test batches cycle deterministically.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import NotApplicable
from ..numeric import FiniteFloat
from .access import (
    DataParams,
    ModelAccess,
    StateDict,
    cycle,
    entropy,
    entropy_descent,
    example_batches,
    mergeable_names,
    task_name,
)

MLP_NAMES = ("mlp", "feed_forward", "ffn")


class WEMoEParams(DataParams):
    steps: int = Field(1000, ge=0, description="router training steps (fusion-bench max_steps 1000)")
    lr: FiniteFloat = Field(1e-4, gt=0, description="Adam learning rate of the routers (fusion-bench 1e-4)")
    init_lambda: FiniteFloat = Field(0.3, description="Task Arithmetic λ of the non-MLP tensors and initial router "
                               "output bias (fusion-bench 0.3)")
    router_hidden_layers: Literal[0, 1, 2] = Field(2, description="router depth (fusion-bench 2)")
    gate: Literal["linear", "softmax"] = Field("linear", description="routing weights = router outputs (official) "
                                               "or their softmax over experts")
    batch_size: int = Field(16, ge=1, description="unlabelled test inputs per task per step (fusion-bench 16)")
    examples: int | None = Field(None, ge=1, description="unlabelled test inputs per task (default: the suite's "
                                 "evaluation subset)")


@dataclass(frozen=True)
class MLPGroup:
    """One routed MLP: ``input_module``'s first positional input is the routing hidden state; ``linears`` are the
    linear layers whose weights become ``W0 + Σ_t r_t τ_t``."""

    name: str
    input_module: str
    linears: tuple[str, ...]


def find_mlp_groups(module: nn.Module) -> list[MLPGroup]:
    """The MLPs of a transformer backbone: modules named ``mlp`` / ``feed_forward`` / ``ffn`` (all their linears,
    routed on their input), and BERT-style layers with ``intermediate.dense`` and ``output.dense`` (routed on the
    input of ``intermediate``)."""
    groups: list[MLPGroup] = []
    for name, m in module.named_modules():
        if any(name.startswith(g.name + ".") for g in groups):
            continue
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        prefix = f"{name}." if name else ""
        if name.rsplit(".", 1)[-1] in MLP_NAMES:
            linears = tuple(f"{prefix}{n}" for n, c in m.named_modules() if isinstance(c, nn.Linear))
            if linears:
                groups.append(MLPGroup(name, name, linears))
        elif isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None),
                                                                                  nn.Linear):
            groups.append(MLPGroup(name, f"{prefix}intermediate",
                                   (f"{prefix}intermediate.dense", f"{prefix}output.dense")))
    return groups


# --------------------------------------------------------------------------------------------------- routers
class Router(nn.Module):
    """fusion-bench's weight-ensembling gate of depth 0, 1 or 2 (module docstring); ``forward(h) → (…, T)``."""

    def __init__(self, hidden: int, experts: int, depth: int, init_lambda: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.full((experts,), float(init_lambda)))
            return
        sizes = [hidden] * depth + [experts]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        for i, layer in enumerate(self.layers):
            nn.init.normal_(layer.weight, std=0.01, generator=generator)
            nn.init.constant_(layer.bias, float(init_lambda) if i == len(self.layers) - 1 else 0.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.weight.expand(*hidden.shape[:-1], -1)
        x = hidden
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


def token_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, E) → (B, E)`` mean over tokens (real tokens only when ``mask`` (B, T) fits); ``(B, E)`` as is."""
    if x.dim() == 2:
        return x
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    return x.mean(1)


def routed_delta(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
    """``Σ_e g[b, e] (τW_e x_b + τb_e)`` for ``x`` ``(B, …, in)``, ``gates`` ``(B, E)``, ``weight`` ``(E, out, in)``,
    ``bias`` ``(E, out)`` — one matmul over the concatenated expert deltas."""
    e, out, _ = weight.shape
    y = (x @ weight.reshape(e * out, -1).T).unflatten(-1, (e, out))  # (B, …, E, out)
    g = gates.reshape(gates.shape[0], *([1] * (x.dim() - 2)), e, 1).to(y.dtype)
    delta = (y * g).sum(-2)
    if bias is not None:
        delta = delta + (gates.to(bias.dtype) @ bias).reshape(gates.shape[0], *([1] * (x.dim() - 2)), out)
    return delta


class WEMoEModel(nn.Module):
    """A backbone whose MLPs are routed (module docstring). ``forward(*args, **kwargs)`` returns the backbone's
    output; unknown attributes are looked up on the backbone (``model.config``, ``model.embeddings``…)."""

    def __init__(self, backbone: nn.Module, groups: Sequence[MLPGroup],
                 deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]], routers: dict[str, Router],
                 gate: Literal["linear", "softmax"] = "linear") -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.groups = list(groups)
        self.gate = gate
        self.routers = nn.ModuleDict({_key(g.name): routers[g.name] for g in self.groups})
        self.experts = next(iter(deltas.values()))[0].shape[0]
        self._linear_group: dict[str, str] = {}
        for g in self.groups:
            for lin in g.linears:
                w, b = deltas[lin]
                self.register_buffer(f"dw__{_key(lin)}", w.float(), persistent=True)
                self.register_buffer(f"db__{_key(lin)}", None if b is None else b.float(), persistent=True)
                self._linear_group[lin] = g.name
        self.force_gates: torch.Tensor | None = None
        #: per-task linear heads ``{task: {"weight" (C, d), "bias" (C,)}}`` (set by ``load_routed``; empty here)
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self._gates: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        modules = dict(self.backbone.named_modules())
        for g in self.groups:
            modules[g.input_module].register_forward_pre_hook(self._route_hook(g.name))
            for lin in g.linears:
                modules[lin].register_forward_hook(self._delta_hook(lin))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone":
                raise
            return getattr(super().__getattr__("backbone"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._mask = kwargs.get("attention_mask")
        try:
            return self.backbone(*args, **kwargs)
        finally:
            self._mask = None
            self._gates.clear()

    @contextmanager
    def forced(self, gates: torch.Tensor) -> Iterator[WEMoEModel]:
        """Use these routing weights (``(E,)`` or ``(B, E)``, after any activation) for every MLP."""
        old, self.force_gates = self.force_gates, gates
        try:
            yield self
        finally:
            self.force_gates = old

    def routing(self, group: str, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` routing weights of ``group`` for its input ``hidden``."""
        batch = hidden.shape[0]
        if self.force_gates is not None:
            g = self.force_gates.to(hidden.device, torch.float32)
            return g.expand(batch, -1) if g.dim() == 1 else g
        router = self.routers[_key(group)]
        # the router's own dtype (float32, or bfloat16 after ``model.to(torch.bfloat16)``), its logits in float32
        dtype = next(router.parameters()).dtype
        r = token_mean(router(hidden.to(dtype)).float(), self._mask)
        return torch.softmax(r, dim=-1) if self.gate == "softmax" else r

    # the hooks are partials of bound methods, not closures: ``copy.deepcopy(model)`` then hooks the copy's
    # backbone to the copy (a closure would keep routing through the original's routers and deltas)
    def _route_hook(self, group: str) -> Callable[..., None]:
        return functools.partial(self._route, group)

    def _route(self, group: str, _: nn.Module, args: tuple[Any, ...]) -> None:
        self._gates[group] = self.routing(group, args[0])

    def _delta_hook(self, linear: str) -> Callable[..., torch.Tensor]:
        return functools.partial(self._add_delta, linear)

    def _add_delta(self, linear: str, _: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        gates = self._gates[self._linear_group[linear]]
        w, b = getattr(self, f"dw__{_key(linear)}"), getattr(self, f"db__{_key(linear)}")
        return output + routed_delta(args[0], gates, w, b).to(output.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the backbone, the expert deltas and the routers (fp32 buffers as stored)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


# --------------------------------------------------------------------------------------------------- building
def build_wemoe(make_module: Callable[[StateDict], nn.Module], base_state: StateDict,
                expert_states: Sequence[StateDict], params: WEMoEParams | None = None, *, exclude: Sequence[str] = (),
                generator: torch.Generator | None = None, groups: Sequence[MLPGroup] | None = None) -> WEMoEModel:
    """The untrained WEMoE model: non-MLP tensors by Task Arithmetic (λ = ``init_lambda``), MLP linears at the base
    weights plus routed task vectors, routers initialized as fusion-bench's (with ``generator``)."""
    params = params or WEMoEParams()
    groups = list(groups) if groups is not None else find_mlp_groups(make_module(base_state))
    if not groups:
        raise ValueError("WEMoE needs a transformer backbone: no MLP (mlp / feed_forward / BERT intermediate+output) "
                         "found")
    names = set(mergeable_names(base_state, exclude))
    routed = {f"{lin}.{p}" for g in groups for lin in g.linears for p in ("weight", "bias")}
    changed = [w for w in routed & names if any(not torch.equal(e[w], base_state[w]) for e in expert_states)]
    if not changed:
        raise NotApplicable("WEMoE routes the MLP layers, but no expert changes an MLP weight (e.g. LoRA experts "
                            "on attention projections only): nothing to route, the result would be Task Arithmetic")
    state = dict(base_state)
    for n in names - routed:
        tau = sum(e[n].float() - base_state[n].float() for e in expert_states)
        state[n] = (base_state[n].float() + params.init_lambda * tau).to(base_state[n].dtype)
    module = make_module(state)
    weights = dict(module.named_parameters())
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for g in groups:
        for lin in g.linears:
            w, b = f"{lin}.weight", f"{lin}.bias"
            # a weight outside the state (not merged by the suite) or excluded has zero task vectors
            dw = (torch.stack([e[w].float() - base_state[w].float() for e in expert_states]) if w in names
                  else weights[w].detach().float().new_zeros((len(expert_states), *weights[w].shape)))
            db = (torch.stack([e[b].float() - base_state[b].float() for e in expert_states])
                  if b in base_state and b in names else None)
            deltas[lin] = (dw, db)
    hidden = {g.name: dict(module.named_modules())[g.linears[0]].in_features for g in groups}
    routers = {g.name: Router(hidden[g.name], len(expert_states), params.router_hidden_layers, params.init_lambda,
                              generator) for g in groups}
    return WEMoEModel(module, groups, deltas, routers, gate=params.gate).eval()


def wemoe_merge_models(access: ModelAccess, base_state: StateDict, expert_states: Sequence[StateDict],
                       heads: Sequence[StateDict | None], tasks: Sequence[Any], budget: Any,
                       params: WEMoEParams | None = None, *, exclude: Sequence[str] = (), seed: int = 0,
                       info: dict[str, Any] | None = None) -> WEMoEModel:
    """Build :func:`build_wemoe` and train its routers by entropy minimization on unlabelled inputs of each task's
    *test* split (the first ``params.examples``, default ``budget.eval_examples``)."""
    params = params or WEMoEParams()
    generator = torch.Generator().manual_seed(seed)
    model = build_wemoe(access.module, base_state, expert_states, params, exclude=exclude, generator=generator)
    limit = params.examples if params.examples is not None else getattr(budget, "eval_examples", None)
    data = [example_batches(access.batches(t, "test", budget, limit=limit, batch_size=params.batch_size), limit)
            for t in tasks]
    if any(not batches for batches, _ in data):
        raise ValueError("WEMoE: a task has no test inputs to adapt on")
    trainable = list(model.routers.parameters())
    optimizer = torch.optim.Adam(trainable, lr=params.lr)

    def task_loss(_: Any, t: int, step: int) -> torch.Tensor:
        return entropy(access.logits(model, heads[t], tasks[t], cycle(data[t][0], step)))

    history = entropy_descent(optimizer, lambda step: None, task_loss, len(tasks), params.steps)
    model.requires_grad_(False)
    if info is not None:
        info.update({"split": "test", "unlabelled": True,
                     "examples": {task_name(t): n for t, (_, n) in zip(tasks, data, strict=True)},
                     "steps": params.steps, "routed_mlps": len(model.groups), "gate": params.gate,
                     "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None})
    return model.eval()
