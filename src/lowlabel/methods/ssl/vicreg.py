"""VICReg (Bardes et al. 2022): invariance between views, variance kept up, covariance decorrelated."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.distributed import gathers
from lowlabel.methods.ssl.base import SSLMethod
from lowlabel.methods.ssl.losses import vicreg_loss
from lowlabel.models.heads import mlp


class VICReg(SSLMethod):
    name = "vicreg"

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        proj_hidden_dim: int = 512,
        proj_dim: int = 512,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(encoder, feat_dim)
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, num_layers=3)
        self.weights = (sim_weight, var_weight, cov_weight)
        self.gather_distributed = gather_distributed

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = self.project_pair(views, self.projector)
        # Variance and covariance are statistics of the global batch: gathered when distributed.
        loss, terms = vicreg_loss(z1, z2, *self.weights, gather=gathers(self.gather_distributed))
        return {"loss": loss, **terms}
