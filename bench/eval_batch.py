"""Eval-mode encoder throughput by batch size on CPU, and whether outputs depend on it.

    .venv/bin/python bench/eval_batch.py [--arch conv4] [--size 28] [--channels 1] [--threads 1,2] [--images 4096]

Why lowlabel.models.batching embeds at batch 64 on CPU: small batches keep a layer's activations
in cache. Each batch size is timed over the same images, after a warm-up pass (the first pass at a
new shape pays oneDNN's set-up), and its outputs compared with one whole-batch pass
(max |difference|: 0 means bit-identical). Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.models.encoders import build_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batches", default="32,64,128,256,512")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = build_encoder(args.arch, args.channels, 64).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.images, args.channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{args.arch} at {args.size} px, {args.channels} channel(s), eval mode, channels-last, {args.images} images")
    print(f"{'threads':>7} {'batch':>6} {'img/s':>8} {'max |diff| vs one pass':>24}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            reference = encoder(x[:512])
            for batch in batches:
                for i in range(0, args.images, batch):  # warm-up: one pass per shape
                    encoder(x[i : i + batch])
                started = time.perf_counter()
                out = torch.cat([encoder(x[i : i + batch]) for i in range(0, args.images, batch)])
                rate = args.images / (time.perf_counter() - started)
                diff = (out[:512] - reference).abs().max().item()
                print(f"{threads:>7} {batch:>6} {rate:>8.0f} {diff:>24.3g}")


if __name__ == "__main__":
    main()
