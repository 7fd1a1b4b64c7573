"""Faults that must cost no training: the tracking server going away mid-training, and a disk
that fills up just when a stage writes its encoder. Real processes throughout: the pretrain
stage as a subprocess (Ray Train job), a real MLflow server, a size-limited tmpfs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
STAGE = [sys.executable, "-m", "lowlabel.stages.pretrain", "--method", "simclr"]


def stage_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def write_params(workdir: Path, storage: Path, epochs: int, tracking_uri: str | None = None) -> None:
    params = {
        "encoder": {"width": 8},
        "runtime": {"workers": 1, "storage_path": str(storage)},
        "pretrain": {"methods": ["simclr"], "epochs": epochs, "min_steps": 0, "batch_size": 32, "eval_every": 1000},
        "semisup": {"init": "random"},
    }
    if tracking_uri:
        params["tracking"] = {"uri": tracking_uri, "artifact_root": str(workdir / "mlartifacts")}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(db: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_group(server)
                pytest.fail(f"mlflow server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, log.read_text()):
        assert proc.poll() is None, f"the stage ended before /{pattern}/: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no /{pattern}/ within {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_tracking_server_outage_mid_training_loses_no_metric(tmp_path, tiny_prepared):
    """The MLflow server is stopped after the first epoch and started again (same store, same
    port) several epochs later: training goes on meanwhile, the stage finishes, and every
    epoch's metrics reach the run (the sink keeps what it could not deliver and retries)."""
    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    epochs, port = 16, free_port()
    db, artifacts, server_log = tmp_path / "server.db", tmp_path / "mlartifacts", tmp_path / "server.log"
    write_params(tmp_path, tmp_path / "ray", epochs, tracking_uri=f"http://127.0.0.1:{port}")
    server = start_mlflow_server(db, artifacts, port, server_log)
    stage_log = tmp_path / "stage.log"
    with stage_log.open("w") as out:
        stage = subprocess.Popen(STAGE, cwd=tmp_path, env=stage_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(stage_log, rf"epoch 1/{epochs}\b", stage, 240)
        stop_group(server)
        wait_for_line(stage_log, rf"epoch 6/{epochs}\b", stage, 240)
        server = start_mlflow_server(db, artifacts, port, server_log)
        rc = stage.wait(timeout=300)
    finally:
        stop_group(stage)
    try:
        text = stage_log.read_text()
        assert rc == 0, text[-3000:]
        assert f"epoch {epochs}/{epochs}" in text
        assert "could not be delivered" not in text, text[-3000:]
        client = MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id])
        assert run.info.status == "FINISHED"
        # Every epoch's loss, including those trained while the server was down.
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, epochs + 1))
        assert "lowlabel.metrics_undelivered" not in run.data.tags
    finally:
        stop_group(server)


def _tmpfs_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a size-limited tmpfs"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "needs mount/umount"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_tmpfs_reason() is not None, reason=str(_tmpfs_reason()))
def test_full_disk_at_the_encoder_write_keeps_the_training_and_a_rerun_resumes(tmp_path, tiny_prepared):
    """``models/`` on a 1 MiB tmpfs filled to the brim: the stage trains, fails writing its
    encoder with one line that names the output and the cause, leaves no partial output nor
    temporary file, ends its MLflow run FAILED and keeps its checkpoints. With space freed, the
    re-run resumes from the final checkpoint (no epoch trained again) and writes the encoder."""
    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    epochs, storage, models = 3, tmp_path / "ray", tmp_path / "models"
    write_params(tmp_path, storage, epochs)
    models.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(models)], check=True)
    try:
        filler = models / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # every block, none left for the encoder
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        first = subprocess.run(STAGE, cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert first.returncode == 2, first.stderr[-3000:]
        last = first.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"error: cannot write models/pretrain/simclr: No space left on device; .*re-run.*", last), last
        assert f"epoch {epochs}/{epochs}" in first.stdout + first.stderr, "the training did not finish before the write"
        leftovers = [str(p.relative_to(models)) for p in models.rglob("*") if p != filler and p.is_file()]
        assert leftovers == [], f"partial output or temporary files left behind: {leftovers}"
        assert not (tmp_path / "metrics").exists() or not list((tmp_path / "metrics").rglob("*.json"))
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("lowlabel").experiment_id
        assert [r.info.status for r in client.search_runs([experiment])] == ["FAILED"]
        assert list(storage.glob("pretrain-simclr-*/checkpoint_*")), "the checkpoints a resume needs are gone"

        filler.unlink()
        second = subprocess.run(STAGE, cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=300)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-3000:]
        assert f"resumed from the checkpoint of epoch {epochs}" in output, output[-3000:]
        assert not re.search(r"epoch [1-9]\d*/\d+ ", output.split("resumed from the checkpoint")[1]), "an epoch was trained again"
        assert (models / "pretrain" / "simclr" / "encoder.pt").is_file()
        assert not list(storage.glob("pretrain-simclr-*/checkpoint_*")), "the checkpoints stay after the outputs are written"
        runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
        assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)
