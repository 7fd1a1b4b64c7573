"""Albumentations recipes: contrastive views, weak/strong views, evaluation view.

Every recipe works on uint8 (H, W, C) with C in {1, 3} and returns a float32 (C, H, W)
tensor normalised with the dataset's own mean/std. Randomness is per sample and
reproducible: :class:`View` reseeds the pipeline from (seed, epoch, index), so the same
sample gets the same augmentation however the data is sharded across workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=np.ascontiguousarray(image))["image"]
        # Some transforms drop a trailing singleton channel; put it back.
        return out if out.ndim == 3 else out.unsqueeze(0)


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


def randaugment_ops(channels: int, magnitude: int) -> list[A.BasicTransform]:
    """RandAugment's op set (Cubuk et al. 2020, as FixMatch uses it), magnitude on a 0-30 scale.

    Each op draws its strength uniformly up to the magnitude (FixMatch's RA variant),
    with a random sign where the op has one.
    """
    f = magnitude / 30.0
    shear = math.degrees(math.atan(0.3 * f))
    enhance = (max(0.0, 1 - 0.9 * f), 1 + 0.9 * f)
    ops: list[A.BasicTransform] = [
        A.NoOp(p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Affine(rotate=(-30 * f, 30 * f), border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0),
        A.Solarize(threshold_range=(1 - f, 1.0), p=1.0),
        A.Posterize(num_bits=(8 - round(4 * f), 8), p=1.0),
        A.ColorJitter(brightness=enhance, contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1.0),
        A.ColorJitter(brightness=(1, 1), contrast=enhance, saturation=(1, 1), hue=(0, 0), p=1.0),
        A.Sharpen(alpha=(0.0, min(1.0, 0.9 * f)), lightness=(1.0, 1.0), p=1.0),
        A.Affine(shear={"x": (-shear, shear), "y": (0, 0)}, border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-shear, shear)}, border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * f, 0.45 * f), "y": (0, 0)}, border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * f, 0.45 * f)}, border_mode=cv2.BORDER_CONSTANT, fill=127, p=1.0),
    ]
    if channels == 3:  # "color" = saturation; identity on grayscale, so left out there
        ops.append(A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=enhance, hue=(0, 0), p=1.0))
    return ops


def strong_view(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], num_ops: int = 2, magnitude: int = 10, cutout: float = 0.5
) -> View:
    """Weak view + RandAugment(N ops, drawn with replacement) + Cutout up to ``cutout`` of the side."""
    transforms = [*_weak(size), A.SomeOf(randaugment_ops(channels, magnitude), n=num_ops, replace=True, p=1.0)]
    if cutout > 0:
        transforms.append(
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.05, cutout), hole_width_range=(0.05, cutout), fill=127, p=1.0)
        )
    return View(transforms, mean, std)


def eval_view(mean: Sequence[float], std: Sequence[float]) -> View:
    return View([], mean, std)
