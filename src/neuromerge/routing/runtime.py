"""Routed models: a frozen base whose linear layers carry per-sample gated expert branches.

For a linear module with base weight ``W0`` and experts ``j = 1..E`` (LoRA-style branches, Hu et al. 2021,
arXiv 2106.09685; per-sample gating as in Twin-Merging, arXiv 2406.15479, and MIN-Merging, arXiv 2510.17890):

    y = W0 x + b + Σ_j g_j(x) · B_j (A_j x)        (low-rank experts, ΔW_j = B_j A_j)
    y = W0 x + b + Σ_j g_j(x) · ΔW_j x             (dense experts)

computed in one pass for the low-rank experts: ``A_cat = [A_1; …; A_E] (ΣR, in)`` and ``B_cat = [B_1 … B_E]
(out, ΣR)`` are concatenated once, then per batch ``h = x A_catᵀ``, ``h ← h ⊙ ĝ`` with ``ĝ`` the gates expanded
over each expert's rank segment, and ``y += h B_catᵀ`` (one in-place GEMM into the base output; ``B_cat`` is stored
column-major so that its active columns are a row gather). No weight is materialized; rank segments (and dense
experts) whose gate column is zero for the whole batch are skipped, and all-zero gates give exactly ``W0 x + b``.
The active columns and their gates are derived once per routing for all layers of the same rank layout (the
layers share a dict with the gates they are given), not once per layer: at batch 1 that bookkeeping, not the
arithmetic, was most of the routed model's extra latency.
A tensor given (as the same object) for several experts is stored and computed once, gated by the sum of their
gates (MERGE's shared modules: samples routed to experts that share a module run it together).

Routing: a forward pre-hook on the base module reads the call's keyword arguments (attention mask, KV cache); a
forward hook on ``feature_module`` pools that module's output (mean over real tokens / spatial mean), runs the
router and sets the gates of every routed layer before any of them runs — no second pass. With ``feature_fn``
the features come from a separate pass with all gates zero (e.g. the mean-pooled final hidden state).
The routing state lives on the base's modules, so ``routed.generate(...)`` (the base's ``generate``) routes too:
the first call with a prompt sets the gates, later calls that continue a KV cache keep them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuromerge.errors import CompatibilityError, ConfigError, NeuromergeError
from neuromerge.routing.experts import DenseExpert, Expert, LowRankExpert, stored_bytes, validate_experts
from neuromerge.routing.policy import GatePolicy
from neuromerge.routing.router import Router
from neuromerge.tasks.contract import output_of  # noqa: F401  (re-exported: routing.runtime.output_of)

FeatureFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
_CACHE_KWARGS = ("past_key_values", "cache", "cache_position", "use_cache")  # "cache": transformers >= 5.2x


class RoutingError(NeuromergeError):
    """A routed model was called in a way it cannot route (no router, batch size change, missing features)."""


def _expand(cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values ``cols (B, K)`` shaped to broadcast against ``x (B, …, K')``: ``(B, 1, …, 1, K)``."""
    if x.dim() == 1:
        return cols[0]
    return cols.reshape(cols.shape[0], *([1] * (x.dim() - 2)), cols.shape[1])


