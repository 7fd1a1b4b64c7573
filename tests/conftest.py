"""Shared fixtures: quiet environment, a tiny synthetic prepared dataset, a temp MLflow store."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A standalone S3-compatible server (moto's) on 127.0.0.1, for the whole session: it keeps
    everything in memory, so one process serves every test (each uses its own bucket)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch):
    """The standard AWS variables pointed at the test server (moto checks no credentials)."""
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def make_bucket(name: str) -> None:
    """Create a bucket on the server AWS_ENDPOINT_URL names."""
    import os

    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(name)


@pytest.fixture(scope="module")
def ray_two_cpus(tmp_path_factory):
    """A local Ray with 2 CPUs for one test module (temp dir short: Ray's socket paths)."""
    import ray

    from lowlabel.runner.launch import ensure_ray

    ray.shutdown()  # a Ray another module left up would keep its own size
    os.environ["LOWLABEL_RAY_TMP"] = str(tmp_path_factory.mktemp("ray"))
    ensure_ray(None, local_num_cpus=2)
    yield ray
    ray.shutdown()
