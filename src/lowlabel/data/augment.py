"""Albumentations recipes: contrastive views, weak/strong views, evaluation view.

Every recipe works on uint8 (H, W, C) with C in {1, 3} and returns a float32 (C, H, W)
tensor normalised with the dataset's own mean/std. Randomness is per sample and
reproducible: :class:`View` reseeds the pipeline from (seed, epoch, index), so the same
sample gets the same augmentation however the data is sharded across workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

# OpenCV's own thread pool (one thread per core by default) buys nothing on 28-96 px images and,
# in every DataLoader worker at once, oversubscribes the cores; parallelism comes from workers.
cv2.setNumThreads(1)


class View:
    """A seeded albumentations pipeline: ``view(image, seed) -> tensor``."""

    def __init__(self, transforms: Sequence[A.BasicTransform], mean: Sequence[float], std: Sequence[float]) -> None:
        self.pipeline = A.Compose(
            [*transforms, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()], seed=0
        )
        # Without random transforms the view is a per-pixel map (Normalize): its outputs for the
        # 256 uint8 values, per channel, normalise a whole batch at once (see batch()).
        self.pixel_table = None if transforms else self._pixel_table(len(tuple(mean)))

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        # One generator pair drawn from in turn by every transform. Compose.set_random_seed would
        # give each transform its own generator with the same seed (albumentations 2.0.8): their
        # draws would then be identical, coupling flip, jitter, grayscale and the shift's sign.
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.pipeline(image=np.ascontiguousarray(image))["image"]
        # Some transforms drop a trailing singleton channel; put it back.
        return out if out.ndim == 3 else out.unsqueeze(0)

    def _pixel_table(self, channels: int) -> np.ndarray:
        """(256, channels) float32: the pipeline's output for each uint8 value in each channel."""
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(256, 1, 1), channels, axis=2)
        return self(ramp, 0).reshape(channels, 256).T.contiguous().numpy()

    def batch(self, images: np.ndarray) -> torch.Tensor:
        """``torch.stack([view(image, 0) for image in images])`` for uint8 (N, H, W, C) images.

        A view without random transforms looks every pixel up in its table: the same float32
        values, bit for bit, without a Python call per image (which cost as much as a small
        encoder's forward pass on CPU). The result is laid out channels-last (N, H, W, C in memory).
        """
        table = self.pixel_table
        if table is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != table.shape[1]:
            return torch.stack([self(np.asarray(image), 0) for image in images])
        pixels = table[np.asarray(images).astype(np.intp), np.arange(table.shape[1])]
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def sample_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    """A distinct, order-independent 32-bit seed per (run seed, epoch, sample, view)."""
    return int(np.random.SeedSequence([seed, epoch, index, view]).generate_state(1)[0])


def _color_jitter(channels: int, strength: float) -> A.BasicTransform:
    if channels == 3:
        return A.ColorJitter(brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength, hue=0.2 * strength, p=0.8)
    # Saturation and hue have no meaning on one channel.
    return A.ColorJitter(brightness=0.8 * strength, contrast=0.8 * strength, saturation=0, hue=0, p=0.8)


def contrastive_view(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float] = (0.2, 1.0), color_strength: float = 0.5
) -> View:
    """SimCLR's CIFAR recipe (crop, flip, colour jitter, grayscale); no blur at small sizes."""
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(size, size), scale=crop_scale),
        A.HorizontalFlip(p=0.5),
        _color_jitter(channels, color_strength),
    ]
    if channels == 3:
        transforms.append(A.ToGray(num_output_channels=3, p=0.2))
    return View(transforms, mean, std)


def _weak(size: int) -> list[A.BasicTransform]:
    # FixMatch's weak view: flip + up to 12.5% translation with reflection padding.
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.125, 0.125), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
    ]


