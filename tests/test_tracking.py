"""MLflow runs written to a real sqlite store and read back through the client."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lowlabel.tracking import TAG_STAGE, check_server, resolve_tracking_uri, stage_run

REPO = Path(__file__).resolve().parents[1]


def open_run(uri: str, tmp_path: Path, **kwargs):
    return stage_run(
        tracking_uri=uri,
        artifact_root=str(tmp_path / "artifacts"),
        experiment="exp",
        run_name="r",
        tags={TAG_STAGE: "pretrain"},
        params={"pretrain.epochs": 3, "data.novel_classes": [5, 6]},
        root=tmp_path,
        **kwargs,
    )


def only_run(uri: str, experiment: str = "exp"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_finished_run_has_params_tags_and_metrics(mlflow_uri, tmp_path):
    import mlflow

    with open_run(mlflow_uri, tmp_path) as run:
        mlflow.log_metric("knn_acc", 0.5, step=1)
    got = only_run(mlflow_uri)
    assert got.info.run_id == run.info.run_id
    assert got.info.status == "FINISHED"
    assert got.data.params["pretrain.epochs"] == "3"
    assert got.data.tags[TAG_STAGE] == "pretrain"
    assert "mlflow.source.git.commit" in got.data.tags
    assert got.data.metrics["knn_acc"] == 0.5


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_stage_marks_run_failed(mlflow_uri, tmp_path, error):
    with pytest.raises(type(error)), open_run(mlflow_uri, tmp_path):
        raise error
    assert only_run(mlflow_uri).info.status == "FAILED"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == "http://127.0.0.1:5999"


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match=r"127.0.0.1:9.*unreachable"):
        check_server("http://127.0.0.1:9", timeout_s=2)


def run_stage(module: str, cwd: Path, params: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_stage_with_bad_data_root_fails_cleanly(tmp_path):
    missing = tmp_path / "no-such-folder"
    proc = run_stage("lowlabel.stages.prepare", tmp_path, {"data": {"source": "imagefolder", "root": str(missing)}})
    assert proc.returncode == 2, proc.stderr
    assert "data.root" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "prepared").exists()
    assert only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "lowlabel").info.status == "FAILED"


def test_stage_with_bad_params_fails_before_any_run(tmp_path):
    proc = run_stage("lowlabel.stages.prepare", tmp_path, {"data": {"labels_per_class": -1}})
    assert proc.returncode == 2
    assert "params.yaml" in proc.stderr and "data.labels_per_class" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_pretrain_stage_stops_on_a_non_finite_loss_and_marks_the_run_failed(tmp_path, tiny_prepared):
    """A diverging run (absurd learning rate) stops with the epoch and step, leaves no encoder,
    ends its MLflow run FAILED and keeps its Ray run folder (the checkpoints a resume would use)."""
    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    params = {
        "encoder": {"width": 8},
        "runtime": {"workers": 1, "storage_path": str(tmp_path / "ray")},
        "pretrain": {"methods": ["simclr"], "epochs": 2, "min_steps": 0, "batch_size": 32, "eval_every": 5,
                     "optim": {"optimizer": "sgd", "lr": 1.0e30, "momentum": 0.0, "warmup_fraction": 0.0}},
        "semisup": {"init": "random"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "lowlabel.stages.pretrain", "--method", "simclr"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"error: .*loss is (nan|inf|-inf) at epoch 1 step \d+", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "models" / "pretrain" / "simclr" / "encoder.pt").exists()
    assert only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "lowlabel").info.status == "FAILED"
    assert [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith("pretrain-simclr-")], "the Ray run folder was removed"


@pytest.mark.slow
def test_a_hangup_mid_training_fails_the_run_and_a_rerun_resumes(tmp_path, tiny_prepared):
    """SIGHUP (the ssh session of a foreground `ray submit` dropped) to a pretraining stage in
    the middle of its job: the stage exits non-zero, its MLflow run ends FAILED (not RUNNING),
    no encoder is written and its checkpoints stay; the same stage run again resumes from them
    and finishes."""
    import signal
    import time

    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    storage = tmp_path / "ray"
    params = {
        "encoder": {"width": 8},
        "runtime": {"workers": 1, "storage_path": str(storage)},
        "pretrain": {"methods": ["simclr"], "epochs": 40, "min_steps": 0, "batch_size": 32, "eval_every": 100},
        "semisup": {"init": "random"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "lowlabel.stages.pretrain", "--method", "simclr"]
    with open(tmp_path / "first.log", "w") as log:
        stage = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not list(storage.glob("pretrain-simclr-*/checkpoint_*")):
                assert stage.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.2)
            os.killpg(stage.pid, signal.SIGHUP)
            rc = stage.wait(timeout=120)
        finally:
            if stage.poll() is None:
                os.killpg(stage.pid, signal.SIGKILL)
                stage.wait()
    first = (tmp_path / "first.log").read_text()
    assert rc != 0, first[-3000:]
    assert "epoch 40/40" not in first, "the job finished before the hangup: make it longer"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "models" / "pretrain" / "simclr" / "encoder.pt").exists()
    assert list(storage.glob("pretrain-simclr-*/checkpoint_*")), "the checkpoints a resume needs are gone"

    second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"resumed from the checkpoint of epoch [1-9]", second.stdout + second.stderr), (second.stdout + second.stderr)[-3000:]
    assert (tmp_path / "models" / "pretrain" / "simclr" / "encoder.pt").is_file()
    runs = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]


def test_experiment_is_tagged_as_model_development(mlflow_uri, tmp_path):
    """MLflow 3's UI opens an untagged experiment on its GenAI pages; ours opens on the runs.
    An experiment made before the tag existed gets it; a kind chosen by hand is kept."""
    from lowlabel.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    with open_run(mlflow_uri, tmp_path):
        pass
    client = MlflowClient(mlflow_uri)
    assert client.get_experiment_by_name("exp").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("old", "chosen"):
        with stage_run(tracking_uri=mlflow_uri, artifact_root=str(tmp_path / "a"), experiment=name, run_name="r", tags={}, params={}, root=tmp_path):
            pass
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_prepared_data_is_a_dataset_input_with_its_digest(mlflow_uri, tmp_path, tiny_prepared):
    """Data lineage: the run's inputs name the prepared data, its folder, its schema and a
    digest of its bytes (split manifest, class info, arrays) that changes with any of them."""
    import json

    import numpy as np

    from lowlabel.data.prepared import PreparedData, prepared_digest
    from lowlabel.runner.jobs import files_fingerprint
    from lowlabel.tracking import log_prepared_input

    data = PreparedData.load(tiny_prepared)
    digest = prepared_digest(tiny_prepared)
    assert digest == files_fingerprint(tiny_prepared) and len(digest) == 16
    with open_run(mlflow_uri, tmp_path) as run:
        log_prepared_input(data, "fashion_mnist", digest, context="training")
    inputs = MlflowClient(mlflow_uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("prepared/fashion_mnist", digest)
    assert json.loads(dataset.source)["uri"] == tiny_prepared.resolve().as_uri()
    schema = {spec["name"]: spec for spec in json.loads(dataset.schema)["mlflow_colspec"]}
    assert schema["train_images"]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 16, 16, 1]}
    assert schema["test_labels"]["tensor-spec"] == {"dtype": "int64", "shape": [-1]}
    assert [tag.value for tag in inputs[0].tags if tag.key == "mlflow.data.context"] == ["training"]

    changed = tmp_path / "changed"
    shutil.copytree(tiny_prepared, changed)
    split = json.loads((changed / "split.json").read_text())
    (changed / "split.json").write_text(json.dumps({**split, "seed": split.get("seed", 0) + 1}))
    assert prepared_digest(changed) != digest
    np.save(changed / "train_labels.npy", np.load(tiny_prepared / "train_labels.npy")[::-1].copy())
    shutil.copy(tiny_prepared / "split.json", changed / "split.json")
    assert prepared_digest(changed) != digest
