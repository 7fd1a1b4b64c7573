"""Barlow Twins (Zbontar et al. 2021): the two views' cross-correlation matrix pushed to the identity."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.distributed import gathers
from lowlabel.methods.ssl.base import SSLMethod
from lowlabel.methods.ssl.losses import barlow_twins_loss
from lowlabel.models.heads import mlp


class BarlowTwins(SSLMethod):
    name = "barlowtwins"

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        proj_hidden_dim: int = 512,
        proj_dim: int = 512,
        lambda_offdiag: float = 0.0051,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(encoder, feat_dim)
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, num_layers=3)
        self.lambda_offdiag = lambda_offdiag
        self.gather_distributed = gather_distributed

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.project_pair(views, self.projector)
        # The cross-correlation is a statistic of the global batch: gathered when distributed.
        return {"loss": barlow_twins_loss(z1, z2, self.lambda_offdiag, gather=gathers(self.gather_distributed))}
