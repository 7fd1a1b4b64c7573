"""Launch a training loop as a Ray Train ``TorchTrainer`` job.

Local embedded Ray when no cluster is named; ``RAY_ADDRESS`` (or ``runtime.ray_address``)
when one is. Resource requests are checked against the cluster before the job starts, so a
job that can never be scheduled fails at once instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lowlabel.env import SESSION_RAY_ENV, SESSION_RAY_WANTED, configure_quiet_env, verbose
from lowlabel.errors import UserError
from lowlabel.runner import warm
from lowlabel.runner.inputs import inputs_nbytes, ship_inputs
from lowlabel.runner.metrics_sink import metrics_sink
from lowlabel.runner.storage import Storage, StorageError

log = logging.getLogger(__name__)

# Local object store: at least this, else twice the job's inputs (they travel through it).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
CHECKPOINTS_KEPT = 2
HEALTH_CHECK_INTERVAL_S = 0.5
# How long a stage waits for the session's Ray to start (~7 s; ~25 s with a cold page cache).
SESSION_WAIT_S = 600.0
# The standard AWS variables pyarrow's S3 filesystem reads (endpoint, credentials, region).
STORAGE_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION",
)


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run the job as configured."""


def cluster_address(configured: str | None) -> str | None:
    """The cluster to attach to: ``RAY_ADDRESS``, ``runtime.ray_address``, else the local Ray of
    the session this stage runs in (``./pipeline repro``), else None (start one here)."""
    return os.environ.get("RAY_ADDRESS") or configured or session_address()


def session_address(timeout_s: float = SESSION_WAIT_S) -> str | None:
    """The address of the session's local Ray (lowlabel.runner.session starts it when the first
    stage asks, here); None outside a session."""
    path = os.environ.get(SESSION_RAY_ENV)
    if not path:
        return None
    if not os.path.exists(path):
        Path(path + SESSION_RAY_WANTED).touch()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ClusterError(f"the session's local Ray was not up after {timeout_s:.0f} s ({SESSION_RAY_ENV}={path})")
        if not os.path.isdir(os.path.dirname(path)):
            raise ClusterError(f"the session that was to start Ray has ended ({SESSION_RAY_ENV}={path})")
        time.sleep(0.05)
    published = json.loads(Path(path).read_text())
    if published["error"]:
        raise ClusterError(published["error"])
    _session["address"] = published["address"]
    return published["address"]


# The session's Ray address, once session_address has read it.
_session: dict[str, str] = {}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to the cluster's address first: ray.init on a dead address retries for
    minutes, this answers in seconds and leaves nothing running."""
    if address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, ""
    default_port = 10001 if scheme == "ray" else 6379
    try:
        socket.create_connection((host, int(port or default_port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS/runtime.ray_address={address!r}: {error}") from None


def ensure_ray(address: str | None, local_num_cpus: int | None = None, object_store_bytes: int = 0) -> None:
    """Connect to the named cluster, or start a local one sized for this machine."""
    if ray.is_initialized():
        return
    env_vars = configure_quiet_env()
    src_dir = str(Path(__file__).resolve().parents[2])
    # Workers on other nodes reach runtime.storage_path with the driver's endpoint and
    # credentials (nodes with an instance role need none: then none are set here).
    storage_env = {key: os.environ[key] for key in STORAGE_ENV if os.environ.get(key)}
    runtime_env = {"env_vars": {**env_vars, **storage_env, "PYTHONPATH": os.pathsep.join(filter(None, [src_dir, os.environ.get("PYTHONPATH")]))}}
    if not verbose():
        # Ray Train's per-report INFO lines come from a logger RunConfig's LoggingConfig does
        # not reach; each worker process raises it (LOWLABEL_VERBOSE=1 keeps Ray's logs).
        runtime_env["worker_process_setup_hook"] = "lowlabel.env.quiet_ray_worker_logs"
    server = os.environ.get(warm.WORKER_SOCKET_ENV)
    if address and address == _session.get("address") and server:
        # The session's own Ray, on this machine: its workers are forked from the warm-stage
        # server, with the stack imported (lowlabel.runner.warm_worker).
        runtime_env["py_executable"] = f"{shlex.quote(sys.executable)} -m lowlabel.runner.warm_worker"
        runtime_env["env_vars"][warm.WORKER_SOCKET_ENV] = server
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as error:  # ConnectionError, TimeoutError, RuntimeError depending on the failure
            raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS/runtime.ray_address={address!r}: {error}") from error
        return
    temp_dir = os.environ.get("LOWLABEL_RAY_TMP") or os.path.join(tempfile.gettempdir(), "lowlabel-ray")
    with _terminal_signals_ignored_by_children():
        ray.init(
            num_cpus=local_num_cpus or os.cpu_count(),
            object_store_memory=max(LOCAL_OBJECT_STORE_BYTES, 2 * object_store_bytes + 64 * 1024**2),
            runtime_env=runtime_env,
            _temp_dir=temp_dir,
            log_to_driver=True,
        )


@contextlib.contextmanager
def _terminal_signals_ignored_by_children() -> Iterator[None]:
    """Start the local Ray's daemons ignoring SIGHUP and SIGINT.

    They are this process's children, in its process group: a hangup (the terminal or the ssh
    session of `ray submit` gone) or a Ctrl-C meant for the stage would kill the GCS first, and
    the stage, unwinding, would then wait 60 s on it and abort without closing its MLflow run.
    An ignored signal stays ignored across exec, so the daemons (and the workers they start)
    sit these out; the stage still gets them, unwinds, and ray.shutdown() stops the daemons.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_use_gpu(use_gpu: str | bool) -> bool:
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(use_gpu)