@dataclass(frozen=True)
class _ColumnGates:
    """Gates of the rank columns a batch uses: ``gates (B, K)`` for the columns ``index`` of ``A_cat`` / ``B_cat``
    (None: all of them, in order). Columns whose gate is zero for every sample are left out."""

    gates: torch.Tensor
    index: torch.Tensor | None

    @classmethod
    def of(cls, rank_gates: torch.Tensor) -> _ColumnGates:
        active = rank_gates.ne(0).any(dim=0)
        if bool(active.all()):
            return cls(rank_gates, None)
        index = active.nonzero().squeeze(1)
        return cls(rank_gates.index_select(1, index), index)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same stored values: the same object, or a view of the same memory with equal layout."""
    return a is b or (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                      and a.numel() > 0 and a.data_ptr() == b.data_ptr())


def _group_shared(items: Sequence[tuple[int, tuple[torch.Tensor, ...]]]
                  ) -> list[tuple[tuple[int, ...], tuple[torch.Tensor, ...]]]:
    """Group experts that give the same tensors (by identity, :func:`_same_tensor`): ``[(experts, tensors)]`` in
    first-seen order. A module shared by several experts (MERGE's merged groups) is then stored and run once."""
    groups: list[tuple[list[int], tuple[torch.Tensor, ...]]] = []
    for j, ts in items:
        hit = next((g for g in groups if all(_same_tensor(x, y) for x, y in zip(g[1], ts, strict=True))), None)
        if hit is None:
            groups.append(([j], ts))
        else:
            hit[0].append(j)
    return [(tuple(m), ts) for m, ts in groups]


def _fallback_getattr(module: nn.Module, name: str, child: str) -> Any:
    """``module``'s attribute ``name``, else the attribute of its submodule ``child`` (wrappers stay transparent)."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        inner = module.__dict__.get("_modules", {}).get(child)
        if inner is None or name.startswith("__"):
            raise
        return getattr(inner, name)


class RoutedLinear(nn.Module):
    """``nn.Linear`` plus gated expert branches (see the module docstring).

    ``base_layer`` is the original module (its weight is not copied). ``low_rank``: ``(expert index, A (r, in),
    B (out, r))`` triples; ``dense``: ``(expert index, ΔW (out, in))`` pairs. Factors are stored in the base
    weight's dtype and device as non-persistent buffers ``lora_A (ΣR, in)``, ``lora_B (out, ΣR)`` and
    ``dense_delta (D, out, in)``. ``gates`` (``(B, E)`` or None = all zero) is set by :class:`RoutedModel`.
    """

    def __init__(self, base_layer: nn.Module, n_experts: int,
                 low_rank: Sequence[tuple[int, torch.Tensor, torch.Tensor]] = (),
                 dense: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.n_experts = n_experts
        w = base_layer.weight
        out_f, in_f = w.shape[0], w[0].numel()  # a conv kernel (out, in/groups, kh, kw) is seen as (out, in·kh·kw)
        like = {"dtype": w.dtype, "device": w.device}
        for j, a, b in low_rank:
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise CompatibilityError(f"expert {j}: factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                                         f"layer of weight {tuple(w.shape)}")
        for j, d in dense:
            if d.numel() != out_f * in_f or d.shape[0] != out_f:
                raise CompatibilityError(f"expert {j}: ΔW {tuple(d.shape)} does not fit weight {tuple(w.shape)}")
        # the same tensor given for several experts is stored once and gated by the sum of their gates
        lr_groups = _group_shared([(j, (a, b)) for j, a, b in low_rank])
        self.segments: list[tuple[tuple[int, ...], int, int]] = []  # (experts, start, stop) rank columns
        pos = 0
        for members, (a, _) in lr_groups:
            self.segments.append((members, pos, pos + a.shape[0]))
            pos += a.shape[0]
        a_cat = torch.cat([a.to(**like) for _, (a, _) in lr_groups]) if lr_groups else w.new_zeros(0, in_f)
        b_cat = torch.cat([b.to(**like) for _, (_, b) in lr_groups], dim=1) if lr_groups else w.new_zeros(out_f, 0)
        # gates over the rank columns: segment s gets Σ_{j ∈ members_s} g_j, repeated over its rank (no (E, ΣR)
        # membership matrix is stored: the layer holds nothing beyond the base weight and the experts' factors)
        self._singletons = all(len(m) == 1 for m, _, _ in self.segments)
        self._segment_experts = [m[0] for m, _, _ in self.segments] if self._singletons else []
        self._segment_ranks = [a1 - a0 for _, a0, a1 in self.segments]
        self.register_buffer("lora_A", a_cat.contiguous(), persistent=False)
        # (out, ΣR) stored column-major: its rank columns are contiguous rows of lora_B.t(), so selecting the active
        # columns is a row gather and the up-projection one GEMM with a contiguous (ΣR', out) operand
        self.register_buffer("lora_B", b_cat.t().contiguous().t(), persistent=False)
        dense_groups = _group_shared([(j, (d,)) for j, d in dense])
        self.dense_groups: list[tuple[int, ...]] = [members for members, _ in dense_groups]
        stacked = (torch.stack([d.to(**like).reshape(out_f, in_f) for _, (d,) in dense_groups]) if dense_groups
                   else w.new_zeros(0, out_f, in_f))
        self.register_buffer("dense_delta", stacked, persistent=False)
        #: key of the rank-column layout: layers with equal keys share one :class:`_ColumnGates` per routing
        self._layout = (tuple(m for m, _, _ in self.segments), tuple(self._segment_ranks))
        self._gates: torch.Tensor | None = None
        self._shared: dict[Any, _ColumnGates] = {}
        self.pending: str | None = None  # name of the feature module that must run first, while it has not

    @property
    def gates(self) -> torch.Tensor | None:
        """``(B, E)`` expert gates of the current batch (None: all zero)."""
        return self._gates

    @gates.setter
    def gates(self, value: torch.Tensor | None) -> None:
        self.set_gates(value)

    def set_gates(self, value: torch.Tensor | None, shared: dict[Any, _ColumnGates] | None = None) -> None:
        """Set the gates; ``shared``: a dict that every layer given the same gates receives, so that the column
        gates of a rank layout are derived once per routing, not once per layer."""
        self._gates = value
        self._shared = {} if shared is None else shared

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str) -> Any:
        return _fallback_getattr(self, name, "base_layer")  # in_features, out_features, stride, …

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, low_rank={[(m, b - a) for m, a, b in self.segments]}, "
                f"dense={self.dense_groups}")

    # the three products (down, up: _add_up, dense) and the gate layout; RoutedConv2d overrides them
    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    def _dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.linear(x, delta)

    def _gate_shape(self, cols: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return _expand(cols.to(h.dtype), h)

    def _batch_gates(self, x: torch.Tensor) -> torch.Tensor | None:
        g = self.gates
        if self.pending is not None:
            raise RoutingError(f"a routed layer ran before the feature module {self.pending!r} routed this batch; "
                               "pass the inputs that run it (e.g. input_ids, not inputs_embeds) or use feature_fn")
        if g is None:
            return None
        n = x.shape[0] if x.dim() > 1 else 1
        if g.shape[0] not in (1, n):
            raise RoutingError(f"gates for {g.shape[0]} samples but the layer input has batch size {n}")
        return g.to(device=x.device)

    def _rank_gates(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` expert gates → ``(B, ΣR)`` gates of the concatenated rank columns."""
        if self._singletons:
            seg = g[:, self._segment_experts]
        else:
            seg = torch.stack([g[:, list(m)].sum(dim=1) for m, _, _ in self.segments], dim=1)
        ranks = torch.tensor(self._segment_ranks, device=g.device)
        return seg.repeat_interleave(ranks, dim=1)

    def _column_gates(self, g: torch.Tensor) -> _ColumnGates:
        """The active rank columns and their gates for ``g``, from the routing's shared dict when a layer of the
        same layout derived them already."""
        key = (self._layout, self.lora_A.dtype, self.lora_A.device)
        cols = self._shared.get(key)
        if cols is None:
            cols = _ColumnGates.of(self._rank_gates(g.to(device=self.lora_A.device, dtype=self.lora_A.dtype)))
            self._shared[key] = cols
        return cols

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
        """``y + h B``, with ``b_rows = Bᵀ (R, out)``, accumulated into ``y`` (the base layer's fresh output) by
        one GEMM. The in-place product is not cast by autocast, so ``h`` and ``B`` are brought to ``y``'s dtype
        here (under bf16 autocast ``y`` and ``h`` are bf16 while the stored factors stay float32)."""
        if h.dtype != y.dtype:
            h = h.to(y.dtype)
        if b_rows.dtype != y.dtype:
            b_rows = b_rows.to(y.dtype)
        if y.dim() == 1:
            return y.addmv_(b_rows.t(), h)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_rows)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        g = self._batch_gates(x)
        if g is None:
            return y
        if self.segments:
            cols = self._column_gates(g)  # (B, ΣR'): gates of the rank columns some sample of the batch uses
            if cols.gates.shape[1]:
                a_cat, b_rows = self.lora_A, self.lora_B.t()
                if cols.index is not None:
                    a_cat, b_rows = a_cat.index_select(0, cols.index), b_rows.index_select(0, cols.index)
                h = self._down(x, a_cat)
                y = self._add_up(y, h.mul_(self._gate_shape(cols.gates, h)), b_rows)
        for d, members in enumerate(self.dense_groups):
            col = g[:, list(members)].sum(dim=1, keepdim=True)
            if bool(col.ne(0).any()):
                out = self._dense(x, self.dense_delta[d])
                y = y + self._gate_shape(col, out) * out
        return y


