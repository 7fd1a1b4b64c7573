"""What every stage entry shares: argument parsing, clean errors, outputs written atomically."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import ConfigError, Params, flatten, load_params  # noqa: E402
from lowlabel.data.prepared import PreparedDataError, atomic_write_text  # noqa: E402
from lowlabel.data.sources import DataSourceError  # noqa: E402
from lowlabel.data.splits import SplitError  # noqa: E402
from lowlabel.runner.jobs import JobError  # noqa: E402
from lowlabel.runner.launch import ClusterError  # noqa: E402
from lowlabel.runner.storage import StorageError  # noqa: E402
from lowlabel.stages.preflight import PreflightError  # noqa: E402
from lowlabel.tracking import TAG_DVC_STAGE, TAG_METHOD, TAG_STAGE, resolve_tracking_uri, stage_run  # noqa: E402

PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")

log = logging.getLogger("lowlabel")


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


# Problems with the user's input or setup: shown as one clear line, no traceback.
USER_ERRORS = (ConfigError, StageError, JobError, DataSourceError, SplitError, PreparedDataError, ClusterError, StorageError, ConnectionError, PreflightError)


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def tracked_run(params: Params, *, stage: str, method: str, dvc_stage: str, sections: Iterable[str], tags: dict[str, str] | None = None, run_name: str | None = None):
    """The stage's MLflow run, with the params of ``sections`` flattened into it."""
    root = Path.cwd()
    flat = {}
    for section in sections:
        value = getattr(params, section)
        flat |= flatten(value, prefix=f"{section}.") if hasattr(value, "model_dump") else {section: value}
    if flat.get("runtime.workers") == "auto":
        # MLflow params cannot change: train_in_ray logs the resolved count under this name.
        flat["runtime.workers_setting"] = flat.pop("runtime.workers")
    return stage_run(
        tracking_uri=resolve_tracking_uri(params.tracking.uri, root),
        artifact_root=params.tracking.artifact_root,
        experiment=params.tracking.experiment,
        run_name=run_name or dvc_stage,
        tags={TAG_STAGE: stage, TAG_METHOD: method, TAG_DVC_STAGE: dvc_stage, **(tags or {})},
        params=flat,
        root=root,
    )


def _terminate(signum, frame):
    # SIGTERM (dvc/ray killing us) and SIGHUP (the ssh session of `ray submit` dropped) unwind
    # like Ctrl-C, so MLflow runs are closed as FAILED; checkpoints stay for the re-run.
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def stage_main(description: str, run: Callable[[Params, argparse.Namespace], None], add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        params = load_params(args.params)
        run(params, args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def resolve_auto_workers(params: Params, name: str) -> tuple[Params, str]:
    """``runtime.workers: auto`` -> the cluster's count (Ray comes up here), checked against the
    batch sizes before any worker starts, logged, and recorded where a fixed count would be:
    the MLflow param ``runtime.workers`` and the Ray run name (resume never mixes counts)."""
    import mlflow

    from lowlabel.runner.launch import cluster_address, ensure_ray, resolve_use_gpu, resolve_workers

    rt = params.runtime
    ensure_ray(cluster_address(rt.ray_address), rt.local_num_cpus)
    workers = resolve_workers("auto", rt.cpus_per_worker, resolve_use_gpu(rt.use_gpu))
    params = params.with_workers(workers)
    if mlflow.active_run() is not None:
        mlflow.log_param("runtime.workers", workers)
    return params, f"{name}-w{workers}"


def _diverged(error: BaseException, name: str) -> StageError | None:
    """A diverged run is the user's to fix (learning rate, clipping): one clear line instead of a
    Ray traceback. Its run folder stays, so a re-run resumes from the last good checkpoint."""
    found = re.search(r"NonFiniteLossError: (.+)", "".join(traceback.format_exception(error)))
    return StageError(f"{name}: {found.group(1)}") if found else None


def train_in_ray(params: Params, loop: Callable[[dict[str, Any]], None], config: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    """Run ``loop`` as a Ray Train job; (the state of its final checkpoint, the Ray run name).

    The MLflow run must be active: its id goes to the job's metrics sink. The run's checkpoints
    stay until the stage has written its outputs (:func:`drop_checkpoints`), so a failure
    while writing them (a full disk, a tracker outage) costs no training: a re-run resumes.
    """
    import mlflow

    from lowlabel.runner.jobs import common_config, run_job

    if params.runtime.workers == "auto":
        params, name = resolve_auto_workers(params, name)
    run = mlflow.active_run()
    config = {**config, **common_config(params, PREPARED_DIR, mlflow.get_tracking_uri(), run.info.run_id if run else None)}
    try:
        state = run_job(params, loop, config, name)
    except Exception as error:
        raise _diverged(error, name) or error  # noqa: B904 - the original error, unchanged
    return state, name


def drop_checkpoints(params: Params, name: str) -> None:
    """Once a stage's outputs are written: its Ray run's checkpoints go (a re-run starts afresh)."""
    from lowlabel.runner.launch import remove_run

    remove_run(params.runtime.storage_path, name)


def publish_training_outputs(
    stage: str, method: str, metrics: dict[str, Any], history: list[dict[str, Any]], encoder_file: Path, in_chans: int, image_size: int
) -> None:
    """A training stage's metrics JSON and per-epoch CSV (DVC metrics/plots), and the same in
    the active MLflow run with the encoder as a model."""
    import mlflow

    from lowlabel.models.store import load_encoder
    from lowlabel.tracking import log_encoder

    plot = PLOTS_DIR / stage / f"{method}.csv"
    write_json(METRICS_DIR / stage / f"{method}.json", metrics)
    write_csv(plot, history)
    mlflow.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    mlflow.log_artifact(str(plot))
    log_encoder(load_encoder(encoder_file)[0], in_chans, image_size)
