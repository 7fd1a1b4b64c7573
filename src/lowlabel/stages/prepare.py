"""DVC stage ``prepare``: load the source, split it, write ``data/prepared`` and its metrics.

An image folder is streamed: decoded by ``data.decode_workers`` processes, ``data.decode_chunk``
images per task, straight into the prepared folder's arrays on disk (lowlabel.data.sources.
write_imagefolder), so memory stays bounded whatever the number of images; a progress line
with images/s is printed every few seconds. Other sources fit in memory and are loaded whole.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np

from lowlabel.atomic import atomic_dir
from lowlabel.config import Params
from lowlabel.data.prepared import NpyRows, channel_stats, save_arrays, save_split_info
from lowlabel.data.sources import load_source, resolve_decode_workers, write_imagefolder
from lowlabel.data.splits import make_split
from lowlabel.stages.common import METRICS_DIR, PREPARED_DIR, stage_main, tracked_run, write_json

log = logging.getLogger("lowlabel.prepare")

PROGRESS_EVERY_S = 5.0  # seconds between two progress lines while decoding


def prepare(params: Params) -> dict:
    with tracked_run(params, stage="prepare", method=params.data.source, dvc_stage="prepare", sections=("seed", "data")):
        summary = _prepare(params)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(PREPARED_DIR / "split.json"))
        mlflow.log_artifact(str(PREPARED_DIR / "info.json"))
    return summary


class DecodeProgress:
    """``progress`` callback of write_imagefolder: one line at most every ``every`` seconds, and
    one at the end, with the decode rate since the start."""

    def __init__(self, workers: int, every: float = PROGRESS_EVERY_S) -> None:
        self.workers = workers
        self.every = every
        self.start = time.monotonic()
        self.last = self.start

    def __call__(self, done: int, total: int, skipped: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(
            f"[prepare] decoded {done}/{total} images ({100 * done / max(total, 1):.0f}%), "
            f"{rate:.0f} images/s with {self.workers} worker(s), {skipped} unreadable",
            flush=True,
        )


def _prepare(params: Params) -> dict:
    cfg = params.data
    # Everything goes into the atomic folder's temporary, which replaces data/prepared only when
    # complete; images never need to be in memory all at once.
    with atomic_dir(PREPARED_DIR) as tmp:
        if cfg.source == "imagefolder":
            workers = resolve_decode_workers(cfg.decode_workers)
            written = write_imagefolder(
                cfg.root, tmp, image_size=cfg.image_size, channels=cfg.channels, on_corrupt=cfg.on_corrupt,
                test_fraction=cfg.test_fraction, seed=params.seed,
                decode_workers=workers, decode_chunk=cfg.decode_chunk, progress=DecodeProgress(workers),
            )
            class_names, skipped = written.class_names, written.skipped
        else:
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
            save_arrays(tmp, raw.train_images, raw.train_labels, raw.test_images, raw.test_labels)
            class_names, skipped = raw.class_names, raw.skipped
            del raw
        train_labels = np.load(tmp / "train_labels.npy")
        test_labels = np.load(tmp / "test_labels.npy")
        train_images = NpyRows(Path(tmp) / "train_images.npy")
        split = make_split(
            train_labels,
            test_labels,
            cfg.novel_classes,
            cfg.labels_per_class,
            params.seed,
            max_train_per_class=cfg.max_train_per_class,
            max_test_per_class=cfg.max_test_per_class,
            novel_pool=cfg.novel_pool,
        )
        # Normalisation constants come from the images training may see (base classes only).
        mean, std = channel_stats(train_images, seed=params.seed, rows=split.pretrain)
        info = {
            "source": cfg.source,
            "class_names": class_names,
            "mean": mean,
            "std": std,
            "skipped": [list(item) for item in skipped],
        }
        save_split_info(tmp, split, info)
    labeled_counts = Counter(int(train_labels[i]) for i in split.labeled)
    summary = {
        "image_shape": list(train_images.shape[1:]),
        "classes": len(class_names),
        "base_classes": len(split.base_classes),
        "novel_classes": len(split.novel_classes),
        "labeled": len(split.labeled),
        "unlabeled": len(split.unlabeled),
        "test_base": len(split.test_base),
        "test_novel": len(split.test_novel),
        "train_novel": len(split.train_novel),
        "skipped_images": len(skipped),
        "min_labels_per_class": int(min(labeled_counts.values())),
    }
    write_json(METRICS_DIR / "prepare.json", summary)
    print(f"[prepare] {cfg.source}: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    if skipped:
        print(f"[prepare] skipped {len(skipped)} unreadable image(s), e.g. {skipped[0][0]}: {skipped[0][1]}", flush=True)
    return summary


def main() -> None:
    stage_main(__doc__, lambda params, args: prepare(params))


if __name__ == "__main__":
    main()
