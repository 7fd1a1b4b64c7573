"""MLflow tracking: one experiment, one run per stage (per method), tagged so runs line up.

The driver opens the run and always closes it: FINISHED on success, FAILED on any error or
interrupt, so no run is left RUNNING. Ray workers log metrics into it from rank 0 by run id.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowlabel.env import configure_quiet_env

configure_quiet_env()

import mlflow  # noqa: E402  (after the quiet environment is in place)
from mlflow.tracking import MlflowClient  # noqa: E402

TAG_STAGE = "lowlabel.stage"
TAG_METHOD = "lowlabel.method"
TAG_DVC_STAGE = "lowlabel.dvc_stage"
TAG_INIT_RUN = "lowlabel.init_run_id"
TAG_ENCODER = "lowlabel.encoder"


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative sqlite path is made absolute (workers have another cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def artifact_location(artifact_root: str, root: Path) -> str:
    if "://" in artifact_root:
        return artifact_root
    return (root / artifact_root).resolve().as_uri()


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if commit and dirty.strip() else "")


def experiment_id(client: MlflowClient, name: str, location: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=f"{location.rstrip('/')}/{name}")


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer within seconds, or the stage stops before training."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except OSError as error:
        raise ConnectionError(f"MLflow tracking server {uri} (tracking.uri / MLFLOW_TRACKING_URI) is unreachable: {error}") from None


@contextmanager
def stage_run(
    *,
    tracking_uri: str,
    artifact_root: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    root: Path,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run for a stage; end it FINISHED, or FAILED if the body raises."""
    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, artifact_location(artifact_root, root))
    all_tags = {"mlflow.source.git.commit": git_commit(root), **tags}
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
    try:
        # MLflow caps a param value at 6000 chars; lists of ints can be long.
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm"]


def log_encoder(encoder, in_chans: int, image_size: int, name: str = "encoder") -> None:
    """The encoder as an MLflow PyTorch model, with a signature from an example batch.

    Requirements are given, so MLflow does not spend seconds inferring them.
    """
    import mlflow.pytorch
    import numpy as np

    example = np.zeros((2, in_chans, image_size, image_size), dtype=np.float32)
    mlflow.pytorch.log_model(encoder.cpu().eval(), name=name, input_example=example, pip_requirements=PIP_REQUIREMENTS)
