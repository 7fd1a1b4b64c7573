"""The prepared-data folder the prepare stage writes and every later stage reads.

Layout: ``{train,test}_images.npy`` (uint8 N,H,W,C), ``{train,test}_labels.npy`` (int64),
``split.json`` and ``info.json`` (class names, per-channel mean/std of the training images).
Images are opened memory-mapped, so a Ray worker touches only the rows of its own shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowlabel.atomic import atomic_dir
from lowlabel.data.splits import Split
from lowlabel.errors import UserError


class PreparedDataError(FileNotFoundError, UserError):
    pass


PREPARED_FILES = ("info.json", "split.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy")


def prepared_digest(root: str | Path) -> str:
    """sha256 (16 hex digits) over the names, sizes and bytes of the prepared files: the split
    manifest, class info and the four arrays. The same bytes give the same digest on any
    machine, and it equals lowlabel.runner.jobs.files_fingerprint of a folder holding only
    these files (the form the Ray run names use)."""
    digest = hashlib.sha256()
    for name in PREPARED_FILES:
        file = Path(root) / name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def write_prepared(
    out_dir: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    split: Split,
    info: dict[str, Any],
) -> None:
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "train_images.npy", np.ascontiguousarray(train_images, dtype=np.uint8))
        np.save(tmp / "train_labels.npy", train_labels.astype(np.int64))
        np.save(tmp / "test_images.npy", np.ascontiguousarray(test_images, dtype=np.uint8))
        np.save(tmp / "test_labels.npy", test_labels.astype(np.int64))
        split.to_json(tmp / "split.json")
        (tmp / "info.json").write_text(json.dumps(info, indent=1))


def channel_stats(images: np.ndarray, max_images: int = 20000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0,1] units, from a fixed random sample (normalisation constants)."""
    rng = np.random.default_rng(seed)
    sample = images[np.sort(rng.permutation(len(images))[:max_images])].astype(np.float64) / 255.0
    flat = sample.reshape(-1, images.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()


@dataclass
class PreparedData:
    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    split: Split
    info: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        absent = [name for name in PREPARED_FILES if not (root / name).is_file()]
        if absent:
            raise PreparedDataError(f"{root}: prepared data incomplete, missing {absent}; run the prepare stage (dvc repro prepare)")
        return cls(
            root=root,
            train_images=np.load(root / "train_images.npy", mmap_mode="r"),
            train_labels=np.load(root / "train_labels.npy"),
            test_images=np.load(root / "test_images.npy", mmap_mode="r"),
            test_labels=np.load(root / "test_labels.npy"),
            split=Split.from_json(root / "split.json"),
            info=json.loads((root / "info.json").read_text()),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"train_images": self.train_images, "train_labels": self.train_labels, "test_images": self.test_images, "test_labels": self.test_labels}

    @property
    def in_chans(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def mean(self) -> list[float]:
        return self.info["mean"]

    @property
    def std(self) -> list[float]:
        return self.info["std"]

    def novel_pool_labels(self) -> np.ndarray:
        """Labels of the few-shot pool: novel test images, then novel training images
        (``data.novel_pool: all``), the order the fewshot stage embeds them in."""
        test = self.test_labels[np.asarray(self.split.test_novel, dtype=np.int64)]
        return np.concatenate([test, self.train_labels[np.asarray(self.split.train_novel, dtype=np.int64)]])

    def base_label(self, labels: np.ndarray) -> np.ndarray:
        """Original class ids -> 0..B-1 in ``split.base_classes`` order (for classifiers)."""
        lookup = {c: i for i, c in enumerate(self.split.base_classes)}
        return np.array([lookup[int(c)] for c in labels], dtype=np.int64)
