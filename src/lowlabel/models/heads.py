"""Heads that sit on an encoder: the SSL projection MLP and the classifier."""

from __future__ import annotations

from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection g(.): Linear -> BN -> ReLU -> Linear (Chen et al. 2020, appendix B.9)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


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
