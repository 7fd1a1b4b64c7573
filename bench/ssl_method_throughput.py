"""Each self-supervised method's full training step on CPU, beside SimCLR's, in one process.

    .venv/bin/python bench/ssl_method_throughput.py [--prepared DIR] [--methods simclr,moco,...]
        [--batch 256] [--steps 15] [--rounds 3] [--threads 1]

A full step as the pretrain loop runs it with ``runtime.augment: auto`` on CPU: a batch of uint8
images -> the method's own views made on the device (two alike for most, 2 global + the local
crops for DINO; ``SSLMethod.view_specs``) -> forward, backward, optimiser step, the method's
end-of-step hook (momentum updates). Methods use params.yaml's sections (MoCo's queue sized to
the data as in a run), Conv-4 (``encoder.*``). The methods take turns: ``--rounds`` rounds of
``--steps`` steps each, the order rotated every round, so load from other processes falls on
all of them alike; the table gives each method's median img/s over rounds and the median of its
per-round ratio to SimCLR. Images/s counts source images (one image = all of its views).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import PRETRAIN_METHODS as METHOD_NAMES
from lowlabel.config import load_params
from lowlabel.data import device_augment
from lowlabel.data.prepared import PreparedData
from lowlabel.train.optim import build_optimizer
from lowlabel.train.pretrain import build_ssl_method, build_views


def make_stepper(name: str, params, data: PreparedData, batch: int):
    """A closure running one full step of ``name`` on a given uint8 batch (seeded views)."""
    torch.manual_seed(0)
    method = build_ssl_method(name, getattr(params.pretrain, name).model_dump(), params.encoder.arch, params.encoder.width, data, batch)
    method.to(memory_format=torch.channels_last)
    specs = method.view_specs(data.image_size, tuple(params.pretrain.crop_scale))
    views = build_views(specs, lambda size, scale: device_augment.contrastive_view(size, data.in_chans, data.mean, data.std, crop_scale=scale))
    optim = params.pretrain.optim.model_dump(exclude={"grad_clip"})
    optimizer, _ = build_optimizer(method, 10_000, **optim)
    counter = {"step": 0}

    def step(images: torch.Tensor) -> None:
        counter["step"] += 1
        made = [v(images, device_augment.batch_seed(0, 0, counter["step"], 0, i)).contiguous(memory_format=torch.channels_last)
                for i, v in enumerate(views)]
        loss = method(made)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_train_step_end(counter["step"], 10_000)

    return step, len(specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    data = PreparedData.load(args.prepared)
    methods = args.methods.split(",")
    if "simclr" not in methods:
        methods.insert(0, "simclr")
    rng = np.random.default_rng(0)
    pool = data.split.pretrain

    def batch() -> torch.Tensor:
        return device_augment.uint8_batch(data.train_images[np.sort(rng.choice(pool, args.batch, replace=False))])

    steppers = {m: make_stepper(m, params, data, args.batch) for m in methods}
    for step, _ in steppers.values():  # warm-up: allocator, oneDNN kernels
        step(batch())
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            step = steppers[m][0]
            batches = [batch() for _ in range(args.steps)]
            started = time.perf_counter()
            for images in batches:
                step(images)
            rates[m].append(args.steps * args.batch / (time.perf_counter() - started))
            print(f"round {r + 1}/{args.rounds} {m:<12} {rates[m][-1]:8.0f} img/s", flush=True)

    print(f"\nfull step (views on the device, CPU), {params.encoder.arch}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps, data {args.prepared}")
    print("| method | views per image | img/s (median) | / SimCLR (median of rounds) |\n|---|---|---|---|")
    for m in methods:
        ratio = statistics.median(a / b for a, b in zip(rates[m], rates["simclr"]))
        print(f"| {m} | {steppers[m][1]} | {statistics.median(rates[m]):,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
