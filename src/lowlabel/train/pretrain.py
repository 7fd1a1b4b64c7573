"""Self-supervised pretraining loop, run by each Ray Train worker.

Each worker reads its own shard of the unlabeled base-class images (a memory map, so only
its rows are touched), makes two augmented views per image, and steps the method under DDP.
Every ``eval_every`` epochs rank 0 measures kNN accuracy of the frozen encoder on the
base-class test images (labels used for monitoring only). State is checkpointed every epoch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lowlabel.data import device_augment
from lowlabel.data.augment import contrastive_view, eval_view
from lowlabel.data.datasets import ImagesDataset, ViewsDataset
from lowlabel.data.prepared import PreparedData
from lowlabel.distributed import all_reduce_mean
from lowlabel.evaluation import extract_features, knn_accuracy, knn_split
from lowlabel.methods import PRETRAIN_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.runner.inputs import open_data
from lowlabel.runner.worker import (
    MetricsLogger,
    Progress,
    WorkerContext,
    check_finite,
    load_state,
    maybe_inject_fault,
    print_main,
    report,
    setup_worker,
)
from lowlabel.train.optim import build_optimizer


def epochs_for(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """``epochs``, or as many more whole epochs as reach ``min_steps`` optimiser steps: an epoch
    budget alone gives a small image folder almost no training (31 SimCLR steps for 4k images at
    2 epochs)."""
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def knn_monitor(ctx: WorkerContext, encoder: torch.nn.Module, data: PreparedData, k: int, bank_size: int | None, seed: int) -> float:
    view = eval_view(data.mean, data.std)
    bank, test = knn_split(data, bank_size, seed)
    bank_feats = extract_features(encoder, data.train_images, bank, view, device=ctx.device, channels_last=ctx.channels_last)
    test_feats = extract_features(encoder, data.test_images, test, view, device=ctx.device, channels_last=ctx.channels_last)
    return knn_accuracy(bank_feats, torch.from_numpy(data.train_labels[bank]), test_feats, torch.from_numpy(data.test_labels[test]), k=k)


def pretrain_loop(config: dict[str, Any]) -> None:
    ctx = setup_worker(config)
    data = open_data(config["data"])
    encoder = build_encoder(config["arch"], data.in_chans, config["width"])
    method = PRETRAIN_METHODS[config["method"]](encoder, feature_dim(encoder, data.in_chans, data.image_size), **config["method_kwargs"])

    # runtime.augment: views made per image in the DataLoader (cpu), or per batch here on ctx.device
    # from the uint8 images the DataLoader yields (device; seeded per (seed, epoch, step, rank, view)).
    device_view = None
    recipe = dict(crop_scale=tuple(config["crop_scale"]))
    if device_augment.resolve_augment(config.get("augment", "cpu"), ctx.device) == "device":
        device_view = device_augment.contrastive_view(data.image_size, data.in_chans, data.mean, data.std, **recipe).to(ctx.device)
        dataset = ImagesDataset(data.train_images, data.split.pretrain)
    else:
        view = contrastive_view(data.image_size, data.in_chans, data.mean, data.std, **recipe)
        dataset = ViewsDataset(data.train_images, data.split.pretrain, [view] * method.num_views, seed=config["seed"])
    per_worker = config["batch_size"] // ctx.world_size
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config["seed"], drop_last=True)
    loader = DataLoader(
        dataset, batch_size=per_worker, sampler=sampler, drop_last=True, num_workers=config["loader_workers"], pin_memory=ctx.device.type == "cuda"
    )
    steps_per_epoch = min(len(loader), config.get("max_steps_per_epoch") or len(loader))
    if steps_per_epoch == 0:
        raise ValueError(
            f"pretrain.batch_size={config['batch_size']} is larger than the {len(dataset)} pretraining images; lower it"
        )
    epochs = epochs_for(config["epochs"], config.get("min_steps", 0), steps_per_epoch)
    if epochs > config["epochs"]:
        print_main(ctx, f"[{config['label']}] {config['epochs']} epochs of {steps_per_epoch} steps < pretrain.min_steps={config['min_steps']}: training {epochs} epochs")
    total_steps = epochs * steps_per_epoch

    if ctx.channels_last:
        method.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(method)  # DDP when world > 1; `method` stays the inner module
    optimizer, schedule = build_optimizer(method, total_steps, **config["optim"])
    logger = MetricsLogger(ctx, config)
    logger.record_placement(ctx)
    # runtime.augment: auto resolves per device; the run says what it resolved to.
    logger.tag({"lowlabel.augment": "device" if device_view is not None else "cpu"})

    start_epoch, history = 0, []
    state = load_state(config)
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        print_main(ctx, f"[{config['label']}] resumed from the checkpoint of epoch {start_epoch}")
        logger.log({"resumed_at_epoch": start_epoch}, step=start_epoch)  # the restart, on the record
    elif ctx.is_main:
        # The encoder before any training: the random-init reference for the kNN curve.
        knn0 = knn_monitor(ctx, method.encoder, data, config["knn_k"], config["knn_bank_size"], config["seed"])
        history.append({"epoch": 0, "knn_acc": knn0})
        logger.log({"knn_acc": knn0}, step=0)
        print_main(ctx, f"[{config['label']}] epoch 0/{epochs} knn_acc {knn0:.4f} (initial encoder)")

    progress = Progress(config["label"], epochs, done_at_start=start_epoch)
    grad_clip = config.get("grad_clip")
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            maybe_inject_fault(config, ctx, epoch + 1, step)
            if device_view is None:
                views = [ctx.to_device(v) for v in batch[:-1]]
            else:
                images = batch[0].to(ctx.device, non_blocking=True)
                seeds = [device_augment.batch_seed(config["seed"], epoch, step, ctx.rank, v) for v in range(method.num_views)]
                views = [ctx.to_device(device_view(images, s)) for s in seeds]
            with ctx.autocast():
                loss = model(views)["loss"]
            check_finite(loss, epoch + 1, step)
            ctx.optimizer_step(loss, optimizer, method.parameters(), grad_clip)
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
        if ctx.is_main and ((epoch + 1) % config["eval_every"] == 0 or epoch + 1 == epochs):
            metrics["knn_acc"] = knn_monitor(ctx, method.encoder, data, config["knn_k"], config["knn_bank_size"], config["seed"])
        history.append({"epoch": epoch + 1, **metrics})
        logger.log(metrics, step=epoch + 1)
        print_main(ctx, progress.line(epoch + 1, images, seconds, metrics))
        state = {
            "model": method.state_dict(),
            "encoder": method.encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "history": history,
        }
        report(ctx, {"epoch": epoch + 1, **metrics}, state if ctx.is_main else None)
