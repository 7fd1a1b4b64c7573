"""Semi-supervised training loop (FixMatch, UDA, FreeMatch, or the supervised-only baseline), per Ray worker.

Training is counted in steps; every ``eval_every`` steps is one chunk: metrics, an EMA
test-accuracy check and a checkpoint. Each chunk's data order is a function of
(seed, chunk, rank), so a run resumed from a chunk checkpoint continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray.train.torch
import torch
from timm.utils import ModelEmaV3
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from lowlabel.data import device_augment
from lowlabel.data.augment import eval_view, strong_view, weak_view
from lowlabel.data.datasets import ImagesDataset, ViewsDataset
from lowlabel.data.prepared import PreparedData
from lowlabel.data.samplers import BalancedSampler, ShardedCycleSampler
from lowlabel.distributed import all_reduce_mean
from lowlabel.evaluation import extract_features, extract_features_distributed
from lowlabel.methods.semisup import SEMISUP_REGISTRY
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.models.heads import Classifier, fit_linear_head
from lowlabel.runner.inputs import open_data, open_init_encoder
from lowlabel.runner.job_config import SemisupJob
from lowlabel.runner.worker import check_finite, maybe_inject_fault, print_main, setup_worker
from lowlabel.train.loop import StateGroup, TrainingFrame
from lowlabel.train.optim import build_optimizer


def test_predictions(
    model: torch.nn.Module, data: PreparedData, device: torch.device | str = "cpu", channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) base labels of the base-class test images, by rank 0's model; a
    collective in a distributed job (every worker scores a share)."""
    idx = np.asarray(data.split.test_base)
    logits = extract_features_distributed(model, data.test_images, idx, eval_view(data.mean, data.std), device=device, channels_last=channels_last)
    return logits.argmax(1).numpy(), data.base_label(data.test_labels[idx])


def test_accuracy(model: torch.nn.Module, data: PreparedData, device: torch.device, channels_last: bool) -> float:
    predicted, truth = test_predictions(model, data, device, channels_last)
    return (predicted == truth).mean().item()