def weak_view(size: int, mean: Sequence[float], std: Sequence[float]) -> View:
    return View(_weak(size), mean, std)


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL's ``ImageOps.equalize`` per channel (torchvision's ``equalize``), on uint8 (H, W, C).

    albumentations 2.0.8's ``Equalize`` differs: ``mode="cv"`` (its default) is OpenCV's equalizeHist;
    ``mode="pil"`` builds its table from the inclusive cumulative histogram, one bin off PIL's (up to
    6 grey levels on RGB), and returns (H, W, 1) images unchanged.
    """
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        present = hist[hist > 0]
        step = (int(present.sum()) - int(present[-1])) // 255
        if step == 0:  # one grey level, or too few pixels below the top one: unchanged, as PIL
            out[..., c] = channel
            continue
        below = np.concatenate(([0], np.cumsum(hist)[:-1]))  # pixels strictly darker than each level
        lut = np.minimum((below + step // 2) // step, 255).astype(np.uint8)
        out[..., c] = lut[channel]
    return out


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32)


def adjust_sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``ImageEnhance.Sharpness`` (torchvision's ``adjust_sharpness``) on uint8 (H, W, C).

    Blends the image with its 3x3 smoothed copy ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded):
    factor 0 is the smoothed image, 1 the image, > 1 sharpens; border pixels are kept.
    """
    h, w, c = image.shape
    if h <= 2 or w <= 2 or factor == 1.0:
        return image
    out = image.astype(np.float32)
    sums = cv2.filter2D(out, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE).reshape(h, w, c)  # exact integers
    blurred = np.rint(sums / np.float32(13))
    inner = out[1:-1, 1:-1]
    inner += np.float32(1.0 - factor) * (blurred[1:-1, 1:-1] - inner)
    return np.clip(out, 0, 255).astype(np.uint8)  # truncates, as torchvision's uint8 cast


class Equalize(A.ImageOnlyTransform):
    """RandAugment's Equalize: :func:`equalize` (PIL's, per channel)."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
        return equalize(img)


class Sharpness(A.ImageOnlyTransform):
    """RandAugment's Sharpness: :func:`adjust_sharpness` with a factor drawn uniformly from ``factor_range``."""

    def __init__(self, factor_range: tuple[float, float] = (1.0, 1.0), p: float = 1.0) -> None:
        super().__init__(p=p)
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))

    def get_params(self) -> dict[str, float]:
        return {"factor": self.py_random.uniform(*self.factor_range)}  # the Compose's seeded RNG

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: object) -> np.ndarray:
        return adjust_sharpness(img, factor)


def square_cutout(image: np.ndarray, side: int, center: tuple[float, float], fill: int) -> np.ndarray:
    """Fill a ``side`` x ``side`` square centred at ``center`` = (x, y), clipped at the image border."""
    h, w = image.shape[:2]
    x0, y0 = round(center[0] - side / 2), round(center[1] - side / 2)
    out = image.copy()
    out[max(0, y0) : max(0, min(h, y0 + side)), max(0, x0) : max(0, min(w, x0 + side))] = fill
    return out


class Cutout(A.ImageOnlyTransform):
    """Cutout as RandAugment / FixMatch use it: one square of side v * image side, v ~ U[0, ``max_fraction``],
    centred uniformly over the image and clipped at its border (so a square that overlaps the border
    shows as a smaller rectangle), filled with ``fill``.
    """

    def __init__(self, max_fraction: float = 0.5, fill: int = 127, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.max_fraction = float(max_fraction)
        self.fill = int(fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        side = round(self.py_random.uniform(0.0, self.max_fraction) * min(h, w))
        return {"side": side, "center": (self.py_random.uniform(0, w), self.py_random.uniform(0, h))}

    def apply(self, img: np.ndarray, side: int = 0, center: tuple[float, float] = (0, 0), **params: object) -> np.ndarray:
        return square_cutout(img, side, center, self.fill)


RANDAUGMENT_OPS = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Posterize", "Brightness",
    "Contrast", "Color", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)  # fmt: skip


def randaugment_op(name: str, low: float = 0.0, high: float = 0.0) -> A.BasicTransform:
    """One of :data:`RANDAUGMENT_OPS`, its parameter drawn uniformly from [low, high] in the op's own
    units, as torchvision.transforms.v2.functional takes it: degrees (Rotate: counter-clockwise, about
    the centre), shear angle in degrees (ShearX/Y, about the centre), fraction of the side (TranslateX/Y:
    whole pixels, truncated, as torchvision's RandAugment), enhance factor (Brightness, Contrast,
    Color = saturation, Sharpness; 1 is the identity), threshold as a fraction of 255 (Solarize), bits
    kept (Posterize, an integer). Identity, AutoContrast and Equalize take none. Geometric ops sample
    nearest-neighbour and fill with 127, as RandAugment's PIL ops (torchvision's default is also nearest).
    """
    span = (low, high)

    def affine(**kwargs: object) -> A.BasicTransform:
        return A.Affine(**kwargs, interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0)

    def jitter(factor: str) -> A.BasicTransform:  # ColorJitter with one factor drawn, the rest at 1
        unit = (1.0, 1.0)
        factors = {"brightness": unit, "contrast": unit, "saturation": unit, factor: span}
        return A.ColorJitter(**factors, hue=(0.0, 0.0), p=1.0)

    ops = {
        "Identity": lambda: A.NoOp(p=1.0),
        "AutoContrast": lambda: A.AutoContrast(cutoff=0, method="pil", p=1.0),  # "cdf", the default, equalises
        "Equalize": lambda: Equalize(p=1.0),
        "Rotate": lambda: affine(rotate=span),
        "Solarize": lambda: A.Solarize(threshold_range=span, p=1.0),
        "Posterize": lambda: A.Posterize(num_bits=(int(low), int(high)), p=1.0),
        "Brightness": lambda: jitter("brightness"),
        "Contrast": lambda: jitter("contrast"),
        "Color": lambda: jitter("saturation"),  # the identity on one channel, as PIL and torchvision
        "Sharpness": lambda: Sharpness(factor_range=span, p=1.0),
        "ShearX": lambda: affine(shear={"x": span, "y": (0, 0)}),
        "ShearY": lambda: affine(shear={"x": (0, 0), "y": span}),
        "TranslateX": lambda: affine(translate_percent={"x": span, "y": (0, 0)}),
        "TranslateY": lambda: affine(translate_percent={"x": (0, 0), "y": span}),
    }
    if name not in ops:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RANDAUGMENT_OPS}")
    return ops[name]()


