"""Image encoders: image batch (B, C, H, W) -> flat feature batch (B, D).

``conv4`` is the few-shot literature's 4-block ConvNet (Vinyals et al. 2016; Snell et al.
2017) and ``wrn<depth>_<widen>`` the CIFAR Wide-ResNet of FixMatch/USB (WRN-28-2): timm has
neither, so they are the backbones written here. Everything else comes from timm, with
``in_chans`` taken from the data.
"""

from __future__ import annotations

import re

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


class _WideBasic(nn.Module):
    """Pre-activation basic block (BN -> LeakyReLU -> conv) x 2, as in FixMatch's WRN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        # FixMatch's BN momentum 0.001 (PyTorch convention: weight of the new batch).
        self.bn1, self.bn2 = nn.BatchNorm2d(cin, momentum=0.001), nn.BatchNorm2d(cout, momentum=0.001)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv2(self.act(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Sequential):
    """CIFAR Wide-ResNet (Zagoruyko & Komodakis 2016) -> pooled features (64 * widen dims)."""

    def __init__(self, depth: int = 28, widen: int = 2, in_chans: int = 3) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (e.g. 28), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBasic(widths[group] if i == 0 else widths[group + 1], widths[group + 1], stride if i == 0 else 1))
        layers += [nn.BatchNorm2d(widths[3], momentum=0.001), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)


WRN_ARCH = re.compile(r"wrn(\d+)_(\d+)")


def _resnet18_cifar(in_chans: int, width: int) -> nn.Module:
    # Small-image ResNet-18 (the variant solo-learn uses for CIFAR): 3x3 stride-1 stem,
    # no max-pool, so 32 px inputs keep a 4x4 map before global pooling.
    import timm  # here, not at the top: 1.7 s of import that a Conv-4 run (every stage's driver) never uses

    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=0, in_chans=in_chans, channels=tuple(width * m for m in (1, 2, 4, 8))
    )
    # The stem stays 64 wide: timm's first stage expects 64 input channels (a projection
    # shortcut adapts it when `width` differs).
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_encoder(arch: str, in_chans: int, width: int = 64) -> nn.Module:
    """Build an encoder by name ('conv4', 'resnet18_cifar', 'wrn28_2' or 'timm:<model>')."""
    if arch == "conv4":
        return Conv4(in_chans=in_chans, width=width)
    if wrn := WRN_ARCH.fullmatch(arch):
        return WideResNet(int(wrn[1]), int(wrn[2]), in_chans)
    if arch == "resnet18_cifar":
        return _resnet18_cifar(in_chans, width)
    if arch.startswith("timm:"):
        import timm

        # pretrained=False: weights are never fetched at run time; load a checkpoint instead.
        return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=0, in_chans=in_chans)
    raise ValueError(f"unknown encoder arch {arch!r}; allowed: 'conv4', 'resnet18_cifar', 'wrn<depth>_<widen>', 'timm:<model name>'")


@torch.no_grad()
def feature_dim(encoder: nn.Module, in_chans: int, image_size: int) -> int:
    """Output width for this input size (Conv-4's depends on it), measured with a dummy batch."""
    was_training = encoder.training
    encoder.eval()
    dim = encoder(torch.zeros(1, in_chans, image_size, image_size)).shape[1]
    encoder.train(was_training)
    return int(dim)
