"""Episodic batches and the per-rank episode sampler for meta-training.

Meta-learning trains on *episodes* (Vinyals et al. 2016, "Matching Networks for One Shot
Learning"): an N-way K-shot task with a labelled support set (K images of each of N classes)
and a disjoint query set (Q images of each class) on which the loss is taken. The indices are
drawn by :func:`lowlabel.fewshot.sample_episodes` (the evaluation sampler), so training and
evaluation episodes are built by the same code; this module adds what training needs on
top of it: a seed stream keyed by ``(seed, rank, step, index)`` so every worker of a
distributed run draws its own episodes reproducibly, and the tensors of one episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lowlabel.fewshot.sampler import Episode, EpisodeError, sample_episodes

__all__ = ["EpisodeSampler", "EpisodicBatch", "episode_seed", "load_episode"]


@dataclass(frozen=True)
class EpisodicBatch:
    """The tensors of one N-way K-shot episode, class-major (way 0's samples first).

    ``support_y``/``query_y`` are *episode* labels in ``0..ways-1`` (the original class of way
    ``i`` is ``classes[i]``), so any N-way head or model can consume every episode.
    """

    support_x: torch.Tensor  # (ways * shots, ...)
    support_y: torch.Tensor  # (ways * shots,) int64
    query_x: torch.Tensor  # (ways * queries, ...)
    query_y: torch.Tensor  # (ways * queries,) int64
    ways: int
    shots: int
    classes: np.ndarray | None = None  # (ways,) original label of each way

    def __post_init__(self) -> None:
        if self.support_x.shape[0] != self.support_y.shape[0] or self.query_x.shape[0] != self.query_y.shape[0]:
            raise ValueError(
                f"images and labels disagree: support {tuple(self.support_x.shape)} / {tuple(self.support_y.shape)}, "
                f"query {tuple(self.query_x.shape)} / {tuple(self.query_y.shape)}"
            )
        if self.support_x.shape[0] != self.ways * self.shots:
            raise ValueError(f"support holds {self.support_x.shape[0]} samples, expected ways*shots = {self.ways * self.shots}")

    @property
    def queries(self) -> int:
        return int(self.query_x.shape[0] // self.ways)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EpisodicBatch:
        """The episode on ``device`` (images also cast to ``dtype`` when given; labels stay int64)."""
        return EpisodicBatch(
            self.support_x.to(device=device, dtype=dtype),
            self.support_y.to(device),
            self.query_x.to(device=device, dtype=dtype),
            self.query_y.to(device),
            self.ways,
            self.shots,
            self.classes,
        )


def load_episode(episode: Episode, images: torch.Tensor | Callable[[np.ndarray], torch.Tensor]) -> EpisodicBatch:
    """The tensors of ``episode``, whose indices address ``images`` (a tensor indexed along dim 0,
    or a function of an index array, e.g. a dataset's loader applying augmentation)."""
    fetch = images.__getitem__ if isinstance(images, torch.Tensor) else images
    support_idx = torch.as_tensor(episode.support) if isinstance(images, torch.Tensor) else episode.support
    query_idx = torch.as_tensor(episode.query) if isinstance(images, torch.Tensor) else episode.query
    return EpisodicBatch(
        support_x=fetch(support_idx),
        support_y=torch.as_tensor(episode.support_labels()),
        query_x=fetch(query_idx),
        query_y=torch.as_tensor(episode.query_labels()),
        ways=episode.n_way,
        shots=episode.k_shot,
        classes=episode.classes,
    )


def episode_seed(seed: int, rank: int, step: int, index: int = 0) -> int:
    """A 63-bit seed for episode ``index`` of training step ``step`` on worker ``rank``.

    ``numpy.random.SeedSequence`` hashes the whole key, so nearby keys give unrelated streams
    (no ``seed + rank`` collisions between, e.g., (seed=1, rank=0) and (seed=0, rank=1)).
    """
    for name, value in (("seed", seed), ("rank", rank), ("step", step), ("index", index)):
        if int(value) < 0:
            raise EpisodeError(f"{name} must be >= 0, got {value}")
    state = np.random.SeedSequence([int(seed), int(rank), int(step), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class EpisodeSampler:
    """N-way K-shot Q-query episodes over ``labels[indices]``, deterministic by ``(seed, rank, step)``.

    ``labels`` are the labels of a whole dataset and ``indices`` the samples episodes may use
    (e.g. the base classes' training split); the returned :class:`Episode` holds dataset
    indices (elements of ``indices``), ready for :func:`load_episode`. Support and query of
    one episode are disjoint (``lowlabel.fewshot.sample_episodes`` draws ``k_shot + n_query``
    distinct samples per class). Episodes of different ranks, steps or meta-batch slots come
    from unrelated seeds, so two workers never train on the same random stream; the same key
    always gives the same episode, whatever else was drawn before (resumable mid-run).
    """

    def __init__(
        self,
        labels: np.ndarray,
        indices: np.ndarray | None,
        n_way: int,
        k_shot: int,
        n_query: int,
        seed: int,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise EpisodeError(f"labels must be 1-D, got shape {labels.shape}")
        self.indices = np.arange(labels.shape[0], dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= labels.shape[0]):
            raise EpisodeError(f"indices must lie in [0, {labels.shape[0]}), got [{self.indices.min()}, {self.indices.max()}]")
        self.pool_labels = labels[self.indices]
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.seed, self.rank = seed, rank
        self.sample(0)  # fail now, not at step 0 of a job, if the pool cannot supply episodes

    def sample(self, step: int, index: int = 0) -> Episode:
        """Episode ``index`` of the meta-batch of ``step`` on this sampler's rank."""
        (local,) = sample_episodes(
            self.pool_labels, self.n_way, self.k_shot, self.n_query, 1, episode_seed(self.seed, self.rank, step, index)
        )
        return Episode(support=self.indices[local.support], query=self.indices[local.query], classes=local.classes)

    def meta_batch(self, step: int, size: int) -> list[Episode]:
        """The ``size`` episodes of ``step`` on this rank (one optimizer step of meta-training)."""
        return [self.sample(step, i) for i in range(size)]
