"""Few-shot evaluation on cached embeddings: feature normalisation, batched episodes, 95% CI."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lowlabel.fewshot.heads import FewShotClassifier, build_head
from lowlabel.fewshot.sampler import Episode

__all__ = [
    "FewShotResult",
    "NormalizeMode",
    "confidence_interval95",
    "evaluate_episodes",
    "normalize_features",
]

log = logging.getLogger(__name__)

NormalizeMode = Literal["none", "l2", "center", "center_l2"]
_MODES = ("none", "l2", "center", "center_l2")


def _as_float_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    # Halves/ints are upcast: distances and fine-tuning need float32 precision (and CPU
    # kernels for half are slow or missing).
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def normalize_features(
    features: np.ndarray | torch.Tensor,
    mode: NormalizeMode,
    reference: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise (N, D) embeddings before few-shot evaluation.

    ``"l2"``: unit rows. ``"center"``: subtract the mean of ``reference`` (default: the
    features themselves; pass base/train-split features to avoid using the test pool's
    statistics). ``"center_l2"``: center then l2, the common "CL2N". ``"none"``: as is.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; allowed: {', '.join(_MODES)}")
    x = _as_float_tensor(features)
    if x.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if mode == "none":
        return x
    if mode in ("center", "center_l2"):
        ref = x if reference is None else _as_float_tensor(reference).to(x.device, x.dtype)
        if ref.dim() != 2 or ref.shape[1] != x.shape[1]:
            raise ValueError(
                f"reference must be (M, {x.shape[1]}), got shape {tuple(ref.shape)}"
            )
        x = x - ref.mean(0, keepdim=True)
    if mode in ("l2", "center_l2"):
        x = F.normalize(x, dim=-1)
    return x


def confidence_interval95(accuracies: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% CI of the mean: 1.96 * std(ddof=1) / sqrt(n).

    ddof=1 (sample std; some reference code uses ddof=0, which differs by sqrt(n/(n-1)),
    negligible at 600+ episodes). One episode gives no spread estimate, so the result is NaN
    rather than a misleading 0.
    """
    acc = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("need at least one episode accuracy")
    if acc.size == 1:
        return math.nan
    return float(1.96 * acc.std(ddof=1) / math.sqrt(acc.size))


@dataclass(frozen=True, eq=False)  # eq=False: per_episode is an ndarray
class FewShotResult:
    head: str
    n_way: int
    k_shot: int
    n_query: int
    episodes: int
    accuracy: float  # mean episode accuracy in [0, 1]
    ci95: float  # confidence_interval95(per_episode), same units as accuracy
    per_episode: np.ndarray  # (episodes,) accuracies in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        """Scalar summary for logging/metrics; acc and ci95 in percent."""
        return {
            "head": self.head,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "n_query": self.n_query,
            "episodes": self.episodes,
            "acc": 100.0 * self.accuracy,
            "ci95": 100.0 * self.ci95,
        }


def _episode_shape(episodes: list[Episode]) -> tuple[int, int, int]:
    if not episodes:
        raise ValueError("need at least one episode")
    shapes = {(e.n_way, e.k_shot, e.n_query) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"episodes must share one (n_way, k_shot, n_query); got {sorted(shapes)}")
    return shapes.pop()


def evaluate_episodes(
    features: torch.Tensor,
    labels: np.ndarray,
    episodes: list[Episode],
    head_name: str,
    head_kwargs: dict[str, Any] | None = None,
    batch_size: int = 100,
    classifier: FewShotClassifier | None = None,
) -> FewShotResult:
    """Run every episode with one head on cached (N, D) features; accuracy and 95% CI.

    Episodes are stacked ``batch_size`` at a time into (E,S,D)/(E,Q,D) and solved by the
    head's batched path on the features' device. ``labels`` are the original labels of the
    feature rows; they are checked against each episode's ``classes``, so an episode list
    sampled from a different label array is caught instead of scored.

    ``classifier``: a head built by the caller (the finetune head needs the encoder, so it is
    not in ``HEADS``), reported as ``head_name``; its inputs may be (N, ...) rows such as the
    last block's cached inputs. ``head_kwargs`` must then be None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if classifier is not None and head_kwargs:
        raise ValueError("pass head_kwargs or a built classifier, not both")
    n_way, k_shot, n_query = _episode_shape(episodes)
    feats = _as_float_tensor(features)
    labels = np.asarray(labels)
    rows_ok = feats.dim() == 2 or (classifier is not None and feats.dim() > 2)
    if not rows_ok or labels.shape != (feats.shape[0],):
        raise ValueError(
            f"features must be (N, D) and labels (N,); got {tuple(feats.shape)}, {labels.shape}"
        )

    support_idx = np.stack([e.support for e in episodes])  # (E_all, S)
    query_idx = np.stack([e.query for e in episodes])  # (E_all, Q)
    classes = np.stack([e.classes for e in episodes])  # (E_all, N)
    support_y = episodes[0].support_labels()
    query_y = episodes[0].query_labels()
    # Class-major layout means the true original labels are classes[:, episode_label].
    if not (
        np.array_equal(labels[support_idx], classes[:, support_y])
        and np.array_equal(labels[query_idx], classes[:, query_y])
    ):
        raise ValueError(
            "episode indices do not match `labels`; were they sampled from other labels?"
        )

    head = classifier if classifier is not None else build_head(head_name, **(head_kwargs or {}))
    device = feats.device
    support_y_t = torch.as_tensor(support_y, device=device)
    query_y_t = torch.as_tensor(query_y, device=device)
    chunks: list[torch.Tensor] = []
    with torch.no_grad():  # fine-tune heads re-enable grad for their own training only
        for start in range(0, len(episodes), batch_size):
            sup = torch.as_tensor(support_idx[start : start + batch_size], device=device)
            qry = torch.as_tensor(query_idx[start : start + batch_size], device=device)
            e = sup.shape[0]
            preds = head.fit_predict_batched(
                feats[sup], support_y_t.expand(e, -1), feats[qry], n_way
            )
            chunks.append((preds == query_y_t).to(torch.float64).mean(1))
    per_episode = torch.cat(chunks).cpu().numpy()

    result = FewShotResult(
        head=head_name,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        episodes=len(episodes),
        accuracy=float(per_episode.mean()),
        ci95=confidence_interval95(per_episode),
        per_episode=per_episode,
    )
    log.info(
        "few-shot %s %d-way %d-shot (%d queries/way, %d episodes): %.2f%% +- %.2f%%",
        head_name, n_way, k_shot, n_query, len(episodes), 100 * result.accuracy, 100 * result.ci95,
    )
    return result
