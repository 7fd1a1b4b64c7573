"""SimCLR (Chen et al. 2020): NT-Xent between two views' projections."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.distributed import gathers
from lowlabel.methods.ssl.base import SSLMethod
from lowlabel.methods.ssl.losses import nt_xent_loss
from lowlabel.models.heads import projection_mlp


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        temperature: float = 0.2,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(encoder, feat_dim)
        if temperature <= 0:
            raise ValueError(f"pretrain.simclr.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_dim)
        self.gather_distributed = gather_distributed

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.project_pair(views, self.projector)
        return {"loss": nt_xent_loss(z1, z2, self.temperature, gather=gathers(self.gather_distributed))}
