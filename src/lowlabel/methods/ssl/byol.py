"""BYOL (Grill et al. 2020): an online network predicts a momentum target's projection of the other view."""

from __future__ import annotations

import torch
from torch import nn

from lowlabel.methods.ssl.base import MomentumSSLMethod
from lowlabel.methods.ssl.losses import byol_loss
from lowlabel.models.heads import mlp


class BYOL(MomentumSSLMethod):
    name = "byol"

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        momentum: float = 0.99,
        momentum_final: float | None = 1.0,
    ) -> None:
        # The paper's schedule: tau from tau_base to 1 on a cosine over training (base's schedule).
        super().__init__(encoder, feat_dim, momentum, momentum_final)
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim)
        self.momentum_branch = self.init_momentum_branch(self.encoder, self.projector)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        encoder, projector = self.momentum_branch
        return projector(encoder(x))

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        both = torch.cat(views)
        p = self.predictor(self.projector(self.encoder(both)))
        z = self.targets(both)
        # Symmetric: view 1 predicts view 2's target and vice versa (the paper's L + L~).
        loss = byol_loss(p[:n], z[n:]) + byol_loss(p[n:], z[:n])
        return {"loss": loss}
