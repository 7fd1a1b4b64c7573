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


def configure_quiet_env() -> dict[str, str]:
    """Apply :data:`QUIET_ENV` defaults; returns the values now in force (for Ray workers)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in QUIET_ENV}
