"""Process environment that keeps the stack quiet and offline-safe.

Set before the libraries are imported: albumentations calls the network at import, Ray
sends usage stats, MLflow and DVC send telemetry. Ray's token auth is left as Ray sets it (on
for a local Ray from 2.59): a laptop's embedded Ray must not take jobs from the network. Values the user already
set win (``setdefault``), so a cluster can still opt in.
"""

from __future__ import annotations

import os

QUIET_ENV: dict[str, str] = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    # Ray Train V2 is the supported API from Ray 2.50 on; pin it so behaviour does not flip.
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    # Ray Train tees print() into its logger as well; progress lines would show twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}

# ``LOWLABEL_VERBOSE=1`` brings Ray's own INFO logs back (see :func:`verbose`).
VERBOSE_ENV = "LOWLABEL_VERBOSE"
# Set by lowlabel.runner.session for its command: the file its local Ray's address is published
# to. A stage that needs Ray creates this path + SESSION_RAY_WANTED and waits for the file.
SESSION_RAY_ENV = "LOWLABEL_SESSION_RAY"
SESSION_RAY_WANTED = ".wanted"

# Applied unless verbose. Ray Train 2.60 starts a PreemptionWatcher actor per job whose only
# work is to log node drains (spot preemptions); creating it makes the controller's core
# worker print an E-level "core_worker.cc ... PreemptionWatcher ... has constructor arguments
# in the object store" line on every job, which is no error. Off by default; a cluster on
# preemptible nodes that wants those log lines sets RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1.
RAY_QUIET_ENV: dict[str, str] = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def verbose() -> bool:
    """``LOWLABEL_VERBOSE`` set to anything but empty/0/false/no: Ray logs as it does by default."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def configure_quiet_env() -> dict[str, str]:
    """Apply :data:`QUIET_ENV` (and, unless :func:`verbose`, :data:`RAY_QUIET_ENV`) defaults;
    returns the values now in force (for Ray workers, with ``LOWLABEL_VERBOSE`` when set)."""
    defaults = QUIET_ENV if verbose() else QUIET_ENV | RAY_QUIET_ENV
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    keys = [*QUIET_ENV, *RAY_QUIET_ENV, VERBOSE_ENV]
    return {key: os.environ[key] for key in keys if key in os.environ}


def quiet_ray_worker_logs() -> None:
    """Ray worker-process setup hook (``runtime_env["worker_process_setup_hook"]``, set by
    lowlabel.runner.launch.ensure_ray unless :func:`verbose`).

    Ray Train 2.60 logs a ``Reporting training result N: TrainingReport(...)`` INFO line per
    ``ray.train.report`` through ``logging.getLogger(__file__)`` of its execution context
    module: a logger named by a file path, outside ``ray.train``, so RunConfig's
    ``LoggingConfig(log_level=...)`` (which filters ``ray.train.*`` only) leaves it at the
    root's INFO. Raised to WARNING here, in each worker process; its warnings still show.
    """
    import logging
    import os

    import ray

    # The logger's name is that module's file; the path is built, not imported: every worker
    # process runs this hook, and importing Ray Train costs ~1.5 s in those that never use it
    # (the job's MLflow metrics sink).
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    if os.path.exists(context):  # else another Ray layout: nothing to quiet
        logging.getLogger(context).setLevel(logging.WARNING)