def resolve_workers(workers: int | str, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float = 1.0) -> int:
    """``runtime.workers`` as a count; ``"auto"`` asks the cluster (Ray must be up).

    auto: one worker per GPU when training on GPU (``use_gpu`` already resolved), else
    floor(CPUs / cpus_per_worker); never more than the CPUs can hold, at least 1. It counts the
    nodes that are up now (total, not idle, resources: the same answer while other jobs run),
    so on an autoscaling cluster it sees only the nodes already started.
    """
    if workers != "auto":
        return int(workers)
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 0) // cpus_per_worker)
    count = min(int(total.get("GPU", 0) // gpus_per_worker), by_cpu) if use_gpu else by_cpu
    count = max(1, count)
    log.info(
        "runtime.workers=auto -> %d (cluster: %g CPU, %g GPU; cpus_per_worker=%g, use_gpu=%s)",
        count, total.get("CPU", 0), total.get("GPU", 0), cpus_per_worker, use_gpu,
    )
    return count


def check_resources(workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Fail fast when the cluster can never hold the requested workers."""
    total = ray.cluster_resources()
    asked = {"CPU": workers * cpus_per_worker, "GPU": workers if use_gpu else 0}
    short = {k: (v, total.get(k, 0)) for k, v in asked.items() if v > total.get(k, 0)}
    if short:
        detail = ", ".join(f"{k}: asked {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        raise ClusterError(
            f"runtime.workers={workers} x cpus_per_worker={cpus_per_worker:g}{' + 1 GPU' if use_gpu else ''} cannot be scheduled ({detail}); "
            "lower runtime.workers / runtime.cpus_per_worker or add nodes"
        )


def latest_checkpoint(storage: Storage, name: str, state_file: str = "state.pt") -> ray.train.Checkpoint | None:
    """The newest complete checkpoint a previous (killed or failed) run left under ``name``.

    Ray names checkpoint folders by timestamp; one whose state file does not load (the run was
    killed while writing it) is passed over for the one before. Loaded with ``weights_only``:
    anyone who can write to shared storage must not get code run on the driver. A state file
    the safe loader refuses for its content (not cut off: it holds objects no training loop
    writes) stops the stage naming it, rather than being passed over as if incomplete.
    """
    import io
    import pickle
    import warnings

    import torch

    for folder in reversed(storage.checkpoints(name)):
        state = f"{folder}/{state_file}"
        try:
            with warnings.catch_warnings():  # torch's notes on a foreign pickle protocol: noise here
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(storage.read_bytes(state)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise StorageError(
                f"{state} cannot be loaded: it holds code or objects other than weights, refused by the safe loader "
                f"(nothing in it was run); this checkpoint of Ray run {name} (runtime.storage_path) was not written "
                f"by training: inspect it, remove {folder} and re-run"
            ) from None
        except Exception:
            log.warning("skipping incomplete checkpoint %s", folder)
            continue
        return ray.train.Checkpoint(folder, filesystem=None if storage.is_local else storage.filesystem)
    return None


def run_training_job(
    train_loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    name: str,
    workers: int | str,
    use_gpu: str | bool,
    cpus_per_worker: float,
    storage_path: str,
    max_failures: int = 0,
    ray_address: str | None = None,
    local_num_cpus: int | None = None,
    gpus_per_worker: float = 1.0,
    inputs: str = "object_store",
    input_cache_mb: int = 256,
) -> ray.train.Result:
    """Run ``train_loop(config)`` on ``workers`` Ray Train workers; returns the Result.

    ``workers="auto"`` is resolved here (:func:`resolve_workers`); stages resolve it before
    (lowlabel.stages.training.resolve_auto_workers) to check it against their batch sizes.

    The run directory ``storage_path/name`` holds the checkpoints; a re-run under the same
    name resumes from its latest complete one (the loop reads ``ray.train.get_checkpoint()``),
    so a killed stage loses at most the epoch in progress.
    """
    storage = Storage.parse(storage_path)
    # Before Ray starts: a checkpoint that must not be loaded stops the stage right here.
    resume = latest_checkpoint(storage, name)
    ensure_ray(cluster_address(ray_address), local_num_cpus, object_store_bytes=0 if inputs == "storage" else inputs_nbytes(config))
    gpu = resolve_use_gpu(use_gpu)
    workers = resolve_workers(workers, cpus_per_worker, gpu, gpus_per_worker)
    check_resources(workers, cpus_per_worker, gpu)
    storage.check_writable()
    storage.check_visible_from_nodes()
    # A fraction < 1 lets several small jobs share one GPU (benchmark grids); stages use 1.
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpu else {})
    # Ray Train V2 neither resumes a re-run by itself nor keeps `resume_from_checkpoint`
    # (deprecated): the loop gets the checkpoint through its config and loads it when Ray has
    # no newer checkpoint of this job (ray.train.get_checkpoint() after a worker restart).
    if resume is not None:
        print(f"[{name}] resuming from {resume.path}", flush=True)
    # runtime.inputs: storage — the prepared data is read in place from the job's storage (copied
    # there once per content), not held whole by every node.
    config, shipped = ship_inputs(config, storage.uri if inputs == "storage" else None, input_cache_mb << 20)
    route = "copied to the job's storage (read in place)" if inputs == "storage" else "through the object store"
    print(f"[{name}] inputs: {shipped / 1e6:.1f} MB {route}; checkpoints: {storage.uri}", flush=True)
    # The controller polls its workers this often (Ray's default 2 s); a job's end is noticed a
    # poll late, ~1 s per job on average at 2 s. Passed on to the controller by Ray Train.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    with metrics_sink(config.get("tracking_uri"), config.get("run_id")) as sink:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={**config, "use_gpu": gpu, "resume_from": resume, "metrics_sink": sink, "inputs_bytes": shipped},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                **storage.run_config(),
                failure_config=FailureConfig(max_failures=max_failures),
                # The newest two: the one a resume reads, and the one before in case the newest
                # was cut off mid-write. A 1000-epoch run no longer fills the disk.
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                # Ray Train's per-report INFO lines drown the stage's own progress lines
                # (LOWLABEL_VERBOSE=1 brings them back).
                logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None and result.error is None and resume is not None:
        # Resumed from the final checkpoint (the stage had trained, then failed writing its
        # outputs): the loop had nothing left to do, so that checkpoint is the result.
        result = dataclasses.replace(result, checkpoint=resume)
    return result


def remove_run(storage_path: str, name: str) -> None:
    """Drop a finished run's checkpoints (called once its outputs are safely written)."""
    Storage.parse(storage_path).remove_run(name)
