"""One self-supervised method under several recipes or budgets on one prepared dataset.

    .venv/bin/python bench/pretrain_sweep.py PREPARED_DIR --method moco [--params params.yaml]
        --variant default --variant "m0.9=pretrain.moco.momentum=0.9"
        --variant "800 steps=pretrain.min_steps=800;pretrain.eval_every=2" [--storage DIR]

Each variant (``label=key=value;key=value``, or a bare label for params as they are) is the
Ray Train job the pretrain stage launches (``runner.jobs.pretrain_job`` + ``pretrain_loop``) on
PREPARED_DIR (a pipeline's ``data/prepared``), with the params file plus the variant's
overrides. Prints the kNN accuracy of the encoder on the base-class test images at each
evaluation (the loop's monitor; epoch 0 is the random init), the loss of the first and last
epoch, the optimiser steps and the job's wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import parse_params
from lowlabel.data.prepared import PreparedData
from lowlabel.presets import set_param
from lowlabel.runner.jobs import common_config, pretrain_job, run_job
from lowlabel.runner.launch import remove_run
from lowlabel.train.pretrain import epochs_for, pretrain_loop


def parse_variant(text: str) -> tuple[str, list[tuple[str, str]]]:
    label, _, overrides = text.partition("=")
    pairs = [tuple(item.split("=", 1)) for item in overrides.split(";") if item]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variant {text!r}: expected 'label=key=value;key=value'")
    return label, pairs  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--variant", action="append", default=[], help="label=key=value;key=value (repeatable)")
    parser.add_argument("--storage", default=None, help="Ray Train storage (default: a temp dir)")
    args = parser.parse_args()
    data = PreparedData.load(args.prepared)
    storage = args.storage or tempfile.mkdtemp(prefix="lowlabel-sweep-")
    rows = []
    for label, pairs in map(parse_variant, args.variant or ["default"]):
        raw = yaml.safe_load(args.params.read_text())
        for key, value in pairs:
            set_param(raw, key, value)
        params = parse_params(raw, source=f"{args.params} + variant {label!r}")
        config, name = pretrain_job(params, args.method)
        started = time.perf_counter()
        state = run_job(params, pretrain_loop, {**common_config(params, args.prepared), **config}, f"{name}-sweep", storage_path=storage)
        seconds = time.perf_counter() - started
        remove_run(storage, f"{name}-sweep")
        history = state["history"]
        knn = [(h["epoch"], h["knn_acc"]) for h in history if "knn_acc" in h]
        losses = [h["loss"] for h in history if "loss" in h]
        steps_per_epoch = min(len(data.split.pretrain) // params.pretrain.batch_size, params.pretrain.max_steps_per_epoch or 10**9)
        epochs = epochs_for(params.pretrain.epochs, params.pretrain.min_steps, steps_per_epoch)
        rows.append((label, epochs * steps_per_epoch, knn, losses[0], losses[-1], seconds))
        print(f"{label}: kNN {' -> '.join(f'{a * 100:.1f}' for _, a in knn)}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {seconds:.0f} s", flush=True)

    print(f"\n{args.method} on {args.prepared} ({len(data.split.pretrain)} pretraining images); kNN on base test images, % (epoch: value)")
    print("| variant | steps | kNN by epoch | loss first -> last epoch | wall s |\n|---|---|---|---|---|")
    for label, steps, knn, first, last, seconds in rows:
        curve = ", ".join(f"{e}: {a * 100:.1f}" for e, a in knn)
        print(f"| {label} | {steps} | {curve} | {first:.3f} -> {last:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
