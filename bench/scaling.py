"""Data-parallel scaling: the pretrain job on 1 vs 2 Ray workers of a simulated 2-node cluster.

    python bench/scaling.py [--prepared data/prepared] [--method simclr] [--steps 30] [--epochs 2]

Starts ``ray.cluster_utils.Cluster`` (a head and a second node, 1 CPU each, separate raylets
on this machine), reaches it through its address as a real cluster would be, and runs the
stage's own pretrain job (lowlabel.runner.jobs) with the same global batch on 1 and then 2
workers (one per node). Prints images/s of the epochs after the first and the speed-up.
On the 2-core box the ideal is 2x: each node gets one core, and the gloo all-reduce, the
cross-worker gather of SimCLR's negatives and each worker's own augmentation are what it
costs. Uses data/prepared (run the prepare stage) or --prepared DIR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env  # noqa: E402

configure_quiet_env()

from lowlabel.config import load_params  # noqa: E402
from lowlabel.data.prepared import PreparedData  # noqa: E402
from lowlabel.presets import set_param  # noqa: E402
from lowlabel.runner.jobs import common_config, pretrain_job  # noqa: E402
from lowlabel.runner.launch import run_training_job  # noqa: E402
from lowlabel.runner.worker import read_state  # noqa: E402
from lowlabel.train.pretrain import pretrain_loop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    params = load_params(args.params)
    raw = params.model_dump(mode="json")
    for key, value in (("pretrain.max_steps_per_epoch", args.steps), ("pretrain.epochs", args.epochs), ("pretrain.eval_every", 1000)):
        set_param(raw, key, str(value))
    params = type(params).model_validate(raw)
    data = PreparedData.load(args.prepared)

    Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)  # Cluster writes its address file there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="rayc-")})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    rates = {}
    try:
        for workers in (1, 2):
            config, name = pretrain_job(params, args.method, len(data.split.pretrain))
            result = run_training_job(
                pretrain_loop, {**common_config(params, args.prepared), **config, "cpus_per_worker": 1}, name=f"{name}-w{workers}",
                workers=workers, use_gpu=False, cpus_per_worker=1, storage_path=tempfile.mkdtemp(prefix="scaling-"),
                ray_address=cluster.address,
            )
            if result.error is not None:
                raise result.error
            history = read_state(result.checkpoint)["history"]
            rates[workers] = float(np.mean([h["images_per_s"] for h in history if "images_per_s" in h][1:]))
            print(f"{workers} worker(s): {rates[workers]:.0f} img/s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    batch = params.pretrain.batch_size
    print(f"\n{args.method} / {params.encoder.arch}, global batch {batch}, {args.steps} steps x {args.epochs - 1} timed epochs, "
          "simulated 2-node cluster (1 CPU per node)")
    print(f"{'workers':>8}{'per-worker batch':>18}{'img/s':>10}{'speed-up':>10}{'efficiency':>12}")
    for workers, rate in rates.items():
        speedup = rate / rates[1]
        print(f"{workers:>8}{batch // workers:>18}{rate:>10.0f}{speedup:>10.2f}{speedup / workers:>12.2f}")


if __name__ == "__main__":
    main()
