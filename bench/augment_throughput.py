"""Augmentation on CPU per image (albumentations, DataLoader) vs batched on the training device
(lowlabel.data.device_augment), alone and inside a full SimCLR / FixMatch step; CPU tensors here.

    .venv/bin/python bench/augment_throughput.py [--threads 1 2] [--steps 4] [--arch conv4] [--size 32 --channels 3]

Rows, for each thread count:
- "aug": the views alone, img/s (source images per second) at batch 256: SimCLR's two contrastive
  views; FixMatch's unlabeled weak + strong views. cpu = ViewsDataset through a DataLoader with
  loader_workers 0 (as the CPU default runs it), device = DataLoader of uint8 + the batched views.
- "step": full training step (load + views + forward + backward + optimiser) vs "bare" (the same
  step on views already in memory), img/s as the loops count them (SimCLR: batch 256; FixMatch:
  batch 32 labeled + mu 7 x 32 unlabeled, the params.yaml defaults, images = 32 + 2 x 224).
Uses data/prepared when present (run the prepare stage), else (or with --size) synthetic images.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import parse_params
from lowlabel.data import augment as cpu
from lowlabel.data import device_augment as dev
from lowlabel.data.datasets import ImagesDataset, ViewsDataset
from lowlabel.methods.semisup import SEMISUP_REGISTRY
from lowlabel.methods.ssl import PRETRAIN_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.models.heads import Classifier
from lowlabel.train.optim import build_optimizer


def load_images(size: int | None, channels: int) -> tuple[np.ndarray, str]:
    prepared = REPO / "data" / "prepared" / "train_images.npy"
    if size is None and prepared.is_file():
        return np.load(prepared, mmap_mode="r"), str(prepared)
    size = size or 28
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (8192, size, size, channels), dtype=np.uint8), f"synthetic {size}x{size}x{channels}"


def endless(loader: DataLoader):
    while True:
        yield from loader


def timed(fn, steps: int, images_per_step: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels, kornia's first call)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * images_per_step / (time.perf_counter() - started)


class Sources:
    """The two ways a training loop gets its views: ``next_views()`` -> list of float view batches."""

    def __init__(self, images: np.ndarray, cpu_views, device_views, batch: int, seed: int) -> None:
        index = np.arange(len(images))
        self.batch = batch
        self.cpu = endless(DataLoader(ViewsDataset(images, index, cpu_views, seed=seed), batch_size=batch, shuffle=True, drop_last=True))
        self.raw = endless(DataLoader(ImagesDataset(images, index), batch_size=batch, shuffle=True, drop_last=True))
        self.device_views = device_views
        self.step = 0

    def next_views(self, path: str) -> list[torch.Tensor]:
        if path == "cpu":
            return list(next(self.cpu)[:-1])
        self.step += 1
        images = next(self.raw)[0]
        return [view(images, dev.batch_seed(0, 0, self.step, 0, v)) for v, view in enumerate(self.device_views)]


def simclr_rows(images: np.ndarray, arch: str, steps: int, batch: int) -> list[tuple[str, str, float]]:
    size, chans = images.shape[1], images.shape[3]
    mean, std = [0.5] * chans, [0.25] * chans
    sources = Sources(images, [cpu.contrastive_view(size, chans, mean, std)] * 2, [dev.contrastive_view(size, chans, mean, std)] * 2, batch, 0)
    encoder = build_encoder(arch, chans)
    method = PRETRAIN_METHODS["simclr"](encoder, feature_dim(encoder, chans, size)).to(memory_format=torch.channels_last)
    opt, _ = build_optimizer(method, 1000, optimizer="adamw", lr=1e-3, weight_decay=1e-4)

    def train(views):
        loss = method([v.contiguous(memory_format=torch.channels_last) for v in views])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fixed = sources.next_views("cpu")
    bare = timed(lambda: train(fixed), steps, batch)
    rows = []
    for path in ("cpu", "device"):
        rows.append(("SimCLR", f"aug alone ({path})", timed(lambda p=path: sources.next_views(p), steps, batch)))
        rows.append(("SimCLR", f"full step ({path})", timed(lambda p=path: train(sources.next_views(p)), steps, batch)))
    # bare timed before and after the others, the faster kept (the first steps still warm up the allocator)
    return [("SimCLR", "bare step", max(bare, timed(lambda: train(fixed), steps, batch))), *rows]


def fixmatch_rows(images: np.ndarray, arch: str, steps: int) -> list[tuple[str, str, float]]:
    params = parse_params({})
    cfg = params.semisup
    kwargs = cfg.fixmatch.model_dump()
    batch, mu = cfg.batch_size, kwargs["mu"]
    size, chans = images.shape[1], images.shape[3]
    mean, std = [0.5] * chans, [0.25] * chans
    ra = cfg.randaugment.model_dump()
    labeled = Sources(images, [cpu.weak_view(size, mean, std)], [dev.weak_view(size, mean, std)], batch, 0)
    unlabeled = Sources(
        images,
        [cpu.weak_view(size, mean, std), cpu.strong_view(size, chans, mean, std, **ra)],
        [dev.weak_view(size, mean, std), dev.strong_view(size, chans, mean, std, **ra)],
        batch * mu,
        1,
    )
    encoder = build_encoder(arch, chans)
    model = Classifier(encoder, feature_dim(encoder, chans, size), 10).to(memory_format=torch.channels_last)
    spec = SEMISUP_REGISTRY["fixmatch"]
    teacher = copy.deepcopy(model).eval() if kwargs.get("teacher") == "ema" else None
    state = spec.make_state(10, kwargs)
    opt, _ = build_optimizer(model, 1000, **cfg.optim.model_dump(exclude={"grad_clip"}))
    y = torch.randint(0, 10, (batch,))
    u_true = torch.zeros(batch * mu, dtype=torch.long)

    def train(x, u_weak, u_strong):
        cl = torch.channels_last
        # as the loop does: the method's kwargs, its running statistics, the EMA teacher (a frozen copy: same cost)
        step_kwargs = {**kwargs, **state, "step": 0, "total_steps": 1000, "teacher": teacher}
        u = {"u_weak": u_weak.contiguous(memory_format=cl), "u_strong": u_strong.contiguous(memory_format=cl), "u_true": u_true}
        out = spec.step(model, x.contiguous(memory_format=cl), y, **u, **step_kwargs)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def views(path):
        return labeled.next_views(path) + unlabeled.next_views(path)

    n = batch + 2 * batch * mu
    fixed = views("cpu")
    bare = timed(lambda: train(*fixed), steps, n)
    rows = []
    for path in ("cpu", "device"):
        rows.append(("FixMatch", f"aug alone ({path})", timed(lambda p=path: views(p), steps, n)))
        rows.append(("FixMatch", f"full step ({path})", timed(lambda p=path: train(*views(p)), steps, n)))
    return [("FixMatch", "bare step", max(bare, timed(lambda: train(*fixed), steps, n))), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=None, help="synthetic images of this side (default: data/prepared, else 28)")
    parser.add_argument("--channels", type=int, default=1, choices=[1, 3], help="of the synthetic images")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, source = load_images(args.size, args.channels)
    table: dict[tuple[str, str], dict[int, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for recipe, what, rate in itertools.chain(simclr_rows(images, args.arch, args.steps, args.batch), fixmatch_rows(images, args.arch, args.steps)):
            table.setdefault((recipe, what), {})[threads] = rate
    print(f"\n{args.arch}, data: {source}, {args.steps} timed steps after 1 warm-up, img/s (source images per second)")
    header = "| recipe | what | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in args.threads) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.threads)))
    for (recipe, what), rates in table.items():
        print(f"| {recipe} | {what} | " + " | ".join(f"{rates[t]:.0f}" for t in args.threads) + " |")
    for recipe in ("SimCLR", "FixMatch"):
        for path in ("cpu", "device"):
            full = {t: table[(recipe, f"full step ({path})")][t] / table[(recipe, "bare step")][t] for t in args.threads}
            print(f"{recipe} full/bare ({path}): " + ", ".join(f"{full[t]:.2f} at {t} thread(s)" for t in args.threads))


if __name__ == "__main__":
    main()
