"""Settings that cannot work with the prepared data stop the first training stage before it trains."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import synthetic_images

from lowlabel.config import ConfigError, parse_params
from lowlabel.data.prepared import PreparedData, channel_stats, write_prepared
from lowlabel.data.splits import make_split
from lowlabel.stages.preflight import PreflightError, check_before_training, pipeline_problems

REPO = Path(__file__).resolve().parents[1]
# tiny_prepared: 4 base classes x 40 training images (2 labeled each), 2 novel classes x 20 test images.
FITS = {"pretrain": {"batch_size": 32}, "fewshot": {"shots": [1, 5], "queries": 15}}


def params(**sections):
    raw = {key: dict(value) for key, value in FITS.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_params(raw)


def test_settings_that_fit_pass(tiny_prepared):
    data = PreparedData.load(tiny_prepared)
    assert pipeline_problems(params(), data) == []
    check_before_training(params(), data)


def test_each_problem_names_its_settings_and_the_data(tiny_prepared):
    data = PreparedData.load(tiny_prepared)
    assert pipeline_problems(params(pretrain={"batch_size": 256}), data) == [
        "pretrain.batch_size=256 is larger than the 160 base-class training images (data.max_train_per_class=None)"
    ]
    assert pipeline_problems(params(fewshot={"shots": [1, 5, 10]}), data) == [
        "fewshot.shots (up to 10) + fewshot.queries (15) need 25 images of every novel class; "
        "data.novel_pool='test' has fewer for class(es) {4: 20, 5: 20} (class: images)"
    ]
    with pytest.raises(PreflightError, match=rf"^{tiny_prepared}: pretrain.batch_size=998 .*; fewshot.shots \(up to 5\) \+ fewshot.queries \(16\)"):
        check_before_training(params(pretrain={"batch_size": 998}, fewshot={"queries": 16}), data)


def test_every_image_labeled_leaves_semisup_methods_nothing(tmp_path):
    train_x, train_y = synthetic_images(10, 3, seed=1)
    test_x, test_y = synthetic_images(20, 3, seed=2)
    split = make_split(train_y, test_y, novel_classes=[2], labels_per_class=10, seed=0)
    assert split.unlabeled == []
    mean, std = channel_stats(train_x[split.pretrain])
    write_prepared(tmp_path, train_x, train_y, test_x, test_y, split, {"class_names": ["0", "1", "2"], "mean": mean, "std": std, "skipped": []})
    data = PreparedData.load(tmp_path)
    base = {"pretrain": {"batch_size": 16}, "data": {"labels_per_class": 10}}
    assert pipeline_problems(params(**base, semisup={"methods": ["fixmatch", "supervised"]}), data) == [
        "data.labels_per_class=10 labels every base-class training image: semisup.methods ['fixmatch'] need unlabeled images"
    ]
    assert pipeline_problems(params(**base, semisup={"methods": ["supervised"]}), data) == []


def test_no_novel_class_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.novel_classes.*at least one class"):
        parse_params({"data": {"novel_classes": []}})


def test_pretrain_stage_stops_before_tracking_or_ray(tmp_path, tiny_prepared):
    """Exit 2, one line naming the settings, in seconds: no MLflow store, no Ray, no outputs."""
    import shutil

    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"methods": ["simclr"], "batch_size": 512}, "fewshot": FITS["fewshot"]}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowlabel.stages.pretrain", "--method", "simclr"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data/prepared: pretrain.batch_size=512 is larger than the 160 base-class training images (data.max_train_per_class=None)"], proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()
    print(f"stage refused in {time.perf_counter() - started:.1f} s")
