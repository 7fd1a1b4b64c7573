"""Episodic meta-training loop (``meta@<method>``), per Ray Train worker.

Every optimiser step, each worker draws ``meta_batch / world`` episodes of its own (keyed by
(seed, rank, step, slot), so a resumed run draws exactly what an uninterrupted one would)
from the job's episode pool, and the method fills the parameters' gradients with the
meta-gradient averaged over every worker's episodes (lowlabel.meta.base.MetaMethod: explicit
all-reduce, no DDP). Every ``eval_every`` steps rank 0 scores ``eval_episodes`` fixed
episodes of the base classes' test images with the method's own test-time procedure.

Episode images are made on the training device from the uint8 images: normalised
(``labels``, ``pseudo``), or as per-sample random contrastive views (``unsupervised``,
UMTRA: the N images of an episode are its N classes, their views its shots and queries).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from lowlabel.data import device_augment
from lowlabel.data.prepared import PreparedData
from lowlabel.distributed import all_reduce_mean, average_buffers
from lowlabel.fewshot.sampler import Episode
from lowlabel.meta.base import MetaMethod, episode_accuracies
from lowlabel.meta.episodes import EpisodeSampler, EpisodicBatch, episode_seed, load_episode
from lowlabel.meta.registry import META_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.runner.inputs import open_data, open_init_encoder
from lowlabel.runner.job_config import MetaJob
from lowlabel.runner.worker import check_finite, maybe_inject_fault, setup_worker
from lowlabel.train.loop import TrainingFrame
from lowlabel.train.optim import build_optimizer

# The validation episodes' sampler key: apart from every training rank's stream.
EVAL_RANK = 1 << 20


def build_meta_method(job: MetaJob, in_chans: int, image_size: int) -> MetaMethod:
    encoder = build_encoder(job.arch, in_chans, job.width)
    init_state = open_init_encoder(job.init_encoder)
    if init_state is not None:
        encoder.load_state_dict(init_state)
    return META_METHODS[job.method](encoder, feature_dim(encoder, in_chans, image_size), job.ways, **job.method_kwargs)


class UnsupervisedEpisodes:
    """UMTRA episodes (Khodadadeh et al. 2019): ``ways`` distinct unlabeled images drawn by the
    episode's seed are its classes; ``shots`` + ``queries`` random views of each are its
    support and query samples (class-major, as :class:`EpisodicBatch` wants)."""

    def __init__(self, images: np.ndarray, pool: np.ndarray, ways: int, shots: int, queries: int, seed: int, rank: int, view: device_augment.DeviceView) -> None:
        if len(pool) < ways:
            raise ValueError(f"{len(pool)} unlabeled images cannot make a {ways}-way episode")
        self.images, self.pool, self.ways, self.shots, self.queries = images, pool, ways, shots, queries
        self.seed, self.rank, self.view = seed, rank, view

    def batch(self, step: int, index: int, device: torch.device) -> EpisodicBatch:
        key = episode_seed(self.seed, self.rank, step, index)
        chosen = np.sort(np.random.default_rng(key).choice(len(self.pool), self.ways, replace=False))
        x = device_augment.uint8_batch(self.images[self.pool[chosen]]).to(device)
        views = torch.stack([self.view(x, key ^ (v + 1)) for v in range(self.shots + self.queries)], dim=1)  # (ways, views, ...)

        def part(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            samples = views[:, start : start + count].reshape(self.ways * count, *views.shape[2:])
            return samples, torch.arange(self.ways, device=device).repeat_interleave(count)

        (sx, sy), (qx, qy) = part(0, self.shots), part(self.shots, self.queries)
        return EpisodicBatch(sx, sy, qx, qy, self.ways, self.shots, classes=self.pool[chosen])


class LabeledEpisodes:
    """Episodes over (image index, class) pairs: the labeled base images, or pseudo-labeled ones."""

    def __init__(self, load: Callable[[np.ndarray], torch.Tensor], pool: np.ndarray, labels: np.ndarray, ways: int, shots: int, queries: int, seed: int, rank: int) -> None:
        self.pool, self.load = pool, load
        self.sampler = EpisodeSampler(labels, None, ways, shots, queries, seed, rank)

    def batch(self, step: int, index: int, device: torch.device) -> EpisodicBatch:
        local = self.sampler.sample(step, index)
        episode = Episode(support=self.pool[local.support], query=self.pool[local.query], classes=local.classes)
        return load_episode(episode, self.load).to(device)


def validation_episodes(job: MetaJob, data: PreparedData, load: Callable[[np.ndarray], torch.Tensor]) -> LabeledEpisodes:
    """Fixed episodes of the base classes' test images (true labels: monitoring only)."""
    pool = np.asarray(data.split.test_base)
    return LabeledEpisodes(load, pool, data.test_labels[pool], job.ways, job.shots, job.queries, job.seed, EVAL_RANK)


