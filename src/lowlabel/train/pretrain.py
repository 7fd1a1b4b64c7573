"""Self-supervised pretraining loop, run by each Ray Train worker.

Each worker reads its own shard of the unlabeled base-class images (a memory map, so only
its rows are touched), makes the method's augmented views of each image (two alike for most;
2 global + N smaller local ones for multi-crop DINO), and steps the method under DDP.
Every ``eval_every`` epochs rank 0 measures kNN accuracy of the frozen encoder on the
base-class test images (labels used for monitoring only). State is checkpointed every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lowlabel.data import device_augment
from lowlabel.data.augment import contrastive_view, eval_view
from lowlabel.data.datasets import ImagesDataset, ViewsDataset
from lowlabel.data.prepared import PreparedData
from lowlabel.distributed import all_reduce_mean
from lowlabel.evaluation import extract_features_distributed, knn_accuracy, knn_split
from lowlabel.methods.ssl import PRETRAIN_METHODS
from lowlabel.methods.ssl.base import SSLMethod, ViewSpec
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.runner.inputs import open_data
from lowlabel.runner.job_config import PretrainJob
from lowlabel.runner.worker import WorkerContext, check_finite, maybe_inject_fault, print_main, setup_worker
from lowlabel.train.loop import TrainingFrame
from lowlabel.train.optim import build_optimizer

V = TypeVar("V")


def epochs_for(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """``epochs``, or as many more whole epochs as reach ``min_steps`` optimiser steps: an epoch
    budget alone gives a small image folder almost no training (31 SimCLR steps for 4k images at
    2 epochs)."""
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def build_views(specs: list[ViewSpec], make: Callable[[int, tuple[float, float]], V]) -> list[V]:
    """One view per spec, ``make(size, crop_scale)`` called once per distinct spec (a method's
    identical views share one object, as they always have)."""
    made: dict[ViewSpec, V] = {}
    for spec in specs:
        if spec not in made:
            made[spec] = make(spec.size, tuple(spec.crop_scale))
    return [made[spec] for spec in specs]


def check_view_sizes(encoder: torch.nn.Module, in_chans: int, image_size: int, specs: list[ViewSpec], arch: str) -> None:
    """Views of several sizes (multi-crop) need an encoder whose features do not depend on the
    input size: globally pooled ones (WRN, ResNet, timm) do; Conv-4 flattens its last map, so
    its width changes with the size (the same only within one 16 px band: 16-31 px, 32-47 px...)."""
    sizes = sorted({spec.size for spec in specs})
    if sizes == [image_size]:
        return
    dims = {}
    for size in sizes:
        try:
            dims[size] = feature_dim(encoder, in_chans, size)
        except RuntimeError as error:  # a map pooled away to nothing
            dims[size] = f"none ({str(error).splitlines()[0]})"
    if len(set(dims.values())) > 1:
        raise ValueError(
            f"encoder.arch={arch!r} gives features of different widths at this method's view sizes {dims} (px: width): "
            "multi-crop needs a size-agnostic (globally pooled) encoder such as wrn28_2 or resnet18_cifar, "
            "or, for conv4, local crops in the image size's 16 px band (e.g. 16 px locals of 28 px images)"
        )


def knn_monitor(ctx: WorkerContext, encoder: torch.nn.Module, data: PreparedData, k: int, bank_size: int | None, seed: int) -> float:
    """Rank 0's encoder's weighted-kNN accuracy; a collective (every worker embeds a share)."""
    view = eval_view(data.mean, data.std)
    bank, test = knn_split(data, bank_size, seed)
    bank_feats = extract_features_distributed(encoder, data.train_images, bank, view, device=ctx.device, channels_last=ctx.channels_last)
    test_feats = extract_features_distributed(encoder, data.test_images, test, view, device=ctx.device, channels_last=ctx.channels_last)
    return knn_accuracy(bank_feats, torch.from_numpy(data.train_labels[bank]), test_feats, torch.from_numpy(data.test_labels[test]), k=k)


def build_ssl_method(name: str, method_kwargs: dict[str, Any], arch: str, width: int, data: PreparedData, global_batch: int) -> SSLMethod:
    """The SSL method ``name`` on a fresh ``arch`` encoder, its params section's data-dependent
    defaults (MoCo's queue size) resolved for ``data``'s pretraining images."""
    encoder = build_encoder(arch, data.in_chans, width)
    method_class = PRETRAIN_METHODS[name]
    kwargs = method_class.resolve_kwargs(dict(method_kwargs), num_images=len(data.split.pretrain), global_batch=global_batch)
    return method_class(encoder, feature_dim(encoder, data.in_chans, data.image_size), **kwargs)


def pretrain_loop(config: dict[str, Any]) -> None:
    job = PretrainJob.from_config(config)
    ctx = setup_worker(job)
    data = open_data(job.data)
    method = build_ssl_method(job.method, job.method_kwargs, job.arch, job.width, data, job.batch_size)
    encoder = method.encoder

    # runtime.augment: views made per image in the DataLoader (cpu), or per batch here on ctx.device
    # from the uint8 images the DataLoader yields (device; seeded per (seed, epoch, step, rank, view)).
    # The method's view recipes: num_views alike by default, several sizes for multi-crop (DINO).
    specs = method.view_specs(data.image_size, tuple(job.crop_scale))
    check_view_sizes(encoder, data.in_chans, data.image_size, specs, job.arch)
    device_views = None
    if device_augment.resolve_augment(job.augment, ctx.device) == "device":
        device_views = build_views(specs, lambda size, scale: device_augment.contrastive_view(
            size, data.in_chans, data.mean, data.std, crop_scale=scale).to(ctx.device))
        dataset = ImagesDataset(data.train_images, data.split.pretrain)
    else:
        views = build_views(specs, lambda size, scale: contrastive_view(size, data.in_chans, data.mean, data.std, crop_scale=scale))
        dataset = ViewsDataset(data.train_images, data.split.pretrain, views, seed=job.seed)
    per_worker = job.batch_size // ctx.world_size
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=job.seed, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=per_worker, sampler=sampler, drop_last=True, num_workers=job.loader_workers, pin_memory=ctx.device.type == "cuda"
    )
    steps_per_epoch = min(len(loader), job.max_steps_per_epoch or len(loader))
    if steps_per_epoch == 0:
        raise ValueError(f"pretrain.batch_size={job.batch_size} is larger than the {len(dataset)} pretraining images; lower it")
    epochs = epochs_for(job.epochs, job.min_steps, steps_per_epoch)
    if epochs > job.epochs:
        print_main(ctx, f"[{job.label}] {job.epochs} epochs of {steps_per_epoch} steps < pretrain.min_steps={job.min_steps}: training {epochs} epochs")
    total_steps = epochs * steps_per_epoch

    if ctx.channels_last:
        method.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(method)  # DDP when world > 1; `method` stays the inner module
    optimizer, schedule = build_optimizer(method, total_steps, **job.optim)
    frame = TrainingFrame(
        ctx, job, total=epochs, unit="epoch", stateful={"model": method, "optimizer": optimizer},
        extra_state=lambda: {"encoder": method.encoder.state_dict()},
    )
    # runtime.augment: auto resolves per device; the run says what it resolved to.
    frame.logger.tag({"lowlabel.augment": "device" if device_views is not None else "cpu"})

    def knn() -> float:
        return knn_monitor(ctx, method.encoder, data, job.knn_k, job.knn_bank_size, job.seed)

    start_epoch = frame.resume()
    if start_epoch == 0:
        # The encoder before any training: the random-init reference for the kNN curve.
        knn0 = knn()
        if ctx.is_main:
            frame.record(0, {"knn_acc": knn0})
        print_main(ctx, f"[{job.label}] epoch 0/{epochs} knn_acc {knn0:.4f} (initial encoder)")

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            maybe_inject_fault(job, ctx, epoch + 1, step)
            if device_views is None:
                views = [ctx.to_device(v) for v in batch[:-1]]
            else:
                images = batch[0].to(ctx.device, non_blocking=True)
                seeds = [device_augment.batch_seed(job.seed, epoch, step, ctx.rank, v) for v in range(len(device_views))]
                views = [ctx.to_device(view(images, s)) for view, s in zip(device_views, seeds)]
            with ctx.autocast():
                loss = model(views)["loss"]
            check_finite(loss, epoch + 1, step)
            ctx.optimizer_step(loss, optimizer, method.parameters(), job.grad_clip)
            global_step = epoch * steps_per_epoch + step + 1
            schedule.step_update(global_step)
            method.on_train_step_end(global_step, total_steps)
            loss_sum += loss.detach()
        seconds = time.perf_counter() - started
        images = steps_per_epoch * per_worker * ctx.world_size
        metrics = {
            "loss": all_reduce_mean(loss_sum / steps_per_epoch).item(),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images / seconds,
        }
        if (epoch + 1) % job.eval_every == 0 or epoch + 1 == epochs:
            knn_acc = knn()  # every worker embeds a share
            if ctx.is_main:
                metrics["knn_acc"] = knn_acc
        frame.end_period(epoch, metrics, images, seconds)
