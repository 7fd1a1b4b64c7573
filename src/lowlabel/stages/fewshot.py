"""DVC stage ``fewshot``: every encoder the pipeline produced, frozen, on classes no stage trained on.

Per encoder: embeddings of the novel-class test images computed once, then N-way K-shot
episodes (the same episodes for every encoder) run on that cache with each head; plus the
base-class kNN accuracy, so every encoder is also compared on the classes it did see.
One MLflow run per encoder, metrics named ``fewshot/<head>/<N>w<K>s/acc`` so the UI's
compare view lines them up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch

from lowlabel.config import Params
from lowlabel.data.augment import eval_view
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.evaluation import extract_features, knn_accuracy, knn_split, linear_probe_accuracy
from lowlabel.fewshot import (
    Episode,
    EpisodeError,
    FewShotResult,
    FineTuneLastBlock,
    LastBlockSplit,
    evaluate_episodes,
    normalize_features,
    sample_episodes,
    split_last_block,
)
from lowlabel.models.encoders import build_encoder
from lowlabel.models.store import ENCODER_FILE
from lowlabel.runner.worker import seed_everything
from lowlabel.stages.common import (
    METRICS_DIR,
    MODELS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    StageError,
    stage_main,
    tracked_run,
    write_csv,
    write_json,
)
from lowlabel.stages.encoder_files import load_encoder_file
from lowlabel.tracking import TAG_ENCODER, TAG_INIT_RUN, log_prepared_input

log = logging.getLogger("lowlabel.fewshot")

# Final numbers: every base training image is in the kNN bank (the monitor uses a subset).
KNN_BANK_SIZE = None
RANDOM = "random"
FINETUNE = "finetune"  # the head that needs the encoder's last block, not the embeddings


def encoder_paths(params: Params) -> dict[str, Path | None]:
    """Encoder name -> its file (None: random init), in report order."""
    paths: dict[str, Path | None] = {RANDOM: None}
    for stage, methods in (("pretrain", params.pretrain.methods), ("semisup", params.semisup.methods)):
        for method in methods:
            path = MODELS_DIR / stage / method / ENCODER_FILE
            if not path.is_file():
                raise StageError(f"{path} is missing; run `dvc repro {stage}@{method}` first")
            paths[f"{stage}/{method}"] = path
    return paths


def random_encoder(params: Params, in_chans: int) -> torch.nn.Module:
    # Same seed as the training stages: this is exactly the weights they started from.
    seed_everything(params.seed)
    return build_encoder(params.encoder.arch, in_chans, params.encoder.width).eval()


def setting_name(n_way: int, k_shot: int) -> str:
    return f"{n_way}w{k_shot}s"


def plan_episodes(params: Params, labels: np.ndarray) -> dict[tuple[int, int], list[Episode]]:
    """Sample every (way, shot) setting once, shared by all encoders; skip impossible ways."""
    cfg = params.fewshot
    n_classes = len(np.unique(labels))
    plans = {}
    for n_way in cfg.ways:
        if n_way > n_classes:
            print(f"[fewshot] skipping {n_way}-way: only {n_classes} novel classes", flush=True)
            continue
        for k_shot in cfg.shots:
            try:
                plans[(n_way, k_shot)] = sample_episodes(labels, n_way, k_shot, cfg.queries, cfg.episodes, seed=params.seed)
            except EpisodeError as error:
                raise StageError(f"fewshot.shots={k_shot}, fewshot.queries={cfg.queries}: {error}") from None
    if not plans:
        raise StageError(f"fewshot.ways={cfg.ways}: no setting fits the {n_classes} novel classes")
    return plans


def head_kwargs(params: Params, head: str) -> dict:
    if head == "protonet":
        return {"distance": params.fewshot.distance}
    if head == "knn":
        return {"k": 1}
    if head == FINETUNE:
        # The tuned block's output moves, so only the l2 part of feature_norm applies to it.
        return {**params.fewshot.finetune.model_dump(), "l2_normalize": params.fewshot.feature_norm in ("l2", "center_l2"), "seed": params.seed}
    return {"seed": params.seed}


Embedder = Callable[[np.ndarray, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class NovelPool:
    """One encoder's view of the few-shot pool, computed once and shared by every head and episode.

    Rows are in :meth:`PreparedData.novel_pool_labels` order. ``embeddings`` are normalised by
    ``fewshot.feature_norm``; ``block_inputs`` (the frozen trunk's output, the finetune head's
    cache) and ``split`` exist only when that head is asked for.
    """

    embeddings: torch.Tensor
    block_inputs: torch.Tensor | None = None
    split: LastBlockSplit | None = None


def _on_device(encoder: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return encoder.to(device, memory_format=torch.channels_last), device


def _embedder(encoder: torch.nn.Module, data: PreparedData, device: str) -> Embedder:
    return partial(extract_features, encoder, view=eval_view(data.mean, data.std), device=device, channels_last=True)


def _embed_pool(embed: Embedder, data: PreparedData) -> torch.Tensor:
    novel = embed(data.test_images, data.split.test_novel)
    if data.split.train_novel:  # data.novel_pool: all
        novel = torch.cat([novel, embed(data.train_images, data.split.train_novel)])
    return novel


def embed_novel_pool(params: Params, encoder: torch.nn.Module, data: PreparedData, heads: Sequence[str] | None = None) -> NovelPool:
    """Embed the novel pool once for ``heads`` (default ``fewshot.heads``); also the last block's inputs if finetune is among them."""
    encoder, device = _on_device(encoder)
    embeddings = normalize_features(_embed_pool(_embedder(encoder, data, device), data), params.fewshot.feature_norm)
    if FINETUNE not in (params.fewshot.heads if heads is None else heads):
        return NovelPool(embeddings)
    view = eval_view(data.mean, data.std)
    example = torch.stack([view(np.asarray(data.test_images[i]), 0) for i in data.split.test_novel[:4]])
    split = split_last_block(encoder, example.to(device).contiguous(memory_format=torch.channels_last), params.encoder.arch)
    # extract_features returns CPU tensors; the block is tuned where the encoder ran (GPU if any).
    block_inputs = _embed_pool(_embedder(split.trunk, data, device), data).to(device)
    return NovelPool(embeddings, block_inputs, split)


