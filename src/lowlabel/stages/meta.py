"""DVC stage ``meta@<method>``: episodic meta-training (ProtoNet, MatchingNet, RelationNet,
MAML, Reptile) as a Ray Train job, from ``meta.init``'s encoder, on episodes of the labeled
base images, of a semi-supervised model's confident pseudo-labels, or of no labels (UMTRA).

The episode pool is decided here, before any MLflow run or Ray worker: an episode setting the
pool cannot supply (too few classes with ``shots + queries`` images) stops the stage naming
the settings. Pseudo-labels are the predictions of ``models/semisup/<pseudo_model>``'s EMA
classifier on the unlabeled base images; they never read those images' true labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lowlabel.config import META_METHODS, Params
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.models.store import CLASSIFIER_EMA_FILE, ENCODER_FILE, META_HEAD_FILE
from lowlabel.stages.common import MODELS_DIR, PREPARED_DIR, StageError, stage_main, tracked_run
from lowlabel.stages.encoder_files import load_encoder_file
from lowlabel.stages.preflight import check_before_training, check_storage
from lowlabel.stages.training import train_in_ray, write_training_outputs
from lowlabel.tracking import TAG_INIT_RUN, log_prepared_input


def run_meta_loop(config: dict[str, Any]) -> None:
    """The loop as Ray Train's workers run it. Its module is imported there, not in this
    driver process, which never runs it (torchvision, kornia, timm's optimisers: ~3 s of import
    per stage on 2 cores)."""
    from lowlabel.train.meta import meta_loop

    meta_loop(config)


def init_encoder_path(params: Params) -> tuple[str | None, str]:
    """(the file of ``meta.init``'s encoder or None for random init, its MLflow run id or '')."""
    init = params.meta.init
    if init == "random":
        return None, ""
    stage = "pretrain" if init in params.pretrain.methods else "semisup"
    path = MODELS_DIR / stage / init / ENCODER_FILE
    if not path.is_file():
        raise StageError(f"meta.init={init!r} but {path} does not exist; run `dvc repro {stage}@{init}` first")
    _, meta = load_encoder_file(path, f"dvc repro {stage}@{init}")
    return str(path.resolve()), meta.get("mlflow_run_id", "")


def pseudo_label_pool(
    probabilities: np.ndarray, indices: np.ndarray, threshold: float, per_class_min: int, per_class_max: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(indices, pseudo classes, stats) of the confident predictions.

    An image enters when its top probability is >= ``threshold``. Classes with fewer than
    ``per_class_min`` confident images are dropped (no episode can use them). Episodes are
    class-balanced by construction (their classes are drawn uniformly, then images within
    each), so a class with many confident images does not dominate them; ``per_class_max``
    also caps each class at its most confident images (ties: the lower index first).
    """
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    confident = confidence >= threshold
    counts = np.bincount(predicted[confident], minlength=probabilities.shape[1])
    kept_classes = np.flatnonzero(counts >= per_class_min)
    chosen = [np.zeros(0, np.int64)]
    for c in kept_classes:
        members = np.flatnonzero(confident & (predicted == c))
        order = np.lexsort((members, -confidence[members]))  # most confident first, then index
        chosen.append(members[order[:per_class_max]])
    picked = np.sort(np.concatenate(chosen))
    kept = np.bincount(predicted[picked], minlength=probabilities.shape[1])[kept_classes]
    stats = {
        "pseudo_confident": float(confident.mean()) if len(confident) else 0.0,
        "pseudo_classes": float(len(kept_classes)),
        "pseudo_min_per_class": float(kept.min()) if len(kept) else 0.0,
        "pseudo_max_per_class": float(kept.max()) if len(kept) else 0.0,
    }
    return indices[picked].astype(np.int64), predicted[picked].astype(np.int64), stats


def classifier_probabilities(state: dict[str, Any], arch: str, width: int, data: PreparedData, indices: np.ndarray) -> np.ndarray:
    """Softmax (float64) of a semisup Classifier's state on ``data.train_images[indices]``
    (eval view and mode). Raises what ``load_state_dict`` raises for another encoder's state."""
    import torch

    from lowlabel.data.augment import eval_view
    from lowlabel.evaluation import extract_features
    from lowlabel.models.encoders import build_encoder, feature_dim
    from lowlabel.models.heads import Classifier

    encoder = build_encoder(arch, data.in_chans, width)
    classifier = Classifier(encoder, feature_dim(encoder, data.in_chans, data.image_size), len(data.split.base_classes))
    classifier.load_state_dict(state)
    logits = extract_features(classifier, data.train_images, indices, eval_view(data.mean, data.std))
    return torch.softmax(logits.double(), dim=1).numpy()


def pseudo_probabilities(params: Params, data: PreparedData, indices: np.ndarray) -> np.ndarray:
    """:func:`classifier_probabilities` of ``models/semisup/<pseudo_model>``'s EMA classifier."""
    import torch

    model_name = params.meta.pseudo_model
    path = MODELS_DIR / "semisup" / model_name / CLASSIFIER_EMA_FILE
    remake = f"dvc repro semisup@{model_name}"
    if not path.is_file():
        raise StageError(f"meta.episodes_from=pseudo with meta.pseudo_model={model_name!r} needs {path}; run `{remake}` first")
    try:
        # weights_only: a model file must not be a way to run code here.
        state = torch.load(path, map_location="cpu", weights_only=True)
        return classifier_probabilities(state, params.encoder.arch, params.encoder.width, data, indices)
    except Exception as error:  # a file of another encoder or another class count
        raise StageError(f"{path} cannot be loaded as the {params.encoder.arch} classifier: {str(error).splitlines()[0]}; re-create it with `{remake}`") from None


def class_supply(labels: np.ndarray, n_classes: int, need: int) -> tuple[np.ndarray, int]:
    """(images per class, how many classes have at least ``need``): whether a pool can make
    episodes of ``need`` images per class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)  # an empty pool: all zeros
    return counts, int((counts >= need).sum())


def episode_pool(params: Params, data: PreparedData) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """(image indices, their classes or None when unsupervised, stats) that episodes draw from."""
    cfg = params.meta
    need = cfg.shots + cfg.queries
    stats: dict[str, float] = {}
    if cfg.episodes_from == "labels":
        indices = np.asarray(data.split.labeled, dtype=np.int64)
        labels = data.base_label(data.train_labels[indices]).astype(np.int64)
        where = f"the labeled base images (data.labels_per_class={params.data.labels_per_class})"
    elif cfg.episodes_from == "pseudo":
        unlabeled = np.asarray(data.split.unlabeled, dtype=np.int64)
        indices, labels, stats = pseudo_label_pool(pseudo_probabilities(params, data, unlabeled), unlabeled, cfg.pseudo_threshold, need, cfg.pseudo_per_class)
        where = f"the pseudo-labels of semisup@{cfg.pseudo_model} at meta.pseudo_threshold={cfg.pseudo_threshold}"
    else:
        indices = np.asarray(data.split.unlabeled, dtype=np.int64)
        if len(indices) < cfg.ways:
            raise StageError(f"meta.ways={cfg.ways} but only {len(indices)} unlabeled base images exist (each is a class of its own)")
        return indices, None, {"pool_images": float(len(indices))}
    counts, usable = class_supply(labels, len(data.split.base_classes), need)
    if usable < cfg.ways:
        raise StageError(
            f"meta.ways={cfg.ways} with meta.shots + meta.queries = {need} images per class, but only {usable} classes of "
            f"{where} have {need} (per class: {counts.tolist()}); lower meta.ways / meta.shots / meta.queries"
            + (" or meta.pseudo_threshold" if cfg.episodes_from == "pseudo" else "")
        )
    return indices, labels, stats | {"pool_images": float(len(indices))}


def check_validation_episodes(params: Params, data: PreparedData) -> None:
    """The job scores base-class test episodes of the training shape (train/meta.py): the base
    test images must supply them, or the job would fail inside its worker."""
    cfg = params.meta
    need = cfg.shots + cfg.queries
    test_labels = data.base_label(data.test_labels[np.asarray(data.split.test_base, dtype=np.int64)])
    counts, usable = class_supply(test_labels, len(data.split.base_classes), need)
    if usable < cfg.ways:
        raise StageError(
            f"meta.ways={cfg.ways} with meta.shots + meta.queries = {need}: the validation episodes need that many base-class test "
            f"images per class, but only {usable} classes have them (fewest: {int(counts.min())}); lower meta.shots / meta.queries / meta.ways"
        )


def meta(params: Params, method: str) -> dict:
    from lowlabel.runner.jobs import meta_job

    cfg = params.meta
    data = PreparedData.load(PREPARED_DIR)
    check_before_training(params, data)
    check_storage(params)
    init_path, init_run = init_encoder_path(params)
    pool, pool_labels, pool_stats = episode_pool(params, data)
    check_validation_episodes(params, data)
    dvc_stage = f"meta@{method}"
    tags = {TAG_INIT_RUN: init_run, "lowlabel.init": cfg.init, "lowlabel.episodes_from": cfg.episodes_from}
    with tracked_run(
        params, stage="meta", method=method, dvc_stage=dvc_stage, sections=("seed", "data", "encoder", "runtime", "meta"), tags=tags
    ) as run:
        import mlflow

        log_prepared_input(data, params.data.source, prepared_digest(PREPARED_DIR), context="training")
        mlflow.log_metrics({f"pool/{key}": value for key, value in pool_stats.items()})
        config, name = meta_job(params, method, init_path, pool, pool_labels, inputs=(PREPARED_DIR, *pseudo_inputs(params)))
        state, ray_run = train_in_ray(params, run_meta_loop, config, name)
        history = state["history"]
        last = history[-1]
        metrics = {
            "loss": last["loss"],
            "val_acc": last["val_acc"],
            "best_val_acc": max(h["val_acc"] for h in history if "val_acc" in h),
            "episodes_per_s": sum(h["episodes_per_s"] for h in history) / len(history),
            "steps": last["step"],
            "init": cfg.init,
            "episodes_from": cfg.episodes_from,
            **pool_stats,
        }
        head = {"method": method, "settings": config["method_kwargs"], "ways": cfg.ways, "state": state["model"]}
        write_training_outputs(
            params, ray_run, "meta", method, state["encoder"], data, run.info.run_id, metrics, history,
            extra_files={META_HEAD_FILE: head}, init_run_id=init_run,
        )
    return metrics


def pseudo_inputs(params: Params) -> tuple[Path, ...]:
    """Files the episode pool depends on besides the prepared data (for the Ray run's name)."""
    if params.meta.episodes_from != "pseudo":
        return ()
    return (MODELS_DIR / "semisup" / params.meta.pseudo_model / CLASSIFIER_EMA_FILE,)


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=META_METHODS)


def main() -> None:
    stage_main(__doc__, lambda params, args: meta(params, args.method), _args)


if __name__ == "__main__":
    main()
