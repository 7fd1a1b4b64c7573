"""A default stage run shows the stage's own progress, not Ray Train's per-report INFO lines nor
the E-level core_worker line its PreemptionWatcher actor causes; LOWLABEL_VERBOSE=1 brings
Ray's logs back. Real pretraining stages (1 Ray Train worker, tiny data) in subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY_NOISE = ("Reporting training result", "PreemptionWatcher")


def pretrain(tmp_path: Path, tiny_prepared: Path, **env_extra: str) -> str:
    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    params = {
        "encoder": {"width": 8},
        "runtime": {"workers": 1, "storage_path": str(tmp_path / "ray")},
        "pretrain": {"methods": ["simclr"], "epochs": 2, "min_steps": 0, "batch_size": 32, "eval_every": 1},
        "semisup": {"init": "random"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env_extra}
    for key in ("MLFLOW_TRACKING_URI", "LOWLABEL_VERBOSE", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        if key not in env_extra:
            env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "lowlabel.stages.pretrain", "--method", "simclr"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output


def test_default_stage_run_is_quiet_and_keeps_progress_lines(tmp_path, tiny_prepared):
    output = pretrain(tmp_path, tiny_prepared)
    assert re.search(r"\[pretrain@simclr\] epoch 1/2 loss .*knn_acc", output) and "epoch 2/2 loss" in output, output[-3000:]
    noisy = [line for line in output.splitlines() if any(noise in line for noise in RAY_NOISE)]
    assert not noisy, "\n".join(noisy)
    # The same real stage run, for data lineage: its MLflow run names the prepared data it trained on.
    from mlflow.tracking import MlflowClient

    from lowlabel.data.prepared import prepared_digest

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id])
    datasets = [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs]
    assert datasets == [("prepared/fashion_mnist", prepared_digest(tiny_prepared))]


def test_verbose_brings_ray_logs_back(tmp_path, tiny_prepared):
    """Also proves the quiet test above looks for lines Ray really prints."""
    output = pretrain(tmp_path, tiny_prepared, LOWLABEL_VERBOSE="1")
    assert "epoch 2/2 loss" in output
    for noise in RAY_NOISE:
        assert noise in output, f"{noise!r} not in a verbose run:\n{output[-3000:]}"
