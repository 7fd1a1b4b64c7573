"""Few-shot evaluation of frozen encoders: episode sampling, heads, batched evaluation."""

from lowlabel.fewshot.evaluate import (
    FewShotResult,
    NormalizeMode,
    confidence_interval95,
    evaluate_episodes,
    normalize_features,
)
from lowlabel.fewshot.heads import (
    HEADS,
    KNN,
    CosineClassifier,
    FewShotClassifier,
    LinearProbe,
    ProtoNet,
    build_head,
)
from lowlabel.fewshot.sampler import Episode, EpisodeError, sample_episodes

__all__ = [
    "HEADS",
    "KNN",
    "CosineClassifier",
    "Episode",
    "EpisodeError",
    "FewShotClassifier",
    "FewShotResult",
    "LinearProbe",
    "NormalizeMode",
    "ProtoNet",
    "build_head",
    "confidence_interval95",
    "evaluate_episodes",
    "normalize_features",
    "sample_episodes",
]