def base_accuracies(params: Params, encoder: torch.nn.Module, data: PreparedData) -> dict[str, float]:
    """Frozen features on the base classes, every base training image labeled, base test images
    as queries: weighted kNN (``base_knn_acc``) and the linear probe (``base_linear_acc``,
    logistic regression, lowlabel.evaluation.linear_probe_accuracy), from one embedding pass."""
    encoder, device = _on_device(encoder)
    features = _embedder(encoder, data, device)
    bank_idx, test_idx = knn_split(data, KNN_BANK_SIZE, params.seed)
    bank, test = features(data.train_images, bank_idx), features(data.test_images, test_idx)
    bank_labels, test_labels = torch.from_numpy(data.train_labels[bank_idx]), torch.from_numpy(data.test_labels[test_idx])
    return {
        "base_knn_acc": knn_accuracy(bank, bank_labels, test, test_labels, k=params.fewshot.knn_k),
        "base_linear_acc": linear_probe_accuracy(bank, bank_labels, test, test_labels),
    }


def base_knn_accuracy(params: Params, encoder: torch.nn.Module, data: PreparedData) -> float:
    """Weighted kNN on the base classes alone (see :func:`base_accuracies`)."""
    return base_accuracies(params, encoder, data)["base_knn_acc"]


def evaluate_head(params: Params, pool: NovelPool, novel_labels: np.ndarray, episodes: list[Episode], head: str) -> FewShotResult:
    """One head on one setting's episodes, on the pool's cache (embeddings, or the last block's inputs for finetune)."""
    if head != FINETUNE:
        return evaluate_episodes(pool.embeddings, novel_labels, episodes, head, head_kwargs(params, head))
    if pool.split is None or pool.block_inputs is None:
        raise StageError("the finetune head needs the pool embedded with it: embed_novel_pool(..., heads=[..., 'finetune'])")
    classifier = FineTuneLastBlock(pool.split, **head_kwargs(params, head))
    return evaluate_episodes(pool.block_inputs, novel_labels, episodes, head, classifier=classifier)