def semisup_loop(config: dict[str, Any]) -> None:
    job = SemisupJob.from_config(config)
    ctx = setup_worker(job)
    data = open_data(job.data)
    spec = SEMISUP_REGISTRY[job.method]
    encoder = build_encoder(job.arch, data.in_chans, job.width)
    init_state = open_init_encoder(job.init_encoder)
    if init_state is not None:
        encoder.load_state_dict(init_state)
    model_inner = Classifier(encoder, feature_dim(encoder, data.in_chans, data.image_size), len(data.split.base_classes))
    labeled = np.asarray(data.split.labeled)
    labeled_targets = data.base_label(data.train_labels[labeled])
    if job.head_init == "linear_probe":
        # BN running statistics re-estimated on the labeled images first (a random encoder's are
        # still the init's 0/1, so its eval-mode features would not be the ones training sees);
        # the same features and fit on every worker (deterministic), so the replicas start alike.
        view = eval_view(data.mean, data.std)
        update_bn([view.batch(data.train_images[labeled]).contiguous()], encoder)
        fit_linear_head(model_inner.fc, extract_features(encoder, data.train_images, labeled, view), labeled_targets)

    size, channels = data.image_size, data.in_chans
    # runtime.augment: views made per image in the DataLoader (cpu), or per batch in the loop on
    # ctx.device from the uint8 images the DataLoader yields (device; seeded per (seed, chunk, step, rank, view)).
    on_device = device_augment.resolve_augment(job.augment, ctx.device) == "device"
    unlabeled_ds: ViewsDataset | ImagesDataset | None = None
    # The unlabeled views the method asks for (FixMatch: weak + strong; Mean Teacher, MixMatch:
    # two weak), made by the CPU or the device recipes; only the recipes used are built.
    view_names = spec.unlabeled_views if spec.uses_unlabeled else ()
    unlabeled = np.asarray(data.split.unlabeled, dtype=np.int64)  # may be empty: every base image labeled
    # True labels ride along for the pseudo-label accuracy monitor only.
    unlabeled_targets = data.base_label(data.train_labels[unlabeled])
    if on_device:
        device_weak = device_augment.weak_view(size, data.mean, data.std).to(ctx.device)
        device_views = [
            device_weak if name == "weak" else device_augment.strong_view(size, channels, data.mean, data.std, **job.randaugment).to(ctx.device)
            for name in view_names
        ]
        labeled_ds: ViewsDataset | ImagesDataset = ImagesDataset(data.train_images, labeled, targets=labeled_targets)
        if spec.uses_unlabeled:
            unlabeled_ds = ImagesDataset(data.train_images, unlabeled, targets=unlabeled_targets, with_position=spec.uses_index)
    else:
        weak = weak_view(size, data.mean, data.std)
        labeled_ds = ViewsDataset(data.train_images, labeled, [weak], targets=labeled_targets, seed=job.seed)
        if spec.uses_unlabeled:
            unlabeled_ds = ViewsDataset(
                data.train_images,
                unlabeled,
                [weak if name == "weak" else strong_view(size, channels, data.mean, data.std, **job.randaugment) for name in view_names],
                targets=unlabeled_targets,
                seed=job.seed + 1,
                with_position=spec.uses_index,
            )

    per_worker = job.batch_size // ctx.world_size
    if len(labeled) < job.batch_size:
        print_main(ctx, f"[{job.label}] {len(labeled)} labeled images < batch {job.batch_size}: sampling them with replacement, class-balanced")
    steps = job.steps

    if ctx.channels_last:
        model_inner.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model_inner)
    optimizer, schedule = build_optimizer(model_inner, steps, **job.optim)
    ema = ModelEmaV3(model_inner, decay=job.ema_decay, use_warmup=True)
    method_kwargs = dict(job.method_kwargs)
    # Running statistics of the method (aligner, thresholds): passed to the step by name, checkpointed.
    state_kwargs = method_kwargs | ({"num_unlabeled": len(unlabeled)} if spec.uses_index else {})
    method_state = {key: module.to(ctx.device) for key, module in spec.make_state(len(data.split.base_classes), state_kwargs).items()}
    # The EMA model labels the weak view in eval mode (its BN running statistics), never trained.
    teacher = ema.module if method_kwargs.get("teacher") == "ema" else None

    # A period is `eval_every` steps ("chunk"): metrics, an EMA test accuracy, a checkpoint.
    frame = TrainingFrame(
        ctx, job, total=steps, unit="step", units_per_period=job.eval_every,
        stateful={"model": model_inner, "ema": ema.module, "optimizer": optimizer, "method_state": StateGroup(method_state)},
    )
    # runtime.augment: auto resolves per device; the run says what it resolved to.
    frame.logger.tag({"lowlabel.augment": "device" if on_device else "cpu"})
    for chunk in range(frame.resume(), frame.periods):
        first = frame.period_units(chunk).start
        n_steps = len(frame.period_units(chunk))
        labeled_ds.set_epoch(chunk)
        labeled_loader = DataLoader(
            labeled_ds,
            batch_size=per_worker,
            sampler=BalancedSampler(labeled_ds.targets, n_steps * per_worker, job.seed, chunk, ctx.rank),
            num_workers=job.loader_workers,
        )
        loaders: list[DataLoader] = [labeled_loader]
        if unlabeled_ds is not None:
            unlabeled_ds.set_epoch(chunk)
            mu_batch = per_worker * method_kwargs["mu"]
            loaders.append(
                DataLoader(
                    unlabeled_ds,
                    batch_size=mu_batch,
                    sampler=ShardedCycleSampler(len(unlabeled_ds), n_steps * mu_batch, ctx.rank, ctx.world_size, job.seed, chunk),
                    num_workers=job.loader_workers,
                )
            )
        model.train()
        sums: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        for i, batches in enumerate(zip(*loaders)):
            maybe_inject_fault(job, ctx, chunk + 1, i)  # test hook; chunks play the role of epochs
            if on_device:  # the CPU path's streams: labeled (seed), unlabeled view k (seed + 1, k)
                images, labels = batches[0]
                seed = device_augment.batch_seed(job.seed, chunk, i, ctx.rank, 0)
                views: list[tuple[torch.Tensor, ...]] = [(device_weak(images.to(ctx.device, non_blocking=True), seed), labels)]
                if unlabeled_ds is not None:
                    images, *rest = batches[1]
                    images = images.to(ctx.device, non_blocking=True)
                    seeds = [device_augment.batch_seed(job.seed + 1, chunk, i, ctx.rank, k) for k in range(len(device_views))]
                    views.append((*(view(images, s) for view, s in zip(device_views, seeds)), *rest))
                batches = tuple(views)
            x, y = ctx.to_device(batches[0][0]), batches[0][1].to(ctx.device)
            kwargs: dict[str, Any] = {**method_kwargs, **method_state, "step": first + i, "total_steps": steps, "teacher": teacher}
            if unlabeled_ds is not None:
                u_views, rest = batches[1][: len(view_names)], batches[1][len(view_names) :]
                kwargs |= dict(zip(("u_weak", "u_strong"), (ctx.to_device(v) for v in u_views)), u_true=rest[0].to(ctx.device))
                if spec.uses_index:
                    kwargs["u_index"] = rest[1].to(ctx.device)
            with ctx.autocast():
                out = spec.step(model, x, y, **kwargs)
            check_finite(out["loss"], chunk + 1, first + i)
            ctx.optimizer_step(out["loss"], optimizer, model_inner.parameters(), job.grad_clip)
            schedule.step_update(first + i + 1)
            ema.update(model_inner, step=first + i)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        seconds = time.perf_counter() - started
        images = n_steps * per_worker * ctx.world_size * (1 + len(view_names) * method_kwargs.get("mu", 0))
        metrics = {key: all_reduce_mean(value / n_steps).item() for key, value in sums.items()}
        metrics |= {"lr": optimizer.param_groups[0]["lr"], "images_per_s": images / seconds}
        accuracies = {  # every worker scores a share
            "test_acc": test_accuracy(model_inner, data, ctx.device, ctx.channels_last),
            "test_acc_ema": test_accuracy(ema.module, data, ctx.device, ctx.channels_last),
        }
        if ctx.is_main:
            metrics |= accuracies
        frame.end_period(chunk, metrics, images, seconds)
