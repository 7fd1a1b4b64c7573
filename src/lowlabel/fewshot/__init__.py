"""Few-shot evaluation of frozen encoders: episode sampling, heads, batched evaluation, and the
optional head that fine-tunes the encoder's last block.

The evaluation protocol built on them (settings, the novel pool's embeddings, base accuracies)
is :mod:`lowlabel.fewshot.protocol`, not imported here: it needs the data and model code,
which :mod:`lowlabel.meta` (importing the sampler from this package) must stay free of."""

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
    MatchingNet,
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
    "MatchingNet",
    "NormalizeMode",
    "ProtoNet",
    "build_head",
    "confidence_interval95",
    "evaluate_episodes",
    "normalize_features",
    "sample_episodes",
    "split_last_block",
]
