"""The common shape of metric-based episodic learners (in the style of easyfsl's ``FewShotClassifier``).

A learner embeds the support and query images of one episode with its ``encoder`` and scores
every query against the support set with a method-specific head
(:meth:`EpisodicLearner.episode_logits`); its loss is a function of those scores and the query
labels. Both are pure functions of tensors, so a training loop only needs ``learner(batch)``
and ``learner.loss_from_scores`` (the forward goes through DDP when the learner is wrapped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.distributed import average_gradients
from lowlabel.meta.episodes import EpisodicBatch

__all__ = ["EpisodicLearner", "MetaMethod", "MetricMetaMethod", "episode_accuracies", "preserved_buffers"]


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


class MetaMethod(nn.Module, ABC):
    """What the meta-training loop trains, one class per method (registry: lowlabel.meta.registry).

    ``encoder`` is the part handed to the next stage; the rest (a head, a relation module,
    inner learning rates) is the method's and is stored beside it. Distributed training is
    explicit: :meth:`meta_gradients` leaves in every parameter's ``.grad`` the meta-gradient
    averaged over all workers' episodes (each worker passes as many), so every worker's
    optimizer takes the same step from the same weights — no DDP wrapper, whose gradient
    hooks an inner loop would fire (see lowlabel.meta.maml).
    """

    # True for methods that adapt a `ways`-output head on the support set at test time (MAML,
    # Reptile): scored in train mode (batch statistics, as in training), at the trained ways only.
    adapts: bool = False

    def __init__(self, encoder: nn.Module, ways: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.ways = ways  # the episodes' ways in training

    @abstractmethod
    def meta_gradients(self, episodes: list[EpisodicBatch]) -> torch.Tensor:
        """Fill ``.grad`` with the meta-gradient of these episodes (averaged over workers);
        returns this worker's mean training loss, detached."""

    @abstractmethod
    def scores(self, episode: EpisodicBatch) -> torch.Tensor:
        """Test time: (Q, ways) scores of the query images after whatever the method does with
        the support set (argmax = prediction)."""

    def outer_optimizer(self) -> dict[str, Any] | None:
        """Settings that replace ``meta.optim``'s for the outer update, or None (most methods)."""
        return None


@contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run a train-mode forward (MAML's transductive batch statistics) without leaving its
    BatchNorm running statistics changed: evaluation must not alter the trained state."""
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


class MetricMetaMethod(MetaMethod):
    """A metric learner (:class:`EpisodicLearner`) trained on the mean loss of its episodes."""

    def __init__(self, learner: EpisodicLearner, ways: int | None = None) -> None:
        super().__init__(learner.encoder, ways)
        self.learner = learner

    def meta_gradients(self, episodes: list[EpisodicBatch]) -> torch.Tensor:
        loss = torch.stack([self.learner.loss(e) for e in episodes]).mean()
        loss.backward()
        average_gradients(self.parameters())
        return loss.detach()

    @torch.no_grad()
    def scores(self, episode: EpisodicBatch) -> torch.Tensor:
        return self.learner(episode)


def episode_accuracies(method: MetaMethod, batches: Iterable[EpisodicBatch]) -> np.ndarray:
    """Query accuracy of each episode under the method's own test-time procedure
    (:meth:`MetaMethod.scores`): metric heads in eval mode (running statistics), methods that
    adapt in train mode (batch statistics, as in training; ``scores`` restores what adapting
    touched). The method's mode is restored afterwards."""
    was_training = method.training
    method.train(method.adapts)
    try:
        return np.array([(method.scores(b).argmax(1) == b.query_y).float().mean().item() for b in batches])
    finally:
        method.train(was_training)