def evaluate_encoder(params: Params, encoder: torch.nn.Module, data: PreparedData, plans: dict, novel_labels: np.ndarray) -> dict:
    pool = embed_novel_pool(params, encoder, data)
    out: dict = base_accuracies(params, encoder, data)
    for (n_way, k_shot), episodes in plans.items():
        for head in params.fewshot.heads:
            result = evaluate_head(params, pool, novel_labels, episodes, head)
            out[f"{head}/{setting_name(n_way, k_shot)}"] = {"acc": result.accuracy, "ci95": result.ci95}
    return out


def fewshot(params: Params) -> dict:
    data = PreparedData.load(PREPARED_DIR)
    novel_labels = data.novel_pool_labels()
    plans = plan_episodes(params, novel_labels)
    # Every encoder loaded before the first MLflow run: a bad file stops the stage naming it,
    # not after the encoders before it were evaluated.
    encoders = {}
    for name, path in encoder_paths(params).items():
        if path is None:
            encoders[name] = random_encoder(params, data.in_chans), {}
        else:  # name "pretrain/simclr" is written by the DVC stage pretrain@simclr
            encoders[name] = load_encoder_file(path, f"dvc repro {name.replace('/', '@', 1)}")
    results: dict[str, dict] = {}
    rows = []
    digest = prepared_digest(PREPARED_DIR)
    for name, (encoder, meta) in encoders.items():
        started = time.perf_counter()
        tags = {TAG_ENCODER: name, TAG_INIT_RUN: meta.get("mlflow_run_id", "")}
        with tracked_run(
            params, stage="fewshot", method=name, dvc_stage="fewshot", sections=("seed", "fewshot"), tags=tags, run_name=f"fewshot {name}"
        ):
            log_prepared_input(data, params.data.source, digest, context="evaluation")
            scores = evaluate_encoder(params, encoder, data, plans, novel_labels)
            mlflow.log_metrics({"base/knn_acc": scores["base_knn_acc"], "base/linear_acc": scores["base_linear_acc"]})
            for key, value in scores.items():
                if isinstance(value, dict):
                    mlflow.log_metrics({f"fewshot/{key}/acc": value["acc"], f"fewshot/{key}/ci95": value["ci95"]})
        results[name] = scores
        shown = ", ".join(f"{k} {v['acc'] * 100:.1f}±{v['ci95'] * 100:.1f}" for k, v in scores.items() if isinstance(v, dict))
        print(f"[fewshot] {name}: base kNN {scores['base_knn_acc'] * 100:.1f} linear {scores['base_linear_acc'] * 100:.1f} | {shown} ({time.perf_counter() - started:.1f} s)", flush=True)
        for key, value in scores.items():
            if isinstance(value, dict):
                head, setting = key.split("/")
                n_way, k_shot = setting.removesuffix("s").split("w")
                rows.append({"encoder": name, "head": head, "ways": int(n_way), "shots": int(k_shot), "acc": value["acc"], "ci95": value["ci95"]})
    payload = {
        "episodes": params.fewshot.episodes,
        "queries": params.fewshot.queries,
        "feature_norm": params.fewshot.feature_norm,
        "encoders": results,
    }
    write_json(METRICS_DIR / "fewshot.json", payload)
    write_csv(PLOTS_DIR / "fewshot.csv", rows)
    return payload


def main() -> None:
    stage_main(__doc__, lambda params, args: fewshot(params))


if __name__ == "__main__":
    main()
