"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot Learning").

Each class is represented by the mean embedding of its support samples (its *prototype*
``c_k = 1/|S_k| sum_{x in S_k} f(x)``), and a query's logits are its negative squared
euclidean distances to the prototypes: ``p(y=k|x) = softmax_k(-||f(x) - c_k||^2)``. The
loss is the cross-entropy of those logits on the query set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowlabel.meta.base import EpisodicLearner, MetricMetaMethod

__all__ = ["ProtoNetLearner", "class_prototypes", "protonet_logits", "protonet_loss"]


def class_prototypes(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean support feature per class: (S, ...) -> (n_way, ...). Every way needs a sample."""
    onehot = F.one_hot(support_labels.long(), n_way).to(support.dtype)  # (S, N); raises on labels >= n_way
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError("every way needs at least one support sample")
    flat = support.reshape(support.shape[0], -1)
    return ((onehot.T @ flat) / counts[:, None]).reshape(n_way, *support.shape[1:])


def protonet_logits(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """``-||query - prototype_k||^2`` for every query and way: (Q, n_way).

    Computed as a difference (not the ``a^2 - 2ab + b^2`` expansion), which is exact for
    tests and has no cancellation; episodes are small.
    """
    prototypes = class_prototypes(support, support_labels, n_way).reshape(n_way, -1)
    diff = query.reshape(query.shape[0], 1, -1) - prototypes[None]
    return -diff.pow(2).sum(-1)


def protonet_loss(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Cross-entropy of :func:`protonet_logits` on the query labels."""
    return F.cross_entropy(protonet_logits(support, support_labels, query, n_way), query_labels)


class ProtoNetLearner(EpisodicLearner):
    """Encoder + prototypical head (cross-entropy on ``-squared distance`` logits)."""

    def episode_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        return protonet_logits(support, support_labels, query, n_way)


class ProtoNet(MetricMetaMethod):
    """``meta@protonet``: episodic training of the encoder under the prototypical head."""

    def __init__(self, encoder: torch.nn.Module, feature_dim: int, ways: int) -> None:
        super().__init__(ProtoNetLearner(encoder), ways)
