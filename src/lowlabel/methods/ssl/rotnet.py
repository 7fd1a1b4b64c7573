"""RotNet (Gidaris et al. 2018): predict which of 0, 90, 180, 270 degrees an image was rotated by.

Each image of the batch is shown in all four rotations (the paper's finding: all four in one
batch trains best), and a small head on the encoder's features classifies the rotation. Images
are square here, so a rotation keeps the shape.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.ssl.base import SSLMethod
from lowlabel.models.heads import mlp

ROTATIONS = 4


def rotated_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch rotated by k x 90 degrees counter-clockwise for k = 0..3, stacked k-major; labels k)."""
    images = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
    return images, labels


class RotNet(SSLMethod):
    name = "rotnet"
    num_views: ClassVar[int] = 1

    def __init__(self, encoder: nn.Module, feat_dim: int, hidden_dim: int = 256) -> None:
        super().__init__(encoder, feat_dim)
        self.head = mlp(feat_dim, hidden_dim, ROTATIONS)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = rotated_batch(views[0])
        logits = self.head(self.encoder(images))
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "rotation_acc": (logits.detach().argmax(1) == labels).float().mean()}
