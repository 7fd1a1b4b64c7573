"""Few-shot evaluation of frozen encoders: episode sampling, heads, batched evaluation, and the
optional head that fine-tunes the encoder's last block."""

from lowlabel.fewshot.evaluate import (
    FewShotResult,
    NormalizeMode,
    confidence_interval95,
    evaluate_episodes,
    normalize_features,
)
from lowlabel.fewshot.finetune import (
    EncoderSplitError,
    FineTuneLastBlock,
    LastBlockSplit,
    split_last_block,
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
    "EncoderSplitError",
    "Episode",
    "EpisodeError",
    "FewShotClassifier",
    "FewShotResult",
    "FineTuneLastBlock",
    "LastBlockSplit",
    "LinearProbe",
    "NormalizeMode",
    "ProtoNet",
    "build_head",
    "confidence_interval95",
    "evaluate_episodes",
    "normalize_features",
    "sample_episodes",
    "split_last_block",
]
