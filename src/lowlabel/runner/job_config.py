"""Typed configs of the training jobs, as each Ray Train worker reads them.

Ray ships a job's config to its workers as a plain mapping (``train_loop_config``), which the
launcher edits on the way (file inputs become object-store refs, the metrics sink and the
checkpoint to resume from are added). A loop's first line turns that mapping into one of
these frozen dataclasses with :meth:`JobConfig.from_config`, so a misspelt or missing key
fails at the start of the job, naming it, and the loop body reads typed attributes.
``lowlabel.runner.jobs`` builds the mappings from ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self


class JobConfigError(TypeError):
    """A job's config mapping does not match its typed config (a programming error)."""


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """What every training loop reads: set by ``runner.jobs.common_config`` and the launcher."""

    label: str  # e.g. "pretrain@simclr": prefixes the job's progress lines
    seed: int
    data: Any  # the prepared data: a driver-side folder, shipped as an object ref (runner.inputs)
    arch: str
    width: int
    loader_workers: int = 0
    cpus_per_worker: float = 1
    amp: str = "auto"  # auto | off | bf16 | fp16
    augment: str = "cpu"  # auto | cpu | device (resolved per device in the worker)
    tracking_uri: str | None = None
    run_id: str | None = None
    # Set by runner.launch.run_training_job:
    use_gpu: bool = False
    resume_from: Any = None  # a previous run's newest complete checkpoint
    metrics_sink: Any = None  # the actor that logs rank 0's metrics to the MLflow run
    inputs_bytes: int = 0
    # Test hook (runner.worker.maybe_inject_fault).
    fault_injection: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise JobConfigError(f"{cls.__name__}: unknown keys {unknown} (allowed: {sorted(names)})")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in config and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise JobConfigError(f"{cls.__name__}: missing keys {missing}")
        return cls(**config)


@dataclass(frozen=True, kw_only=True)
class PretrainJob(JobConfig):
    method: str
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    epochs: int
    min_steps: int = 0  # floor on optimiser steps (more epochs for a small folder)
    batch_size: int  # global
    max_steps_per_epoch: int | None = None
    optim: Mapping[str, Any]  # lowlabel.train.optim.build_optimizer keywords
    grad_clip: float | None = None
    crop_scale: tuple[float, float] | list[float] = (0.2, 1.0)
    eval_every: int = 1
    knn_k: int = 20
    knn_bank_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class SemisupJob(JobConfig):
    method: str
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    init_encoder: Any = None  # a driver-side encoder file, shipped as an object ref; None: random
    head_init: str = "random"  # random | linear_probe
    steps: int
    eval_every: int
    batch_size: int  # labeled, global
    optim: Mapping[str, Any]
    grad_clip: float | None = None
    ema_decay: float = 0.999
    randaugment: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MetaJob(JobConfig):
    method: str  # protonet | matchingnet | relationnet | maml | reptile
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    init_encoder: Any = None
    # labels | pseudo | unsupervised; for labels and pseudo the pool is (indices into the
    # training images, their class); unsupervised episodes draw from `pool_indices` alone.
    episodes_from: str = "labels"
    pool_indices: Any = None
    pool_labels: Any = None
    ways: int
    shots: int
    queries: int
    meta_batch: int  # episodes per optimiser step, over all workers
    steps: int
    eval_every: int
    eval_episodes: int = 100
    optim: Mapping[str, Any]
    grad_clip: float | None = None
    crop_scale: tuple[float, float] | list[float] = (0.2, 1.0)  # unsupervised episodes' views
