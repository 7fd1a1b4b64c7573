"""Index samplers for step-based training, reproducible per (seed, chunk, rank)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class ShardedCycleSampler(Sampler[int]):
    """``num_samples`` indices of this rank's shard, reshuffled each pass (DistributedSampler semantics).

    Each pass permutes all ``size`` indices with the same seed on every rank and gives rank r
    every world-th one, so workers see disjoint samples; passes repeat until ``num_samples``.
    """

    def __init__(self, size: int, num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> None:
        if size < world_size:
            raise ValueError(f"{size} samples cannot be sharded over {world_size} workers")
        self.size, self.num_samples = size, num_samples
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch

    def __iter__(self) -> Iterator[int]:
        out: list[int] = []
        sweep = 0
        while len(out) < self.num_samples:
            perm = _rng(self.seed, self.epoch, sweep).permutation(self.size)
            out.extend(perm[self.rank :: self.world_size][: self.size // self.world_size].tolist())
            sweep += 1
        return iter(out[: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class BalancedSampler(Sampler[int]):
    """Class-balanced draws with replacement: each class equally likely, then a uniform member.

    With a handful of labels per class the labeled set is often smaller than a batch; drawing
    with replacement keeps batches full and every class equally represented on average.
    """

    def __init__(self, targets: np.ndarray, num_samples: int, seed: int, epoch: int, rank: int) -> None:
        self.targets = np.asarray(targets)
        self.classes = np.unique(self.targets)
        self.members = [np.flatnonzero(self.targets == c) for c in self.classes]
        self.num_samples, self.key = num_samples, (seed, epoch, rank, 1)

    def __iter__(self) -> Iterator[int]:
        rng = _rng(*self.key)
        picks = rng.integers(0, len(self.classes), self.num_samples)
        return iter(int(self.members[c][rng.integers(0, len(self.members[c]))]) for c in picks)

    def __len__(self) -> int:
        return self.num_samples
