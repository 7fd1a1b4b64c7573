"""VICReg (Bardes et al. 2022): invariance between views, variance kept up, covariance decorrelated."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.distributed import world_size
from lowlabel.methods.base import SSLMethod
from lowlabel.methods.losses import vicreg_loss
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
        n = views[0].shape[0]
        z = self.projector(self.encoder(torch.cat(views)))
        # Variance and covariance are statistics of the global batch: gathered when distributed.
        gather = world_size() > 1 if self.gather_distributed is None else self.gather_distributed
        loss, terms = vicreg_loss(z[:n], z[n:], *self.weights, gather=gather)
        return {"loss": loss, **terms}
