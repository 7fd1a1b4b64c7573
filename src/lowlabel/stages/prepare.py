"""DVC stage ``prepare``: load the source, split it, write ``data/prepared`` and its metrics."""

from __future__ import annotations

import logging
from collections import Counter

import mlflow

from lowlabel.config import Params
from lowlabel.data.prepared import channel_stats, write_prepared
from lowlabel.data.sources import load_source
from lowlabel.data.splits import make_split
from lowlabel.stages.common import METRICS_DIR, PREPARED_DIR, stage_main, tracked_run, write_json

log = logging.getLogger("lowlabel.prepare")


def prepare(params: Params) -> dict:
    with tracked_run(params, stage="prepare", method=params.data.source, dvc_stage="prepare", sections=("seed", "data")):
        summary = _prepare(params)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(PREPARED_DIR / "split.json"))
        mlflow.log_artifact(str(PREPARED_DIR / "info.json"))
    return summary


def _prepare(params: Params) -> dict:
    cfg = params.data
    raw = load_source(
        cfg.source,
        cfg.root,
        image_size=cfg.image_size,
        channels=cfg.channels,
        on_corrupt=cfg.on_corrupt,
        download=cfg.download,
        test_fraction=cfg.test_fraction,
        seed=params.seed,
        glyph_classes=cfg.glyphs.num_classes,
        glyph_instances=cfg.glyphs.instances_per_class,
    )
    split = make_split(
        raw.train_labels,
        raw.test_labels,
        cfg.novel_classes,
        cfg.labels_per_class,
        params.seed,
        max_train_per_class=cfg.max_train_per_class,
        max_test_per_class=cfg.max_test_per_class,
        novel_pool=cfg.novel_pool,
    )
    # Normalisation constants come from the images training may see (base classes only).
    mean, std = channel_stats(raw.train_images[split.pretrain], seed=params.seed)
    info = {
        "source": cfg.source,
        "class_names": raw.class_names,
        "mean": mean,
        "std": std,
        "skipped": [list(item) for item in raw.skipped],
    }
    write_prepared(PREPARED_DIR, raw.train_images, raw.train_labels, raw.test_images, raw.test_labels, split, info)
    labeled_counts = Counter(int(raw.train_labels[i]) for i in split.labeled)
    summary = {
        "image_shape": list(raw.train_images.shape[1:]),
        "classes": len(raw.class_names),
        "base_classes": len(split.base_classes),
        "novel_classes": len(split.novel_classes),
        "labeled": len(split.labeled),
        "unlabeled": len(split.unlabeled),
        "test_base": len(split.test_base),
        "test_novel": len(split.test_novel),
        "train_novel": len(split.train_novel),
        "skipped_images": len(raw.skipped),
        "min_labels_per_class": int(min(labeled_counts.values())),
    }
    write_json(METRICS_DIR / "prepare.json", summary)
    print(f"[prepare] {cfg.source}: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    if raw.skipped:
        print(f"[prepare] skipped {len(raw.skipped)} unreadable image(s), e.g. {raw.skipped[0][0]}: {raw.skipped[0][1]}", flush=True)
    return summary


def main() -> None:
    stage_main(__doc__, lambda params, args: prepare(params))


if __name__ == "__main__":
    main()
