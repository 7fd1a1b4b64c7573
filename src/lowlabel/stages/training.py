"""What the training stages (pretrain, semisup) share: the Ray Train job, resume-safe outputs,
and loading the encoder files stages hand each other."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowlabel.atomic import OutputWriteError
from lowlabel.config import Params
from lowlabel.stages.common import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, StageError, write_csv, write_json


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
    stay until the stage has written its outputs (:func:`training_outputs`), so a failure
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


@contextmanager
def training_outputs(params: Params, ray_run: str) -> Iterator[None]:
    """Around the writing of a training stage's outputs (encoder, metrics, MLflow): the Ray run's
    checkpoints go only once all are written, so a full disk or a tracker failure at this point
    costs no training: the re-run resumes from the final checkpoint and only writes them."""
    from lowlabel.runner.launch import remove_run

    try:
        yield
    except OutputWriteError as error:
        raise StageError(
            f"{error}; the trained state is kept in the checkpoints of Ray run {ray_run} under "
            f"{params.runtime.storage_path}: free the space (or fix the permission) and re-run, it resumes without training again"
        ) from error
    remove_run(params.runtime.storage_path, ray_run)


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


def write_training_outputs(
    params: Params,
    ray_run: str,
    stage: str,
    method: str,
    encoder_state: dict[str, Any],
    data: Any,
    mlflow_run_id: str,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    extra_files: dict[str, Any] | None = None,
    **encoder_meta: Any,
) -> None:
    """A training stage's outputs, all or nothing: ``models/<stage>/<method>/`` (the encoder file,
    plus ``extra_files``: name -> object, e.g. the EMA classifier or a meta head) in one atomic
    folder, then metrics, plots and the MLflow model; the Ray run's checkpoints go only after
    (:func:`training_outputs`)."""
    from lowlabel.atomic import atomic_dir
    from lowlabel.models.store import ENCODER_FILE, atomic_torch_save, save_encoder
    from lowlabel.stages.common import MODELS_DIR

    out = MODELS_DIR / stage / method / ENCODER_FILE
    with training_outputs(params, ray_run):
        with atomic_dir(out.parent) as folder:
            save_encoder(
                folder / ENCODER_FILE, encoder_state, arch=params.encoder.arch, width=params.encoder.width,
                in_chans=data.in_chans, image_size=data.image_size, source=f"{stage}@{method}", mlflow_run_id=mlflow_run_id,
                **encoder_meta,
            )
            for name, obj in (extra_files or {}).items():
                atomic_torch_save(obj, folder / name)
        publish_training_outputs(stage, method, metrics, history, out, data.in_chans, data.image_size)
