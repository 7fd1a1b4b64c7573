"""The few-shot evaluation protocol for frozen encoders, as the ``fewshot`` stage and the benches run it.

Per encoder: the novel-class pool embedded once (:func:`embed_novel_pool`), then every N-way
K-shot setting's episodes (:func:`plan_episodes`: sampled once, the same for every encoder) run
on that cache with each head (:func:`evaluate_head`); plus the base-class kNN and linear-probe
accuracies (:func:`base_accuracies`). :func:`evaluate_encoder` does all of it and returns the
numbers under the keys the stage writes (``base_knn_acc``, ``base_linear_acc``,
``<head>/<N>w<K>s``: ``{"acc", "ci95"}``).

Every setting comes from one :class:`FewShotProtocol`, built from ``params.yaml``'s
``fewshot`` section (and the seed and encoder arch) in :meth:`FewShotProtocol.from_params`.

Not exported from :mod:`lowlabel.fewshot`: this module needs the prepared data, the encoders
and the feature extractor, which the package's episode and head code (imported by
:mod:`lowlabel.meta`) must not pull in. Import it as ``lowlabel.fewshot.protocol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal, get_args

import numpy as np
import torch

from lowlabel.config import Params
from lowlabel.data.augment import eval_view
from lowlabel.data.prepared import PreparedData
from lowlabel.errors import UserError
from lowlabel.evaluation import extract_features, knn_accuracy, knn_split, linear_probe_accuracy
from lowlabel.fewshot.evaluate import FewShotResult, NormalizeMode, evaluate_episodes, normalize_features
from lowlabel.fewshot.finetune import FineTuneLastBlock, LastBlockSplit, split_last_block
from lowlabel.fewshot.heads import HEADS
from lowlabel.fewshot.sampler import Episode, EpisodeError, sample_episodes
from lowlabel.meta.base import MetaMethod, MetricMetaMethod, episode_accuracies
from lowlabel.models.encoders import build_encoder
from lowlabel.runner.worker import seed_everything

__all__ = [
    "FINETUNE",
    "HEAD_NAMES",
    "KNN_BANK_SIZE",
    "RANDOM",
    "Embedder",
    "FewShotProtocol",
    "FineTuneSettings",
    "NovelPool",
    "ProtocolError",
    "base_accuracies",
    "embed_novel_pool",
    "evaluate_encoder",
    "evaluate_head",
    "plan_episodes",
    "random_encoder",
    "setting_name",
]

# The head that needs the encoder's last block, not the embeddings (so it is not in HEADS).
FINETUNE = "finetune"
# Every head name the protocol runs: lowlabel.config.FEWSHOT_HEADS names the same (a test checks).
HEAD_NAMES: tuple[str, ...] = (*HEADS, FINETUNE)
# The name of the random-init encoder's row (:func:`random_encoder`) in reports.
RANDOM = "random"
# Final numbers: every base training image is in the kNN bank (the pretraining monitor uses a subset).
KNN_BANK_SIZE = None


class ProtocolError(UserError, ValueError):
    """A few-shot setting this novel pool cannot run; the message names the ``fewshot.*`` settings."""


@dataclass(frozen=True)
class FineTuneSettings:
    """The ``finetune`` head (``fewshot.finetune``): Adam steps, classifier lr, last-block lr, classifier decay."""

    steps: int
    lr: float
    block_lr: float
    weight_decay: float


@dataclass(frozen=True)
class FewShotProtocol:
    """How encoders are evaluated: settings, episodes, heads and their options, normalisation, seed.

    ``ways`` x ``shots`` are the settings (a way larger than the pool's class count is skipped);
    ``n_query`` queries per way and ``episodes`` episodes per setting, sampled from ``seed``.
    ``feature_norm`` normalises the cached embeddings; ``distance`` is ProtoNet's,
    ``matchingnet_temperature`` MatchingNet's; ``knn_k`` is the base-class kNN's k (the ``knn``
    head is 1-NN); ``encoder_arch`` says which last block the ``finetune`` head tunes.
    """

    ways: tuple[int, ...]
    shots: tuple[int, ...]
    n_query: int
    episodes: int
    heads: tuple[str, ...]
    feature_norm: NormalizeMode
    distance: Literal["euclidean", "cosine"]
    knn_k: int
    matchingnet_temperature: float
    finetune: FineTuneSettings
    seed: int
    encoder_arch: str

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [head for head in self.heads if head not in HEAD_NAMES]
        if unknown:
            raise ValueError(f"unknown few-shot heads {unknown}; allowed: {', '.join(HEAD_NAMES)}")
        if self.feature_norm not in get_args(NormalizeMode):
            raise ValueError(
                f"unknown feature_norm {self.feature_norm!r}; allowed: {', '.join(get_args(NormalizeMode))}"
            )

    @classmethod
    def from_params(cls, params: Params) -> FewShotProtocol:
        """The protocol ``params.yaml`` asks for: its ``fewshot`` section, ``seed`` and ``encoder.arch``."""
        cfg = params.fewshot
        return cls(
            ways=tuple(cfg.ways),
            shots=tuple(cfg.shots),
            n_query=cfg.queries,
            episodes=cfg.episodes,
            heads=tuple(cfg.heads),
            feature_norm=cfg.feature_norm,
            distance=cfg.distance,
            knn_k=cfg.knn_k,
            matchingnet_temperature=cfg.matchingnet.temperature,
            finetune=FineTuneSettings(**cfg.finetune.model_dump()),
            seed=params.seed,
            encoder_arch=params.encoder.arch,
        )

    def head_kwargs(self, head: str) -> dict[str, Any]:
        """The keyword arguments ``head`` is built with (``build_head``, or ``FineTuneLastBlock`` for finetune)."""
        if head == "protonet":
            return {"distance": self.distance}
        if head == "knn":
            return {"k": 1}
        if head == "matchingnet":
            return {"temperature": self.matchingnet_temperature}
        if head == FINETUNE:
            # The tuned block's output moves, so only the l2 part of feature_norm applies to it.
            return {
                **asdict(self.finetune),
                "l2_normalize": self.feature_norm in ("l2", "center_l2"),
                "seed": self.seed,
            }
        return {"seed": self.seed}


def random_encoder(arch: str, in_chans: int, width: int, seed: int) -> torch.nn.Module:
    """The encoder the training stages start from (built right after seeding with their seed), in eval mode."""
    seed_everything(seed)
    return build_encoder(arch, in_chans, width).eval()


def setting_name(n_way: int, k_shot: int) -> str:
    return f"{n_way}w{k_shot}s"


def plan_episodes(protocol: FewShotProtocol, labels: np.ndarray) -> dict[tuple[int, int], list[Episode]]:
    """Sample every (way, shot) setting once, shared by all encoders; skip impossible ways (printing a note)."""
    n_classes = len(np.unique(labels))
    plans = {}
    for n_way in protocol.ways:
        if n_way > n_classes:
            print(f"[fewshot] skipping {n_way}-way: only {n_classes} novel classes", flush=True)
            continue
        for k_shot in protocol.shots:
            try:
                plans[(n_way, k_shot)] = sample_episodes(
                    labels, n_way, k_shot, protocol.n_query, protocol.episodes, seed=protocol.seed
                )
            except EpisodeError as error:
                raise ProtocolError(
                    f"fewshot.shots={k_shot}, fewshot.queries={protocol.n_query}: {error}"
                ) from None
    if not plans:
        raise ProtocolError(
            f"fewshot.ways={list(protocol.ways)}: no setting fits the {n_classes} novel classes"
        )
    return plans


Embedder = Callable[[np.ndarray, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class NovelPool:
    """One encoder's view of the few-shot pool, computed once and shared by every head and episode.

    Rows are in :meth:`PreparedData.novel_pool_labels` order. ``embeddings`` are normalised by
    the protocol's ``feature_norm``; ``block_inputs`` (the frozen trunk's output, the finetune
    head's cache) and ``split`` exist only when that head is asked for.
    """

    embeddings: torch.Tensor
    block_inputs: torch.Tensor | None = None
    split: LastBlockSplit | None = None


def _on_device(encoder: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return encoder.to(device, memory_format=torch.channels_last), device


def _embedder(encoder: torch.nn.Module, data: PreparedData, device: str) -> Embedder:
    return partial(
        extract_features, encoder, view=eval_view(data.mean, data.std), device=device, channels_last=True
    )


def _embed_pool(embed: Embedder, data: PreparedData) -> torch.Tensor:
    novel = embed(data.test_images, data.split.test_novel)
    if data.split.train_novel:  # data.novel_pool: all
        novel = torch.cat([novel, embed(data.train_images, data.split.train_novel)])
    return novel


def embed_novel_pool(
    protocol: FewShotProtocol,
    encoder: torch.nn.Module,
    data: PreparedData,
    heads: Sequence[str] | None = None,
) -> NovelPool:
    """Embed the novel pool once for ``heads`` (default: the protocol's); also the last block's inputs if finetune is among them."""
    encoder, device = _on_device(encoder)
    embeddings = normalize_features(
        _embed_pool(_embedder(encoder, data, device), data), protocol.feature_norm
    )
    if FINETUNE not in (protocol.heads if heads is None else heads):
        return NovelPool(embeddings)
    view = eval_view(data.mean, data.std)
    example = view.batch(data.test_images[np.asarray(data.split.test_novel[:4])]).contiguous()
    split = split_last_block(
        encoder, example.to(device).contiguous(memory_format=torch.channels_last), protocol.encoder_arch
    )
    # extract_features returns CPU tensors; the block is tuned where the encoder ran (GPU if any).
    block_inputs = _embed_pool(_embedder(split.trunk, data, device), data).to(device)
    return NovelPool(embeddings, block_inputs, split)


def base_accuracies(
    protocol: FewShotProtocol, encoder: torch.nn.Module, data: PreparedData
) -> dict[str, float]:
    """Frozen features on the base classes, every base training image labeled, base test images
    as queries: weighted kNN (``base_knn_acc``, k = ``knn_k``) and the linear probe
    (``base_linear_acc``, logistic regression, lowlabel.evaluation.linear_probe_accuracy), from
    one embedding pass."""
    encoder, device = _on_device(encoder)
    features = _embedder(encoder, data, device)
    bank_idx, test_idx = knn_split(data, KNN_BANK_SIZE, protocol.seed)
    bank, test = features(data.train_images, bank_idx), features(data.test_images, test_idx)
    bank_labels, test_labels = (
        torch.from_numpy(data.train_labels[bank_idx]),
        torch.from_numpy(data.test_labels[test_idx]),
    )
    return {
        "base_knn_acc": knn_accuracy(bank, bank_labels, test, test_labels, k=protocol.knn_k),
        "base_linear_acc": linear_probe_accuracy(bank, bank_labels, test, test_labels),
    }


def evaluate_head(
    protocol: FewShotProtocol, pool: NovelPool, novel_labels: np.ndarray, episodes: list[Episode], head: str
) -> FewShotResult:
    """One head on one setting's episodes, on the pool's cache (embeddings, or the last block's inputs for finetune)."""
    if head != FINETUNE:
        return evaluate_episodes(pool.embeddings, novel_labels, episodes, head, protocol.head_kwargs(head))
    if pool.split is None or pool.block_inputs is None:
        raise ProtocolError(
            "the finetune head needs the pool embedded with it: embed_novel_pool(..., heads=[..., 'finetune'])"
        )
    classifier = FineTuneLastBlock(pool.split, **protocol.head_kwargs(head))
    return evaluate_episodes(pool.block_inputs, novel_labels, episodes, head, classifier=classifier)


def evaluate_encoder(
    protocol: FewShotProtocol,
    encoder: torch.nn.Module,
    data: PreparedData,
    plans: dict[tuple[int, int], list[Episode]],
    novel_labels: np.ndarray,
) -> dict[str, Any]:
    """Base accuracies, then every head on every planned setting: ``{"base_knn_acc": .., "base_linear_acc": ..,
    "<head>/<N>w<K>s": {"acc": .., "ci95": ..}}`` (fractions in [0, 1])."""
    pool = embed_novel_pool(protocol, encoder, data)
    out: dict[str, Any] = base_accuracies(protocol, encoder, data)
    for (n_way, k_shot), episodes in plans.items():
        for head in protocol.heads:
            result = evaluate_head(protocol, pool, novel_labels, episodes, head)
            out[f"{head}/{setting_name(n_way, k_shot)}"] = {"acc": result.accuracy, "ci95": result.ci95}
    return out


# ---- meta-trained methods: their own test-time procedure ---------------------------------------


def meta_method_from_state(blob: dict[str, Any], encoder: torch.nn.Module, in_chans: int, image_size: int) -> MetaMethod:
    """The :class:`~lowlabel.meta.base.MetaMethod` a ``meta@<method>`` stage stored (its
    ``meta_head.pt``: method name, settings, trained ways, whole state) around ``encoder``."""
    from lowlabel.meta.registry import META_METHODS
    from lowlabel.models.encoders import feature_dim

    method = META_METHODS[blob["method"]](encoder, feature_dim(encoder, in_chans, image_size), blob["ways"], **blob["settings"])
    method.load_state_dict(blob["state"])
    return method


def novel_pool_images(data: PreparedData) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of the few-shot pool (:meth:`PreparedData.novel_pool_labels` order) -> their uint8 images."""
    sources = [(data.test_images, np.asarray(data.split.test_novel, dtype=np.int64))]
    if data.split.train_novel:
        sources.append((data.train_images, np.asarray(data.split.train_novel, dtype=np.int64)))
    starts = np.cumsum([0] + [len(rows) for _, rows in sources])

    def fetch(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *data.test_images.shape[1:]), dtype=np.uint8)
        for k, (images, indices) in enumerate(sources):
            mine = (rows >= starts[k]) & (rows < starts[k + 1])
            out[mine] = images[indices[rows[mine] - starts[k]]]
        return out

    return fetch


def evaluate_meta_method(method: MetaMethod, data: PreparedData, episodes: list[Episode]) -> FewShotResult:
    """The method's own test-time procedure (:meth:`MetaMethod.scores`: the support set through
    its head — prototypes, attention, relation module, or MAML/Reptile adaptation) on the novel
    episodes, from the images (normalised as in training). Scored in eval mode, except methods
    that adapt (``method.adapts``: batch statistics, as in training; the state is restored)."""
    from lowlabel.data import device_augment
    from lowlabel.fewshot.evaluate import confidence_interval95
    from lowlabel.meta.episodes import load_episode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = method.to(device)
    view = device_augment.eval_view(data.mean, data.std).to(device)
    load = device_augment.view_loader(novel_pool_images(data), view, device)
    if isinstance(method, MetricMetaMethod):
        accuracies = metric_episode_accuracies(method, load, episodes, device)
    else:
        accuracies = episode_accuracies(method, (load_episode(episode, load).to(device) for episode in episodes))
    n_way, k_shot = episodes[0].n_way, episodes[0].k_shot
    return FewShotResult(
        head="meta", n_way=n_way, k_shot=k_shot, n_query=episodes[0].n_query, episodes=len(episodes),
        accuracy=float(accuracies.mean()), ci95=confidence_interval95(accuracies), per_episode=accuracies,
    )


@torch.no_grad()
def metric_episode_accuracies(
    method: MetricMetaMethod, load: Callable[[np.ndarray], torch.Tensor], episodes: list[Episode], device: str
) -> np.ndarray:
    """:func:`~lowlabel.meta.base.episode_accuracies` of a metric method, from one embedding of
    the images the episodes use instead of one forward pass per episode (600 per setting).

    In eval mode each image's embedding is its own (running BatchNorm statistics) and the same
    bit for bit in any batch, so the scores are those of the per-episode path (tested).
    """
    from lowlabel.models.batching import eval_batch_size

    used = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for e in episodes]))
    batch = eval_batch_size(device)
    was_training = method.training
    method.eval()
    try:
        features = torch.cat([method.learner.encoder(load(used[i : i + batch])) for i in range(0, len(used), batch)])
        accuracies = []
        for episode in episodes:
            support, query = (torch.from_numpy(np.searchsorted(used, rows)).to(device) for rows in (episode.support, episode.query))
            scores = method.learner.episode_logits(
                features[support], torch.as_tensor(episode.support_labels(), device=device), features[query], episode.n_way
            )
            accuracies.append((scores.argmax(1) == torch.as_tensor(episode.query_labels(), device=device)).float().mean().item())
    finally:
        method.train(was_training)
    return np.array(accuracies)
