"""Shared fixtures: quiet environment, a tiny synthetic prepared dataset, a temp MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.data.prepared import channel_stats, write_prepared  # noqa: E402
from lowlabel.data.splits import make_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def synthetic_images(n_per_class: int, n_classes: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c = a bright square at a class-specific place, plus noise: learnable, fast."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size, 1), dtype=np.uint8)
            r, col = divmod(c, 4)
            img[2 + r * 3 : 6 + r * 3, 2 + col * 3 : 6 + col * 3] = 230
            images.append(img)
            labels.append(c)
    return np.stack(images), np.array(labels, dtype=np.int64)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared-data folder: 6 classes (4 base, 2 novel), 16x16 gray, 40 train / 20 test per class."""
    root = tmp_path_factory.mktemp("prepared") / "data" / "prepared"
    train_x, train_y = synthetic_images(40, 6, seed=1)
    test_x, test_y = synthetic_images(20, 6, seed=2)
    split = make_split(train_y, test_y, novel_classes=[4, 5], labels_per_class=2, seed=0)
    mean, std = channel_stats(train_x[split.pretrain])
    write_prepared(root, train_x, train_y, test_x, test_y, split, {"class_names": [str(c) for c in range(6)], "mean": mean, "std": std, "skipped": []})
    return root


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def one_torch_thread():
    """For tests on tiny tensors: extra intra-op threads only add OpenMP barriers, which turn
    seconds into a minute when the box is busy with other test processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
