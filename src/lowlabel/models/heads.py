"""Heads that sit on an encoder: the SSL projection MLP and the classifier."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection g(.): Linear -> BN -> ReLU -> Linear (Chen et al. 2020, appendix B.9)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )



def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> nn.Sequential:
    """``num_layers`` Linear layers with BN + ReLU between them: BYOL's projector and predictor
    (2), Barlow Twins' projector and VICReg's expander (3)."""
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, got {num_layers}")
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)

class Classifier(nn.Module):
    """Encoder + linear layer; ``encoder`` stays addressable so it can be exported alone."""

    def __init__(self, encoder: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, images):
        return self.fc(self.encoder(images))

    @staticmethod
    def encoder_state(state_dict: dict) -> dict:
        """The encoder's entries of a Classifier state dict, keyed as the bare encoder's."""
        return {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}


@torch.no_grad()
def fit_linear_head(fc: nn.Linear, features: torch.Tensor, labels: np.ndarray, l2: float = 1.0) -> None:
    """Set ``fc`` to a logistic regression on frozen features (the "LP" of LP-FT, Kumar et al. 2022).

    Fitted on standardised features (L2-regularised, strength ``1/l2`` as sklearn's C; lbfgs,
    so deterministic), then folded back to raw features: ``W' = W / sigma``,
    ``b' = b - W' mu``. Every class must have a label (the splits guarantee it).
    """
    # Imported here: 1.2 s that only head_init: linear_probe needs.
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    classes = np.arange(fc.out_features)
    if set(np.unique(labels).tolist()) != set(classes.tolist()):
        raise ValueError(f"fit_linear_head needs labels of all {fc.out_features} classes, got {sorted(set(np.unique(labels).tolist()))}")
    probe = LogisticRegression(C=1.0 / l2, max_iter=1000).fit((x - mu) / sigma, labels)
    weight = probe.coef_ / sigma
    fc.weight.copy_(torch.from_numpy(weight))
    fc.bias.copy_(torch.from_numpy(probe.intercept_ - weight @ mu))
