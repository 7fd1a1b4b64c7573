"""The augmentation recipes of :mod:`lowlabel.data.augment`, batched on the training device.

Every view takes a uint8 batch (B, C, H, W), C in {1, 3}, already on the device (the worker's CPU
tensors when there is no GPU), and returns the float32 views normalised with the dataset's
mean/std. Parameters are drawn per sample, and the draw is a function of one integer seed per
batch (:func:`batch_seed` of run seed, epoch, step, rank and view): the same seed gives the same
views, and a run resumed at an epoch/chunk boundary continues the same stream.

kornia does what it does the same way as the CPU recipe (RandomResizedCrop, HorizontalFlip,
ColorJitter -- torchvision's formulas, as albumentations' ColorJitter, not ColorJiggle's additive
brightness --, RandomGrayscale). The weak view's whole-pixel translation with reflect-101 padding,
the RandAugment ops and Cutout are written here as batched tensor ops with per-sample parameters,
each matching torchvision.transforms.v2.functional on uint8 images (tests/test_device_augment.py),
with the op set and the magnitude ranges of the CPU recipe (:func:`lowlabel.data.augment.randaugment_spans`).

Differences from the CPU path, by design: the random stream is per batch, not per sample index
(the same image in another batch position gets other parameters); kornia works in float, so the
contrastive and weak views are not rounded to uint8 between steps (the strong view is, before
RandAugment, whose ops are defined on uint8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia.augmentation as K
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch import nn

from lowlabel.data.augment import RANDAUGMENT_OPS, randaugment_spans

AUGMENT_MODES = ("auto", "cpu", "device")


def resolve_augment(mode: str, device: torch.device | str) -> str:
    """``runtime.augment`` for a worker training on ``device``: "cpu" (albumentations in the
    DataLoader, per image) or "device" (this module, per batch in the training loop).

    auto: device on an accelerator (CPU workers would starve it). On CPU also device, measured with
    bench/augment_throughput.py (Conv-4, batch 256, loader_workers 0 as the CPU default): the views
    alone 6-7x (SimCLR pair, 28 px gray; 2.2x at 32 px RGB, where kornia's hue step costs most) and
    14x (FixMatch weak + strong) faster than albumentations per image, and the full step faster at 1
    and 2 threads (SimCLR 28 px: 483 vs 337 img/s at 1 thread, 665 vs 531 at 2; FixMatch: 612 vs 487,
    1284 vs 709). With many loader_workers on a big CPU box the cpu path may catch up: set it there.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"runtime.augment must be one of {AUGMENT_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "device"


def batch_seed(seed: int, epoch: int, step: int, rank: int, view: int = 0) -> int:
    """A distinct 63-bit seed per (run seed, epoch or chunk, step, rank, view) of a device batch."""
    state = np.random.SeedSequence([seed, epoch, step, rank, view, 0xD0A6]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] -> (x - mean) / std, per channel."""
    return (x - mean.to(x.device)) / std.to(x.device)


class DeviceView(nn.Module):
    """``view(images_uint8, seed) -> float views``; subclasses define :meth:`augment` on [0, 1] floats."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        devices = [images.device] if images.device.type == "cuda" else []
        # kornia draws from the global RNG: seed it for this batch only, leave the caller's stream alone.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed ^ 0x5EED)  # our own draws, on the CPU
            x = self.augment(images.float().div_(255), generator)
        return _normalise(x, self.mean, self.std).contiguous()


def contrastive_augmentations(
    size: int, channels: int, crop_scale: tuple[float, float] = (0.2, 1.0), color_strength: float = 0.5
) -> nn.Sequential:
    """SimCLR's CIFAR recipe as kornia modules, with :func:`lowlabel.data.augment.contrastive_view`'s ranges."""
    s = color_strength
    chroma = (0.8 * s, 0.2 * s) if channels == 3 else (0.0, 0.0)  # no saturation/hue on one channel
    steps: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=tuple(crop_scale), ratio=(0.75, 4 / 3), align_corners=False),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(brightness=0.8 * s, contrast=0.8 * s, saturation=chroma[0], hue=chroma[1], p=0.8),
    ]
    if channels == 3:
        steps.append(K.RandomGrayscale(p=0.2))
    return nn.Sequential(*steps)