class RoutedConv2d(RoutedLinear):
    """``nn.Conv2d`` plus gated expert branches; experts see the kernel as ``(out, in/groups · kh · kw)``.

    Dense: ``y += g_j · conv(x, ΔW_j)`` (same stride / padding / dilation / groups, no bias). Low-rank (groups 1
    only): ``y += conv1x1(g ⊙ conv(x, A_cat), B_cat)`` with ``A_cat`` reshaped to ``(ΣR, in, kh, kw)``.
    """

    def __init__(self, base_layer: nn.Conv2d, n_experts: int,
                 low_rank: Sequence[tuple[int, torch.Tensor, torch.Tensor]] = (),
                 dense: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
        if low_rank and base_layer.groups != 1:
            raise CompatibilityError(f"low-rank experts need a conv with groups=1, got groups={base_layer.groups}")
        super().__init__(base_layer, n_experts, low_rank, dense)

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(flat.shape[0], *self.base_layer.weight.shape[1:])

    def _conv_with(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """The base layer's own forward (so subclasses that pad in ``forward``, e.g. EfficientNet's static "same"
        padding, keep their geometry) with ``kernel`` as its weight and no bias."""
        params = {"weight": kernel}
        if self.base_layer.bias is not None:
            params["bias"] = kernel.new_zeros(kernel.shape[0])
        return torch.func.functional_call(self.base_layer, params, (x,))

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._conv_with(x, self._kernel(a))

    def _dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self._conv_with(x, self._kernel(delta))

    def _gate_shape(self, cols: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return cols.to(h.dtype)[:, :, None, None]

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
        """``y + conv1x1(h, B)``."""
        return y.add_(F.conv2d(h, b_rows.t()[:, :, None, None]))


def pool_features(output: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """Router features ``(B, d)`` (float32) from a module output.

    3-D ``(B, T, d)``: mean over the positions where ``mask (B, T)`` is non-zero (all positions without a mask);
    4-D ``(B, C, H, W)``: spatial mean; 2-D: as is. A tuple / model output contributes its first element.
    """
    t = output
    if not isinstance(t, torch.Tensor):
        t = t[0]
    t = t.float()
    if t.dim() == 3:
        if mask is None:
            return t.mean(dim=1)
        if mask.dim() != 2 or tuple(mask.shape) != tuple(t.shape[:2]):
            raise RoutingError(f"attention mask of shape {tuple(mask.shape)} does not match features "
                               f"{tuple(t.shape)}; pass a (B, T) mask")
        m = mask.to(device=t.device, dtype=t.dtype).unsqueeze(-1)
        return (t * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 2:
        return t
    raise RoutingError(f"cannot pool router features from an output of shape {tuple(t.shape)}")


def final_hidden_mean(base: nn.Module, kwargs: dict[str, Any], mask_kwarg: str = "attention_mask") -> torch.Tensor:
    """The "final" router source: mean over real tokens of the base's last hidden state.

    Runs ``base(**kwargs, output_hidden_states=True)`` and pools ``last_hidden_state`` when the output has one
    (encoders), else ``hidden_states[-1]`` (causal LMs). The caller's output flags (``output_hidden_states``,
    ``output_attentions``, ``return_dict``: e.g. a probe that reads the hidden states) are not passed on.
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "output_attentions", "return_dict")}
    out = base(**kwargs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    return pool_features(h, kwargs.get(mask_kwarg))


#: feature functions a saved routed model can name (``feature: {"kind": "fn", "name": …}`` in the manifest)
FEATURE_FNS: dict[str, FeatureFn] = {"final_hidden_mean": final_hidden_mean}


def _is_continuation(kwargs: Mapping[str, Any]) -> bool:
    """True when the call continues a KV cache: ``cache_position[0] > 0``, or a non-empty cache passed as
    ``past_key_values`` (transformers 4.x) or ``cache`` (later 5.x releases, which pass no ``cache_position``)."""
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0]) > 0
    pkv = kwargs.get("past_key_values", kwargs.get("cache"))
    if pkv is None:
        return False
    length = getattr(pkv, "get_seq_length", None)
    if callable(length):
        return int(length()) > 0
    return len(pkv) > 0 if isinstance(pkv, tuple | list) else True


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None


@dataclass
class _State:
    """Per-call routing state shared by the hooks."""

    mask: torch.Tensor | None = None
    pending: bool = False
    feature_pass: bool = False
    forced: torch.Tensor | None = None
    gates_batch: int | None = None


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


class RoutedModel(nn.Module):
    """The base module with its expert-carrying layers replaced in place by :class:`RoutedLinear` (``nn.Linear``)
    or :class:`RoutedConv2d` (``nn.Conv2d``).

    ``experts[j]`` is gated by column ``j`` of the router's probabilities (after ``policy``). Routing source:
    ``feature_module`` (qualified name in ``base`` whose output is pooled by a forward hook) or ``feature_fn(base,
    kwargs) → (B, d)`` (a separate pass with all gates zero). ``router`` may be None when every call runs under
    :meth:`force`. ``forward`` returns what ``base`` returns; unknown attributes (``generate``, ``config``,
    ``device``…) are the base's.
    """

    def __init__(self, base: nn.Module, experts: Sequence[Expert], *, router: Router | None, policy: GatePolicy,
                 feature_module: str | None, feature_fn: FeatureFn | None = None,
                 mask_kwarg: str = "attention_mask") -> None:
        super().__init__()
        validate_experts(experts)
        if router is not None and feature_module is None and feature_fn is None:
            raise ConfigError("a router needs a feature source: feature_module or feature_fn")
        if router is not None and router.n_out != len(experts):
            raise CompatibilityError(f"the router has {router.n_out} outputs but there are {len(experts)} experts")
        if any(isinstance(m, RoutedLinear) for m in base.modules()):
            raise ConfigError("the base module already has routed layers; build a RoutedModel on a plain model")
        self.base = base
        self.router = router
        self.policy = policy
        self.feature_module = feature_module if feature_fn is None else None
        self.feature_fn = feature_fn
        self.mask_kwarg = mask_kwarg
        self.expert_names = [e.name for e in experts]
        self.expert_kinds = [e.kind for e in experts]
        self.last_probs: torch.Tensor | None = None
        #: per-task linear heads ``{task: {"weight" (C, d), "bias" (C,)}}`` (set by ``load_routed``; empty here)
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self._state = _State()
        feat = None
        if self.feature_module is not None:
            try:
                feat = base.get_submodule(self.feature_module)
            except AttributeError:
                raise ConfigError(f"feature module {self.feature_module!r} not found in the base module") from None
        self._layers: dict[str, RoutedLinear] = {}
        self._wrap(experts)  # all checks pass before the base is modified
        self._hooks = [base.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        if feat is not None:
            self._hooks.append(feat.register_forward_hook(self._feature_hook))

    # --- construction -------------------------------------------------------------------------------------
    def _wrap(self, experts: Sequence[Expert]) -> None:
        per_module: dict[str, tuple[list, list]] = {}
        for j, e in enumerate(experts):
            if isinstance(e, LowRankExpert):
                for m, (a, b) in e.factors.items():
                    per_module.setdefault(m, ([], []))[0].append((j, a, b))
            else:
                for m, d in e.deltas.items():
                    per_module.setdefault(m, ([], []))[1].append((j, d))
        for name, (low_rank, dense) in per_module.items():
            try:
                layer = self.base.get_submodule(name)
            except AttributeError:
                raise CompatibilityError(f"module {name!r} named by an expert is not in the base module") from None
            kinds = {nn.Linear: RoutedLinear, nn.Conv2d: RoutedConv2d}
            cls = next((c for t, c in kinds.items() if isinstance(layer, t)), None)
            if cls is None:
                raise CompatibilityError(f"module {name!r} is a {type(layer).__name__}; only nn.Linear and nn.Conv2d "
                                         "are routed")
            try:
                routed = cls(layer, len(experts), low_rank, dense)
            except CompatibilityError as err:
                raise CompatibilityError(f"module {name!r}: {err}") from None
            self._layers[name] = routed
        for name, routed in self._layers.items():
            parent, leaf = _parent(self.base, name)
            setattr(parent, leaf, routed)

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[nn.Module]:
        """Temporarily put the original ``nn.Linear`` / ``nn.Conv2d`` modules back (e.g. to save the base)."""
        for name, layer in self._layers.items():
            parent, leaf = _parent(self.base, name)
            setattr(parent, leaf, layer.base_layer)
        try:
            yield self.base
        finally:
            for name, layer in self._layers.items():
                parent, leaf = _parent(self.base, name)
                setattr(parent, leaf, layer)

    # --- attributes ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return _fallback_getattr(self, name, "base")  # generate, config, device, …

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def routed_layers(self) -> dict[str, RoutedLinear]:
        """Routed layers by module name."""
        return dict(self._layers)

    @property
    def feature_source(self) -> dict[str, Any]:
        """``{"kind": "module", "module": name}`` or ``{"kind": "fn", "name": registered name or "custom"}``."""
        if self.feature_fn is None:
            return {"kind": "module", "module": self.feature_module, "mask_kwarg": self.mask_kwarg}
        name = next((k for k, f in FEATURE_FNS.items() if f is self.feature_fn), "custom")
        return {"kind": "fn", "name": name, "mask_kwarg": self.mask_kwarg}

    @property
    def experts(self) -> list[Expert]:
        """The expert library, rebuilt from the routed layers' buffers (views, in the layers' dtype)."""
        out: list[Expert] = [LowRankExpert(n) if k == "lowrank" else DenseExpert(n)
                             for n, k in zip(self.expert_names, self.expert_kinds, strict=True)]
        for name, layer in self._layers.items():
            for members, a, b in layer.segments:
                for j in members:
                    out[j].factors[name] = (layer.lora_A[a:b], layer.lora_B[:, a:b])  # type: ignore[union-attr]
            for d, members in enumerate(layer.dense_groups):
                for j in members:
                    out[j].deltas[name] = layer.dense_delta[d]  # type: ignore[union-attr]
        return out

    def storage_bytes(self) -> dict[str, int]:
        """Bytes as stored by :func:`save_routed`: expert tensors after deduplication, router state."""
        tensors = [t for e in self.experts for t in e.tensors().values()]
        router = sum(t.numel() * t.element_size() for t in self.router.state_dict().values()) if self.router else 0
        return {"experts": stored_bytes(tensors), "router": router}

    # --- routing ------------------------------------------------------------------------------------------
    def _set_layers(self, gates: dict[str, torch.Tensor] | torch.Tensor | None, pending: str | None) -> None:
        shared: dict[Any, dict[Any, _ColumnGates]] = {}  # per gates object: layout → column gates
        for name, layer in self._layers.items():
            g = gates.get(name) if isinstance(gates, dict) else gates
            layer.set_gates(g, None if g is None else shared.setdefault(id(g), {}))
            layer.pending = pending

    def _route(self, probs: torch.Tensor) -> None:
        if probs.dim() != 2 or probs.shape[1] != self.n_experts:
            raise RoutingError(f"router probabilities must be (B, {self.n_experts}), got {tuple(probs.shape)}")
        self.last_probs = probs.detach()
        if self.policy.module_independent:
            self._set_layers(self.policy.gates(probs, ""), None)
        else:
            self._set_layers({m: self.policy.gates(probs, m) for m in self._layers}, None)
        self._state.pending = False
        self._state.gates_batch = int(probs.shape[0])

    def route_features(self, features: torch.Tensor) -> torch.Tensor:
        """Router probabilities ``softmax(router(features))`` (float32, ``(B, E)``)."""
        if self.router is None:
            raise RoutingError("this routed model has no router; call it under force(probs)")
        ref = self.router.mean
        return self.router(features.to(device=ref.device, dtype=ref.dtype)).float().softmax(dim=-1)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        st = self._state
        if st.feature_pass:
            return
        mask = kwargs.get(self.mask_kwarg)
        st.mask = mask if isinstance(mask, torch.Tensor) else None
        if _is_continuation(kwargs):
            n = _batch_size(args, kwargs)
            if st.gates_batch is None:
                raise RoutingError("a call continuing a KV cache came before any routed prompt")
            if n is not None and st.gates_batch not in (1, n):
                raise RoutingError(f"the KV-cache continuation has batch size {n} but the prompt was routed with "
                                   f"{st.gates_batch}; route the prompt again")
            return
        if st.forced is not None:
            self._route(st.forced)
            return
        if self.router is None:
            raise RoutingError("this routed model has no router; call it under force(probs)")
        if self.feature_fn is not None:
            if args:
                raise RoutingError("routing with feature_fn needs keyword inputs (e.g. input_ids=...)")
            self._set_layers(None, None)
            st.feature_pass = True
            try:
                feats = self.feature_fn(self.base, {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS})
            finally:
                st.feature_pass = False
            self._route(self.route_features(feats))
            return
        st.pending = True
        self._set_layers(None, self.feature_module)

    def _feature_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        st = self._state
        if st.feature_pass or not st.pending:
            return
        self._route(self.route_features(pool_features(output, st.mask)))

    @contextlib.contextmanager
    def force(self, probs: torch.Tensor) -> Iterator[RoutedModel]:
        """Use ``probs (B, E)`` (or ``(1, E)`` for every sample) instead of the router inside the block."""
        p = torch.as_tensor(probs).float()
        if p.dim() != 2 or p.shape[1] != self.n_experts:
            raise RoutingError(f"forced probabilities must be (B, {self.n_experts}), got {tuple(p.shape)}")
        prev, self._state.forced = self._state.forced, p
        try:
            yield self
        finally:
            self._state.forced = prev

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``base(*args, **kwargs)`` with per-sample routing (the hooks do the routing)."""
        return self.base(*args, **kwargs)
