"""The MLflow UI/REST server the README's `./pipeline ui` starts, serving a store a stage wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lowlabel.tracking import TAG_STAGE, stage_run

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_ui_server_lists_the_stage_runs(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run(tracking_uri=uri, artifact_root=str(tmp_path / "art"), experiment="lowlabel", run_name="pretrain@simclr",
                   tags={TAG_STAGE: "pretrain"}, params={"pretrain.epochs": 2}, root=tmp_path):
        mlflow.log_metric("knn_acc", 0.87, step=2)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow ui did not come up within 60 s")
                time.sleep(0.5)
        experiments = get_json(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        exp_id = next(e["experiment_id"] for e in experiments if e["name"] == "lowlabel")
        runs = get_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        assert {"key": "knn_acc", "value": 0.87} in [{"key": m["key"], "value": m["value"]} for m in run["data"]["metrics"]]
        assert {"key": TAG_STAGE, "value": "pretrain"} in run["data"]["tags"]
        assert urllib.request.urlopen(base, timeout=5).status == 200  # the UI page itself
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
