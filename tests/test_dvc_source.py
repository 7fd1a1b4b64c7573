"""DVC re-runs ``prepare`` when the source data's files change (the ``source`` stage).

The data lives outside the repository (data.root, or a source's default folder), so the
always-changed ``source`` stage fingerprints it into data/source.json, which ``prepare``
depends on. Unit tests of the fingerprint, then a real ``dvc repro prepare`` in a temp git
repository on a tiny ImageFolder: a second repro skips prepare, an edited image re-runs it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from dvc_project import dvc_project, ran_stages
from PIL import Image

from lowlabel.config import parse_params
from lowlabel.data.sources import DEBIAN_FASHION_MNIST_DIR
from lowlabel.stages.source import fingerprint, source_locations


def write_images(root: Path, classes: int = 3, per_class: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_fingerprint_follows_content_not_paths_or_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a)
    shutil.copytree(a, b)  # same files elsewhere, new mtimes and inodes
    cache: dict = {}
    first = fingerprint({"data.root": a}, cache)
    assert first["data.root"]["files"] == 18 and str(a) not in json.dumps(first)
    assert len(cache) == 18
    assert fingerprint({"data.root": b}, {}) == first
    os.utime(a / "class0" / "0.png", ns=(1, 1))  # touched only: same content, same fingerprint
    assert fingerprint({"data.root": a}, cache) == first
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(a / "class0" / "0.png")
    edited = fingerprint({"data.root": a}, cache)
    assert edited != first
    (a / "class1" / "new.png").write_bytes((a / "class1" / "0.png").read_bytes())
    assert fingerprint({"data.root": a}, cache)["data.root"]["files"] == 19
    (a / ".hidden").write_text("editor state")  # the loaders skip hidden files; so does this
    assert fingerprint({"data.root": a}, cache)["data.root"]["files"] == 19
    assert fingerprint({"data.root": tmp_path / "nowhere"}, cache) == {"data.root": "missing"}


def test_locations_follow_the_loaders_search():
    data = lambda **kw: parse_params({"data": kw}).data  # noqa: E731
    fashion = source_locations(data())
    assert fashion["debian"] == Path(DEBIAN_FASHION_MNIST_DIR) and fashion["cache"].name == "fashion-mnist"
    assert source_locations(data(root="/x")) == {"data.root": Path("/x"), "debian": Path(DEBIAN_FASHION_MNIST_DIR)}
    assert source_locations(data(source="imagefolder", root="/imgs")) == {"data.root": Path("/imgs")}
    assert source_locations(data(source="cifar10"))["cache"].name == "cifar10"
    fonts = source_locations(data(source="glyphs"))["fonts"]
    assert all(p.suffix.lower() in (".ttf", ".ttc") for p in fonts)


@pytest.mark.slow
def test_editing_one_source_image_reruns_prepare(tmp_path):
    images = tmp_path / "images"
    write_images(images)
    root = tmp_path / "project"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "imagefolder", "root": str(images), "novel_classes": [2], "labels_per_class": 2, "test_fraction": 0.34}
    sh = dvc_project(root, params)

    assert ran_stages(sh("dvc", "repro", "prepare")) == ["source", "prepare"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    assert ran_stages(sh("dvc", "repro", "prepare")) == ["source"]  # same files: prepare skipped

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(images / "class1" / "3.png")
    sh("dvc", "repro", "source")  # `dvc status` compares the last fingerprint: refresh it first
    status = sh("dvc", "status", "prepare")
    assert "modified:" in status and "data/source.json" in status, status
    assert ran_stages(sh("dvc", "repro", "prepare")) == ["source", "prepare"]
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    prepared = lambda stage: next(o["md5"] for o in stage["outs"] if o["path"] == "data/prepared")  # noqa: E731
    assert prepared(after) != prepared(lock)  # the edited image is in the prepared arrays