def episode_accuracy(method: MetaMethod, episodes: LabeledEpisodes, count: int, device: torch.device) -> float:
    """Mean query accuracy of the first ``count`` validation episodes (each has as many queries)."""
    return float(episode_accuracies(method, (episodes.batch(0, i, device) for i in range(count))).mean())


def meta_loop(config: dict[str, Any]) -> None:
    job = MetaJob.from_config(config)
    ctx = setup_worker(job)
    data = open_data(job.data)
    method = build_meta_method(job, data.in_chans, data.image_size).to(ctx.device)
    per_worker = job.meta_batch // ctx.world_size
    normalise = device_augment.eval_view(data.mean, data.std).to(ctx.device)
    load = device_augment.view_loader(data.train_images.__getitem__, normalise, ctx.device)
    pool = np.asarray(job.pool_indices)
    if job.episodes_from == "unsupervised":
        contrastive = device_augment.contrastive_view(data.image_size, data.in_chans, data.mean, data.std, crop_scale=tuple(job.crop_scale)).to(ctx.device)
        source: UnsupervisedEpisodes | LabeledEpisodes = UnsupervisedEpisodes(
            data.train_images, pool, job.ways, job.shots, job.queries, job.seed, ctx.rank, contrastive
        )
    else:
        source = LabeledEpisodes(load, pool, np.asarray(job.pool_labels), job.ways, job.shots, job.queries, job.seed, ctx.rank)
    validation = validation_episodes(job, data, device_augment.view_loader(data.test_images.__getitem__, normalise, ctx.device)) if ctx.is_main else None

    optim = dict(job.optim) | (method.outer_optimizer() or {})
    optimizer, schedule = build_optimizer(method, job.steps, **optim)
    frame = TrainingFrame(
        ctx, job, total=job.steps, unit="step", units_per_period=job.eval_every, stateful={"model": method, "optimizer": optimizer},
        extra_state=lambda: {"encoder": method.encoder.state_dict()},
    )
    frame.logger.tag({"lowlabel.episodes_from": job.episodes_from})

    for period in range(frame.resume(), frame.periods):
        steps = frame.period_units(period)
        method.train()
        loss_sum = torch.zeros((), device=ctx.device)
        started = time.perf_counter()
        for step in steps:
            maybe_inject_fault(job, ctx, period + 1, step - steps.start)
            episodes = [source.batch(step, i, ctx.device) for i in range(per_worker)]
            optimizer.zero_grad(set_to_none=True)
            # fp16 would need loss scaling through the inner loops: meta-training runs fp32 there.
            with ctx.autocast() if ctx.amp_dtype != torch.float16 else nullcontext():
                loss = method.meta_gradients(episodes)
            check_finite(loss, period + 1, step)
            if job.grad_clip:
                torch.nn.utils.clip_grad_norm_(method.parameters(), job.grad_clip)
            optimizer.step()
            schedule.step_update(step + 1)
            loss_sum += loss
        seconds = time.perf_counter() - started
        average_buffers(method)  # BatchNorm statistics of every worker's episodes, before they are saved or used
        episodes_done = len(steps) * per_worker * ctx.world_size
        metrics = {
            "loss": all_reduce_mean(loss_sum / len(steps)).item(),
            "lr": optimizer.param_groups[0]["lr"],
            "episodes_per_s": episodes_done / seconds,
        }
        if validation is not None:
            metrics["val_acc"] = episode_accuracy(method, validation, job.eval_episodes, ctx.device)
        images = episodes_done * job.ways * (job.shots + job.queries)
        frame.end_period(period, metrics, images, seconds)
