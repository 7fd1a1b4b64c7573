"""N-way K-shot episode sampling over a labelled pool (indices only, no features)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["Episode", "EpisodeError", "sample_episodes"]

# Cap on how many offending classes an error message lists, so a 1000-class pool stays readable.
_MAX_LISTED = 20


class EpisodeError(ValueError):
    """The label pool cannot supply the requested episodes."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class Episode:
    """One episode as indices into the feature/label arrays.

    ``support`` and ``query`` are class-major: way 0's samples first, then way 1's, ...
    Episode label ``i`` means ``classes[i]``.
    """

    support: np.ndarray  # (n_way * k_shot,) int64
    query: np.ndarray  # (n_way * n_query,) int64
    classes: np.ndarray  # (n_way,) original label of each way

    def __post_init__(self) -> None:
        support = np.array(self.support, dtype=np.int64).reshape(-1)
        query = np.array(self.query, dtype=np.int64).reshape(-1)
        classes = np.array(self.classes).reshape(-1)
        n_way = classes.shape[0]
        if n_way == 0 or support.size % n_way or query.size % n_way:
            raise EpisodeError(
                f"support ({support.size}) and query ({query.size}) sizes must be non-zero "
                f"multiples of n_way ({n_way})"
            )
        # Arrays stay writable: torch warns on every read-only array used as an index
        # (features[episode.support]), the main way episodes are consumed.
        object.__setattr__(self, "support", support)
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "classes", classes)

    @property
    def n_way(self) -> int:
        return int(self.classes.shape[0])

    @property
    def k_shot(self) -> int:
        return int(self.support.shape[0] // self.n_way)

    @property
    def n_query(self) -> int:
        return int(self.query.shape[0] // self.n_way)

    def support_labels(self) -> np.ndarray:
        """Episode labels (0..n_way-1) of ``support``."""
        return np.repeat(np.arange(self.n_way, dtype=np.int64), self.k_shot)

    def query_labels(self) -> np.ndarray:
        """Episode labels (0..n_way-1) of ``query``."""
        return np.repeat(np.arange(self.n_way, dtype=np.int64), self.n_query)


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an Integral but passing True as a shot count is surely a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EpisodeError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise EpisodeError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _describe(classes: np.ndarray, counts: np.ndarray) -> str:
    items = [f"{c!r}: {n}" for c, n in zip(classes.tolist(), counts.tolist())]
    if len(items) > _MAX_LISTED:
        items = items[:_MAX_LISTED] + [f"... and {len(items) - _MAX_LISTED} more"]
    return "{" + ", ".join(items) + "}"


def sample_episodes(
    labels: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int,
) -> list[Episode]:
    """Sample ``n_episodes`` N-way K-shot episodes with ``n_query`` queries per way.

    Each episode draws ``n_way`` distinct classes and, per class, ``k_shot + n_query``
    distinct samples (so support and query are disjoint). Deterministic by ``seed``
    (PCG64); classes are taken in sorted order so the result never depends on dict/set
    iteration order.

    Strict by design: if any class has fewer than ``k_shot + n_query`` samples this raises
    instead of silently dropping the class, since a benchmark over a silently shrunken
    class set is misleading.
    """
    n_way = _check_int("n_way", n_way, 1)
    k_shot = _check_int("k_shot", k_shot, 1)
    n_query = _check_int("n_query", n_query, 1)
    n_episodes = _check_int("n_episodes", n_episodes, 1)
    seed = _check_int("seed", seed, 0)  # PCG64 rejects negative seeds

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise EpisodeError(f"labels must be 1-D, got shape {labels.shape}")
    setting = f"n_way={n_way}, k_shot={k_shot}, n_query={n_query}"
    need = k_shot + n_query

    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if classes.size < n_way:
        raise EpisodeError(
            f"{setting} needs at least {n_way} classes, but labels have only {classes.size}: "
            f"{_describe(classes, counts)} (class: count)"
        )
    short = counts < need
    if short.any():
        raise EpisodeError(
            f"{setting} needs k_shot + n_query = {need} samples in every class; "
            f"{int(short.sum())} class(es) fall short (class: count): "
            f"{_describe(classes[short], counts[short])}"
        )

    # Per-class index arrays, computed once: a stable sort groups indices by class in
    # ascending index order, and the cumulative counts give each class's slice.
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    per_class = np.split(order, np.cumsum(counts)[:-1])

    rng = np.random.Generator(np.random.PCG64(seed))
    episodes: list[Episode] = []
    for _ in range(n_episodes):
        ways = rng.choice(classes.size, size=n_way, replace=False)
        picked = np.stack(
            [per_class[c][rng.choice(counts[c], size=need, replace=False)] for c in ways]
        )  # (n_way, k_shot + n_query), row-per-way keeps everything class-major
        episodes.append(
            Episode(
                support=picked[:, :k_shot].reshape(-1),
                query=picked[:, k_shot:].reshape(-1),
                classes=classes[ways],
            )
        )
    return episodes
