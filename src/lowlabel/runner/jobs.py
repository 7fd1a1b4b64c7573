"""Typed params -> the plain config dict a training loop receives, and the Ray run's name.

Stages and benchmarks build their Ray Train jobs here, so a benchmark runs exactly the job a
stage would (no MLflow needed: tracking keys are only added when a run is given).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lowlabel.config import Params
from lowlabel.errors import UserError
from lowlabel.runner.launch import run_training_job
from lowlabel.runner.worker import read_state

# The per-epoch monitor uses a fixed 5k subset of the base training images as its bank,
# to stay cheap; the fewshot stage reports kNN against all of them.
KNN_BANK_SIZE = 5000


class JobError(UserError, RuntimeError):
    """A training job ended without what it must leave behind."""


def run_job(
    params: Params,
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    name: str,
    *,
    storage_path: str | None = None,
    gpus_per_worker: float = 1.0,
) -> dict[str, Any]:
    """Run ``loop(config)`` as the Ray Train job ``params.runtime`` describes; the state of its
    final checkpoint. Errors of the workers are raised (Ray Train raises most from ``fit()``)."""
    rt = params.runtime
    result = run_training_job(
        loop, config, name=name, workers=rt.workers, use_gpu=rt.use_gpu, cpus_per_worker=rt.cpus_per_worker,
        storage_path=storage_path or rt.storage_path, max_failures=rt.max_failures, ray_address=rt.ray_address,
        local_num_cpus=rt.local_num_cpus, gpus_per_worker=gpus_per_worker, inputs=rt.inputs, input_cache_mb=rt.input_cache_mb,
    )
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise JobError(f"Ray run {name} finished without a checkpoint")
    return read_state(result.checkpoint)


def params_hash(*sections: Any) -> str:
    """Short stable hash of the params that define a run (names its Ray run dir, for resume)."""
    blob = json.dumps([s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def files_fingerprint(*paths: str | Path, suffix: str = "") -> str:
    """sha256 over the names and bytes of the files at ``paths`` (folders walked in sorted order;
    with ``suffix``, only files ending so). Part of a Ray run's name: a killed stage resumes
    only a run of the same code and the same inputs."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            if not file.name.endswith(suffix):
                continue
            name = file.relative_to(root) if root.is_dir() else file.name
            digest.update(f"{name}\0{file.stat().st_size}\0".encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


@functools.cache
def code_fingerprint() -> str:
    """The lowlabel package's source, as a Ray run sees it (every module a job may import)."""
    return files_fingerprint(Path(__file__).resolve().parents[1], suffix=".py")


def common_config(params: Params, data_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Keys every training loop reads."""
    rt = params.runtime
    return {
        "seed": params.seed,
        # A driver-side folder: run_training_job ships its contents to the workers.
        "data": str(Path(data_dir).resolve()),
        "arch": params.encoder.arch,
        "width": params.encoder.width,
        "loader_workers": rt.loader_workers,
        "cpus_per_worker": rt.cpus_per_worker,
        "amp": rt.amp,
        "augment": rt.augment,  # auto | cpu | device: resolved in the worker (lowlabel.data.device_augment.resolve_augment)
        "tracking_uri": tracking_uri,
        "run_id": run_id,
    }


def pretrain_job(params: Params, method: str, inputs: tuple[str | Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """(loop config without the common keys, Ray run name) of ``pretrain@<method>``; the name
    hashes the params, the code and the files ``inputs`` (the prepared data). Data-dependent
    defaults of the method (MoCo's queue size) are resolved in the worker
    (``SSLMethod.resolve_kwargs``): this module imports no method code."""
    cfg = params.pretrain
    kwargs = getattr(cfg, method).model_dump()
    config = {
        "label": f"pretrain@{method}",
        "method": method,
        "method_kwargs": kwargs,
        "epochs": cfg.epochs,
        "min_steps": cfg.min_steps,
        "batch_size": cfg.batch_size,
        "max_steps_per_epoch": cfg.max_steps_per_epoch,
        "optim": cfg.optim.model_dump(exclude={"grad_clip"}),
        "grad_clip": cfg.optim.grad_clip,
        "crop_scale": list(cfg.crop_scale),
        "eval_every": cfg.eval_every,
        "knn_k": cfg.knn_k,
        "knn_bank_size": KNN_BANK_SIZE,
    }
    fingerprint = [code_fingerprint(), files_fingerprint(*inputs)]
    name = f"pretrain-{method}-{params_hash(params.seed, params.data, params.encoder, params.runtime, cfg, fingerprint)}"
    return config, name


def semisup_job(params: Params, method: str, init_encoder: str | None, inputs: tuple[str | Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """(loop config without the common keys, Ray run name) of ``semisup@<method>``; the name
    hashes the params, the code, the starting encoder and the files ``inputs``."""
    cfg = params.semisup
    config = {
        "label": f"semisup@{method}",
        "method": method,
        "init_encoder": init_encoder,
        "head_init": cfg.head_init,
        "steps": cfg.steps,
        "eval_every": cfg.eval_every,
        "batch_size": cfg.batch_size,
        "optim": cfg.optim.model_dump(exclude={"grad_clip"}),
        "grad_clip": cfg.optim.grad_clip,
        "ema_decay": cfg.ema_decay,
        "method_kwargs": getattr(cfg, method).model_dump() if hasattr(cfg, method) else {},
        "randaugment": cfg.randaugment.model_dump(),
    }
    fingerprint = [code_fingerprint(), files_fingerprint(*inputs, *([init_encoder] if init_encoder else []))]
    name = f"semisup-{method}-{params_hash(params.seed, params.data, params.encoder, params.runtime, cfg, fingerprint)}"
    return config, name


def meta_job(
    params: Params,
    method: str,
    init_encoder: str | None,
    pool_indices: np.ndarray,
    pool_labels: np.ndarray | None,
    inputs: tuple[str | Path, ...] = (),
) -> tuple[dict[str, Any], str]:
    """(loop config without the common keys, Ray run name) of ``meta@<method>``. The episode
    pool (image indices, and their classes unless unsupervised) is made by the stage; the
    name hashes the params, the code, the starting encoder, the pool and the files ``inputs``."""
    cfg = params.meta
    section = getattr(cfg, method, None)
    config = {
        "label": f"meta@{method}",
        "method": method,
        "method_kwargs": section.model_dump() if section is not None else {},
        "init_encoder": init_encoder,
        "episodes_from": cfg.episodes_from,
        "pool_indices": np.asarray(pool_indices, dtype=np.int64),
        "pool_labels": None if pool_labels is None else np.asarray(pool_labels, dtype=np.int64),
        "ways": cfg.ways,
        "shots": cfg.shots,
        "queries": cfg.queries,
        "meta_batch": cfg.meta_batch,
        "steps": cfg.steps,
        "eval_every": cfg.eval_every,
        "eval_episodes": cfg.eval_episodes,
        "optim": cfg.optim.model_dump(exclude={"grad_clip"}),
        "grad_clip": cfg.optim.grad_clip,
        "crop_scale": list(cfg.crop_scale),
    }
    pool = hashlib.sha256(np.ascontiguousarray(config["pool_indices"]).tobytes())
    if pool_labels is not None:
        pool.update(np.ascontiguousarray(config["pool_labels"]).tobytes())
    fingerprint = [code_fingerprint(), files_fingerprint(*inputs, *([init_encoder] if init_encoder else [])), pool.hexdigest()]
    name = f"meta-{method}-{params_hash(params.seed, params.data, params.encoder, params.runtime, cfg, fingerprint)}"
    return config, name
