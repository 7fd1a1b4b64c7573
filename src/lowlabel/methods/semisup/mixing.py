"""Batch mixing as pure functions: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019).

Written out rather than taken from timm's ``Mixup``: MixMatch mixes guessed soft labels of
unlabeled images with ``lambda' = max(lambda, 1 - lambda)`` (so each mixed sample stays closer to
its own image), which timm's class does not offer; and every draw (lambda, the pairing, the box)
comes from one ``numpy.random.Generator`` the caller seeds, not from global state. Each returns
the mixed images, the (effective) lambda and the pairing; targets are mixed by the caller.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def torch_seeded_rng() -> np.random.Generator:
    """A generator seeded from torch's global stream: inside a training step, the worker's seeded
    stream, so a seed repeats the mixing draws."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def _draw(alpha: float, rng: np.random.Generator, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    if alpha <= 0:
        raise ValueError(f"mixing alpha must be > 0, got {alpha}")
    return float(rng.beta(alpha, alpha)), torch.from_numpy(rng.permutation(n)).to(device)


def mixup(x: torch.Tensor, alpha: float, rng: np.random.Generator, keep_larger: bool = False) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``x' = l x + (1 - l) x[perm]`` with ``l ~ Beta(alpha, alpha)`` (``max(l, 1 - l)`` with
    ``keep_larger``, MixMatch's choice) and a random pairing ``perm``; returns (x', l, perm)."""
    lam, perm = _draw(alpha, rng, len(x), x.device)
    if keep_larger:
        lam = max(lam, 1 - lam)
    return lam * x + (1 - lam) * x[perm], lam, perm


def cutmix(x: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Paste a box of ``x[perm]`` into ``x``: sides ``sqrt(1 - l)`` of the image's, centre uniform,
    clipped at the border; ``l`` returned is the area actually kept, ``1 - box / image``."""
    lam, perm = _draw(alpha, rng, len(x), x.device)
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (h * w), perm


def mix_targets(targets: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """The soft targets (N, C) of a mixed batch: ``l t + (1 - l) t[perm]``."""
    return lam * targets + (1 - lam) * targets[perm]


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a mixed batch with hard labels: ``l CE(y) + (1 - l) CE(y[perm])``, equal to
    the soft cross-entropy to the mixed one-hot targets."""
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_c t_ic log softmax(logits_i)_c`` for soft targets (rows summing to 1)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
