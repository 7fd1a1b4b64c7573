"""Image encoders: image batch (B, C, H, W) -> flat feature batch (B, D).

``conv4`` is the few-shot literature's 4-block ConvNet (Vinyals et al. 2016; Snell et al.
2017): timm has none, so it is the one backbone written here. Everything else comes from
timm, with ``in_chans`` taken from the data.
"""

from __future__ import annotations

import timm
import torch
from torch import nn


class Conv4(nn.Sequential):
    """4 x [conv3x3 -> BN -> ReLU -> maxpool2], flattened (64 dims at 28 px, 1600 at 84 px)."""

    def __init__(self, in_chans: int = 3, width: int = 64) -> None:
        blocks: list[nn.Module] = []
        channels = in_chans
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        super().__init__(*blocks, nn.Flatten())


def _resnet18_cifar(in_chans: int, width: int) -> nn.Module:
    # Small-image ResNet-18 (the variant solo-learn uses for CIFAR): 3x3 stride-1 stem,
    # no max-pool, so 32 px inputs keep a 4x4 map before global pooling.
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=0, in_chans=in_chans, channels=tuple(width * m for m in (1, 2, 4, 8))
    )
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_encoder(arch: str, in_chans: int, width: int = 64) -> nn.Module:
    """Build an encoder by name ('conv4', 'resnet18_cifar' or 'timm:<model>')."""
    if arch == "conv4":
        return Conv4(in_chans=in_chans, width=width)
    if arch == "resnet18_cifar":
        return _resnet18_cifar(in_chans, width)
    if arch.startswith("timm:"):
        # pretrained=False: weights are never fetched at run time; load a checkpoint instead.
        return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=0, in_chans=in_chans)
    raise ValueError(f"unknown encoder arch {arch!r}; allowed: 'conv4', 'resnet18_cifar', 'timm:<model name>'")


@torch.no_grad()
def feature_dim(encoder: nn.Module, in_chans: int, image_size: int) -> int:
    """Output width for this input size (Conv-4's depends on it), measured with a dummy batch."""
    was_training = encoder.training
    encoder.eval()
    dim = encoder(torch.zeros(1, in_chans, image_size, image_size)).shape[1]
    encoder.train(was_training)
    return int(dim)
