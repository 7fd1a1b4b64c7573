"""The common shape of metric-based episodic learners (in the style of easyfsl's ``FewShotClassifier``).

A learner embeds the support and query images of one episode with its ``encoder`` and scores
every query against the support set with a method-specific head
(:meth:`EpisodicLearner.episode_logits`); its loss is a function of those scores and the query
labels. Both are pure functions of tensors, so a training loop only needs ``learner(batch)``
and ``learner.loss_from_scores`` (the forward goes through DDP when the learner is wrapped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.meta.episodes import EpisodicBatch

__all__ = ["EpisodicLearner"]


class EpisodicLearner(nn.Module, ABC):
    """Encoder + episode head. ``forward(batch)`` returns (n_query_total, ways) scores."""

    def __init__(self, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()

    @abstractmethod
    def episode_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Scores (Q, n_way) of every query against the support set, from features."""

    def loss_from_scores(self, scores: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
        """Training loss from :meth:`episode_logits`' scores; cross-entropy unless overridden."""
        return F.cross_entropy(scores, query_labels)

    def embed(self, batch: EpisodicBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query features from one encoder pass over both (as Snell et al.'s code:
        with BatchNorm the statistics are the episode's)."""
        n_support = batch.support_x.shape[0]
        features = self.encoder(torch.cat([batch.support_x, batch.query_x]))
        return features[:n_support], features[n_support:]

    def forward(self, batch: EpisodicBatch) -> torch.Tensor:
        support, query = self.embed(batch)
        return self.episode_logits(support, batch.support_y, query, batch.ways)

    def loss(self, batch: EpisodicBatch) -> torch.Tensor:
        return self.loss_from_scores(self(batch), batch.query_y)