def randaugment_ops(channels: int, magnitude: int) -> list[A.BasicTransform]:
    """RandAugment's 14 ops (Cubuk et al. 2020, as FixMatch uses them), magnitude on a 0-30 scale.

    Each op draws its strength uniformly up to the magnitude (FixMatch's RA variant), with a
    random sign where the op has one. The bounds at magnitude m are torchvision's RandAugment bin
    m of 31 (f = m / 30): rotate 30f degrees, shear atan(0.3f), translate 0.45f of the side, enhance
    factors 1 +- 0.9f, down to 8 - round(4f) bits, solarize threshold down to 255 (1 - f). Each op
    matches torchvision.transforms.v2.functional on uint8 images (tests/test_randaugment.py).
    ``channels`` is unused since Color became the identity on one channel (all 14 ops, as published).
    """
    spans = randaugment_spans(magnitude)
    return [randaugment_op(name, *spans.get(name, (0.0, 0.0))) for name in RANDAUGMENT_OPS]


def randaugment_spans(magnitude: int) -> dict[str, tuple[float, float]]:
    """Each parameterised op's [low, high] at ``magnitude`` (0-30), in :func:`randaugment_op`'s units;
    shared with the batched ops of :mod:`lowlabel.data.device_augment`."""
    f = magnitude / 30.0
    shear = math.degrees(math.atan(0.3 * f))
    enhance = (max(0.0, 1 - 0.9 * f), 1 + 0.9 * f)
    spans: dict[str, tuple[float, float]] = {
        "Rotate": (-30 * f, 30 * f),
        "Solarize": (1 - f, 1.0),
        "Posterize": (8 - round(4 * f), 8),
        "Brightness": enhance,
        "Contrast": enhance,
        "Color": enhance,
        "Sharpness": enhance,
        "ShearX": (-shear, shear),
        "ShearY": (-shear, shear),
        "TranslateX": (-0.45 * f, 0.45 * f),
        "TranslateY": (-0.45 * f, 0.45 * f),
    }
    return spans


def strong_view(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], num_ops: int = 2, magnitude: int = 10, cutout: float = 0.5
) -> View:
    """Weak view + RandAugment(N ops drawn with replacement, applied in random order) + a square Cutout
    of side up to ``cutout`` of the image side."""
    transforms = [*_weak(size), A.RandomOrder(randaugment_ops(channels, magnitude), n=num_ops, replace=True, p=1.0)]
    if cutout > 0:
        transforms.append(Cutout(max_fraction=cutout, fill=127, p=1.0))
    return View(transforms, mean, std)


def eval_view(mean: Sequence[float], std: Sequence[float]) -> View:
    return View([], mean, std)
