"""Relation Networks (Sung et al. 2018, "Learning to Compare: Relation Network for Few-Shot Learning").

The support embeddings of each class are pooled into one class feature map (the paper sums
them, "element-wise sum over the embedding module outputs of all samples from each training
class"; ``reduce="mean"`` gives the prototype instead), each (class, query) pair is
concatenated along the channel axis, ``C(f(x_i), f(x_j))`` with the class first as in the
paper, and a learned *relation module* ``g`` maps the pair to a relation score in (0, 1)
(sigmoid). Training regresses the scores onto the one-hot match, ``sum (r_ij - 1[y_i == y_j])^2``
(MSE, averaged here over the Q x N scores).

The encoder must keep spatial maps (e.g. ``Conv4`` without its final ``Flatten``):
:class:`RelationModule` is the paper's 2 x [conv3x3 -> BN -> ReLU -> maxpool] -> FC(8) ->
ReLU -> FC(1); its convolutions are padded and the pools use ``ceil_mode`` so it also runs on
the small (5x5 at 84 px) maps of this repository's 4-pool Conv4 (the paper's encoder keeps
19x19 maps by not pooling in its last two blocks), and an adaptive average pool makes the FC
input size independent of the map size. Flat features (B, D) work too with any module mapping
(P, 2D) -> (P, 1), e.g. :class:`RelationMLP`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.meta.base import EpisodicLearner, MetricMetaMethod

__all__ = ["RelationMLP", "RelationModule", "RelationNetLearner", "relation_loss", "relation_scores"]


def _class_maps(support: torch.Tensor, support_labels: torch.Tensor, n_way: int, reduce: str) -> torch.Tensor:
    onehot = F.one_hot(support_labels.long(), n_way).to(support.dtype)  # (S, N)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError("every way needs at least one support sample")
    weights = onehot / counts if reduce == "mean" else onehot
    return (weights.T @ support.reshape(support.shape[0], -1)).reshape(n_way, *support.shape[1:])


def relation_scores(
    relation: nn.Module,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    n_way: int,
    reduce: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Relation scores (Q, n_way) in (0, 1): ``sigmoid(relation(cat([class_k, query_q], dim=1)))``.

    ``relation`` maps the (Q * n_way) concatenated pairs, ordered query-major (pair ``q * n_way
    + k`` is query q with class k), to one raw score each; the sigmoid is applied here.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    classes = _class_maps(support, support_labels, n_way, reduce)  # (N, ...)
    n_query = query.shape[0]
    pairs = torch.cat(
        [
            classes[None].expand(n_query, *classes.shape).reshape(n_query * n_way, *classes.shape[1:]),
            query[:, None].expand(n_query, n_way, *query.shape[1:]).reshape(n_query * n_way, *query.shape[1:]),
        ],
        dim=1,
    )
    return torch.sigmoid(relation(pairs).reshape(n_query, n_way))


def relation_loss(scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the relation scores (Q, N) and the one-hot query labels."""
    return F.mse_loss(scores, F.one_hot(query_labels.long(), scores.shape[1]).to(scores.dtype))


class RelationModule(nn.Sequential):
    """Sung et al.'s relation module on (P, 2C, H, W) concatenated maps -> (P, 1) raw scores."""

    def __init__(self, in_channels: int, hidden: int = 64, fc_hidden: int = 8) -> None:
        super().__init__(
            nn.Conv2d(2 * in_channels, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(fc_hidden, 1),
        )


class RelationMLP(nn.Sequential):
    """Relation module for flat features: (P, 2D) -> FC(hidden) -> ReLU -> FC(1)."""

    def __init__(self, feature_dim: int, hidden: int = 8) -> None:
        super().__init__(nn.Linear(2 * feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))


class RelationNetLearner(EpisodicLearner):
    """Encoder + relation module; scores are sigmoid relations, the loss is MSE to the one-hot."""

    def __init__(self, encoder: nn.Module | None, relation: nn.Module, reduce: Literal["sum", "mean"] = "sum") -> None:
        super().__init__(encoder)
        self.relation = relation
        self.reduce = reduce

    def episode_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        return relation_scores(self.relation, support, support_labels, query, n_way, self.reduce)

    def loss_from_scores(self, scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        return relation_loss(scores, query_labels)


class RelationNet(MetricMetaMethod):
    """``meta@relationnet``: the encoder and a relation MLP on its feature vectors, trained
    together (the relation module is the method's test-time head, stored with the encoder)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, ways: int, hidden: int = 8, reduce: Literal["sum", "mean"] = "sum") -> None:
        super().__init__(RelationNetLearner(encoder, RelationMLP(feature_dim, hidden), reduce), ways)
