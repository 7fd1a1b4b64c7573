"""Pretraining throughput: a full training step vs the bare forward+backward, same batch, same process.

    .venv/bin/python bench/ssl_throughput.py [--method simclr|moco] [--batch 256] [--steps 60] [--threads 1] [--loader-workers 0]

"full" = DataLoader (memory-mapped uint8 images, two albumentations views per image) +
forward + backward + optimiser step; "bare" = the same step on view tensors already in memory.
Also times the augmentation alone, to say which part costs the difference. Uses
data/prepared when present (run the prepare stage), else synthetic 28 px images.
"""

from __future__ import annotations

import argparse
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

from lowlabel.data.augment import contrastive_view
from lowlabel.data.datasets import ViewsDataset
from lowlabel.methods.ssl import PRETRAIN_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.train.optim import build_optimizer


def load_images() -> tuple[np.ndarray, str]:
    prepared = REPO / "data" / "prepared" / "train_images.npy"
    if prepared.is_file():
        return np.load(prepared, mmap_mode="r"), str(prepared)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20000, 28, 28, 1), dtype=np.uint8), "synthetic 28x28x1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="simclr", choices=sorted(PRETRAIN_METHODS))
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--channels-last", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, source = load_images()
    size, chans = images.shape[1], images.shape[3]
    view = contrastive_view(size, chans, [0.5] * chans, [0.25] * chans)
    dataset = ViewsDataset(images, np.arange(len(images)), [view, view], seed=0)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.loader_workers)

    encoder = build_encoder(args.arch, chans)
    kwargs = {"queue_size": args.batch * 16} if args.method == "moco" else {}
    method = PRETRAIN_METHODS[args.method](encoder, feature_dim(encoder, chans, size), **kwargs)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    method.to(memory_format=fmt)
    opt, _ = build_optimizer(method, 1000, optimizer="adamw", lr=1e-3, weight_decay=1e-4)

    def step(views):
        loss = method([v.contiguous(memory_format=fmt) for v in views])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_train_step_end(1, 1000)

    def endless():  # as many batches as asked for, epoch after epoch
        while True:
            yield from loader

    batches = endless()
    fixed = next(batches)[:2]
    for _ in range(3):  # warm-up (allocator, oneDNN kernels)
        step(fixed)

    start = time.perf_counter()
    for _ in range(args.steps):
        step(fixed)
    bare = args.steps * args.batch / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(batches)[:2])
    full = args.steps * args.batch / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    load = args.steps * args.batch / (time.perf_counter() - start)

    print(f"\n{args.method} / {args.arch}, batch {args.batch}, {args.threads} thread(s), loader workers {args.loader_workers}, "
          f"channels_last {bool(args.channels_last)}, data: {source}")
    print(f"{'what':<44}{'img/s':>10}")
    print(f"{'bare step (views already in memory)':<44}{bare:>10.0f}")
    print(f"{'full step (load + 2 views + step)':<44}{full:>10.0f}")
    print(f"{'loading + augmentation alone':<44}{load:>10.0f}")
    print(f"{'full / bare':<44}{full / bare:>10.2f}")
    print(f"{'time share of loading+aug in a full step':<44}{(1 / load) / (1 / full):>10.2f}")


if __name__ == "__main__":
    main()