class ContrastiveView(DeviceView):
    def __init__(self, size: int, channels: int, mean, std, crop_scale=(0.2, 1.0), color_strength: float = 0.5) -> None:
        super().__init__(mean, std)
        self.steps = contrastive_augmentations(size, channels, crop_scale, color_strength)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.steps(x)


class Translate(nn.Module):
    """Shift each sample by whole pixels, trunc(U[-fraction, fraction] * side) per axis, reflect-101
    padding: albumentations' ``Affine(translate_percent=...)`` as the CPU weak view uses it (it
    truncates the shift to whole pixels, so a 32 px side moves -3..3 px, 0 twice as often). kornia's
    RandomAffine would shift by fractional pixels, bilinearly: not the same distribution."""

    def __init__(self, fraction: float = 0.125) -> None:
        super().__init__()
        self.fraction = float(fraction)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        u = torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1
        shift = torch.trunc(u * self.fraction * torch.tensor([w, h], dtype=torch.float64)).to(torch.int64)
        return shift_reflect(x, shift[:, 0], shift[:, 1])


def shift_reflect(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = x[..., i - dy, j - dx]`` per sample, reflect-101 outside (OpenCV's BORDER_REFLECT_101)."""
    b, c, h, w = x.shape
    pad_x, pad_y = min(w - 1, int(dx.abs().max())), min(h - 1, int(dy.abs().max()))
    padded = torch.nn.functional.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    rows = (torch.arange(h).view(1, h) - dy.view(b, 1) + pad_y).to(x.device)
    cols = (torch.arange(w).view(1, w) - dx.view(b, 1) + pad_x).to(x.device)
    index = (rows.view(b, 1, h, 1) * padded.shape[-1] + cols.view(b, 1, 1, w)).expand(b, c, h, w)
    return padded.flatten(2).gather(2, index.flatten(2)).view(b, c, h, w)


class WeakAugment(nn.Module):
    """FixMatch's weak view: flip (kornia) + up to 12.5% translation per axis (:class:`Translate`)."""

    def __init__(self) -> None:
        super().__init__()
        self.flip = K.RandomHorizontalFlip(p=0.5)
        self.translate = Translate(0.125)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.translate(self.flip(x), generator)


class WeakView(DeviceView):
    def __init__(self, mean, std) -> None:
        super().__init__(mean, std)
        self.steps = WeakAugment()

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.steps(x, generator)


# --------------------------------------------------------------------------- RandAugment, batched

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
FILL = 127.0


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """clamp to [0, 255] and truncate, as torchvision's ``.to(uint8)`` after its float arithmetic."""
    return x.clamp_(0, 255).to(torch.uint8)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's float grayscale of a uint8 RGB batch, floored (its uint8 saturation/contrast path)."""
    r, g, b = x.float().unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # torchvision's x * r + (1 - r) * other, with (1 - r) taken in double as its alpha argument
    r, alpha = _per_sample(ratio, x), _per_sample(1.0 - ratio.to(torch.float64), x)
    return _to_uint8(torch.addcmul(x.float() * r, other, alpha))


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8(x.float() * _per_sample(factor, x))


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _grayscale(x) if x.shape[1] == 3 else x.float()
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, _grayscale(x), factor)  # the identity on one channel


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    c, h, w = x.shape[1:]
    if h <= 2 or w <= 2:
        return x
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    out = x.float()
    blurred = torch.nn.functional.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - _per_sample(factor, x)))
    return _to_uint8(out)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """threshold as a fraction of 255, per sample (torchvision: ``solarize(x, 255 * v)``)."""
    return torch.where(x.float() >= _per_sample(threshold, x) * 255, 255 - x, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    keep = bits.to(torch.int64).clamp(0, 8)
    masks = (((1 << keep) - 1) << (8 - keep)).to(device=x.device, dtype=torch.uint8)
    return x & masks.view(-1, 1, 1, 1)


def autocontrast(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return F.autocontrast(x)  # batched, per sample and channel


def equalize(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return F.equalize(x)  # batched, per sample and channel


def identity(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return x


def affine(x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor) -> torch.Tensor:
    """torchvision's ``F.affine(x, angle, [tx, ty], 1.0, [shear_x, shear_y], NEAREST, fill=127)`` with
    per-sample parameters (degrees, clockwise angle; pixels): its inverse matrix, its grid, nearest."""
    b, c, h, w = x.shape
    rot, sx, sy = (torch.deg2rad(v.to(torch.float64)) for v in (angle, shear_x, shear_y))
    tx, ty = tx.to(torch.float64), ty.to(torch.float64)
    a = torch.cos(rot - sy) / torch.cos(sy)
    bb = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    cc = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -bb, -cc, a
    m2 = m0 * -tx + m1 * -ty
    m5 = m3 * -tx + m4 * -ty
    theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).view(b, 2, 3).to(device=x.device, dtype=torch.float32)
    base = torch.empty(1, h, w, 3, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    image = torch.cat([x.float(), torch.ones(b, 1, h, w, device=x.device)], 1)
    out = torch.nn.functional.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out, mask = out[:, :c], out[:, c:]
    return torch.where(mask < 0.5, torch.full_like(out, FILL), out).round_().to(torch.uint8)


def geometric(x: torch.Tensor, names: Sequence[str], values: torch.Tensor) -> torch.Tensor:
    """Each sample's geometric op ``names[i]`` at ``values[i]``, in the CPU recipe's units (Rotate:
    degrees counter-clockwise; Shear: degrees; Translate: fraction of the side, whole pixels truncated)."""
    h, w = x.shape[-2:]
    zero = torch.zeros(len(names), dtype=torch.float64)
    angle, tx, ty, shx, shy = zero.clone(), zero.clone(), zero.clone(), zero.clone(), zero.clone()
    values = values.to(torch.float64)
    for i, name in enumerate(names):
        v = values[i]
        if name == "Rotate":
            angle[i] = -v  # F.rotate's counter-clockwise angle is affine's clockwise one negated
        elif name == "ShearX":
            shx[i] = v
        elif name == "ShearY":
            shy[i] = v
        elif name == "TranslateX":
            tx[i] = float(int(v * w))
        elif name == "TranslateY":
            ty[i] = float(int(v * h))
        else:
            raise ValueError(f"{name} is not a geometric op")
    return affine(x, angle, tx, ty, shx, shy)


POINT_OPS = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Solarize": solarize,
    "Posterize": posterize,
    "Brightness": brightness,
    "Contrast": contrast,
    "Color": saturation,
    "Sharpness": sharpness,
}


def apply_op(name: str, x: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
    """RandAugment op ``name`` on a uint8 batch, one value per sample (or one for all), in the
    units of :func:`lowlabel.data.augment.randaugment_op`."""
    values = torch.as_tensor(values, dtype=torch.float64).expand(x.shape[0]).clone()
    if name in GEOMETRIC_OPS:
        return geometric(x, [name] * x.shape[0], values)
    if name not in POINT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RANDAUGMENT_OPS}")
    return POINT_OPS[name](x, values)


def cutout(x: torch.Tensor, generator: torch.Generator, max_fraction: float, fill: int = 127) -> torch.Tensor:
    """One square per sample, side round(U[0, max_fraction] * min side), centred uniformly over the
    image and clipped at its border (:class:`lowlabel.data.augment.Cutout`)."""
    b, _, h, w = x.shape
    u = torch.rand(b, 3, generator=generator, dtype=torch.float64)
    side = torch.round(u[:, 0] * max_fraction * min(h, w))
    x0, y0 = torch.round(u[:, 1] * w - side / 2), torch.round(u[:, 2] * h - side / 2)
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    inside = (rows >= y0.view(-1, 1, 1)) & (rows < (y0 + side).view(-1, 1, 1)) & (cols >= x0.view(-1, 1, 1)) & (cols < (x0 + side).view(-1, 1, 1))
    return x.masked_fill(inside.unsqueeze(1).to(x.device), fill)


class StrongView(DeviceView):
    """Weak view, rounded to uint8, then RandAugment (``num_ops`` ops per sample, drawn with
    replacement, in the drawn order, each at a strength uniform in its range at ``magnitude``),
    then Cutout: :func:`lowlabel.data.augment.strong_view`, batched."""

    def __init__(self, channels: int, mean, std, num_ops: int = 2, magnitude: int = 10, cutout: float = 0.5) -> None:
        super().__init__(mean, std)
        self.weak = WeakAugment()
        self.num_ops, self.cutout = num_ops, cutout
        spans = randaugment_spans(magnitude)
        self.ops = list(RANDAUGMENT_OPS)
        self.low = torch.tensor([spans.get(n, (0.0, 0.0))[0] for n in self.ops], dtype=torch.float64)
        self.high = torch.tensor([spans.get(n, (0.0, 0.0))[1] for n in self.ops], dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(op index, value) per slot and sample, each (num_ops, batch)."""
        which = torch.randint(len(self.ops), (self.num_ops, batch), generator=generator)
        u = torch.rand(self.num_ops, batch, generator=generator, dtype=torch.float64)
        low, high = self.low[which], self.high[which]
        values = low + (high - low) * u
        bits = self.ops.index("Posterize")
        # an integer uniform over [low, high], both included, as albumentations' Posterize
        values = torch.where(which == bits, torch.floor(low + (high - low + 1) * u).clamp(max=high), values)
        return which, values

    def randaugment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        which, values = self.sample(x.shape[0], generator)
        for slot in range(self.num_ops):
            ops, vals = which[slot], values[slot]
            geo = [i for i, op in enumerate(ops.tolist()) if self.ops[op] in GEOMETRIC_OPS]
            if geo:
                idx = torch.tensor(geo)
                sub = geometric(x[idx.to(x.device)], [self.ops[int(ops[i])] for i in geo], vals[idx])
                x = x.index_copy(0, idx.to(x.device), sub)
            for k, name in enumerate(self.ops):
                if name in GEOMETRIC_OPS or name == "Identity":
                    continue
                idx = torch.nonzero(ops == k).flatten()
                if len(idx):
                    device_idx = idx.to(x.device)
                    x = x.index_copy(0, device_idx, POINT_OPS[name](x[device_idx], vals[idx]))
        return x

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.weak(x, generator).mul_(255).round_().clamp_(0, 255).to(torch.uint8)  # exact: whole-pixel moves
        x = self.randaugment(x, generator)
        if self.cutout > 0:
            x = cutout(x, generator, self.cutout)
        return x.float().div_(255)


class EvalView(DeviceView):
    """Normalisation only."""


def contrastive_view(size: int, channels: int, mean, std, crop_scale=(0.2, 1.0), color_strength: float = 0.5) -> ContrastiveView:
    return ContrastiveView(size, channels, mean, std, crop_scale, color_strength)


def weak_view(size: int, mean, std) -> WeakView:
    return WeakView(mean, std)


def strong_view(size: int, channels: int, mean, std, num_ops: int = 2, magnitude: int = 10, cutout: float = 0.5) -> StrongView:
    return StrongView(channels, mean, std, num_ops, magnitude, cutout)


def eval_view(mean, std) -> EvalView:
    return EvalView(mean, std)


def uint8_batch(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 array -> (B, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def view_loader(fetch: Callable[[np.ndarray], np.ndarray], view: DeviceView, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """Row indices -> ``view`` of those images on ``device``, the uint8 rows read by ``fetch``;
    the view at step 0 (for the eval view: no randomness). Episodes load their images with it."""

    def load(rows: np.ndarray) -> torch.Tensor:
        return view(uint8_batch(fetch(np.asarray(rows))).to(device), 0)

    return load


__all__ = [
    "AUGMENT_MODES",
    "ContrastiveView",
    "DeviceView",
    "EvalView",
    "StrongView",
    "WeakView",
    "apply_op",
    "batch_seed",
    "contrastive_augmentations",
    "contrastive_view",
    "cutout",
    "eval_view",
    "resolve_augment",
    "shift_reflect",
    "strong_view",
    "uint8_batch",
    "view_loader",
    "weak_view",
]
