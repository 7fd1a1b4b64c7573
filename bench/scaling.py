"""Data-parallel scaling: the pretrain job on 1 vs 2 Ray workers of a 2-node cluster.

    python bench/scaling.py [--prepared data/prepared] [--method simclr] [--steps 30] [--epochs 3] [--two-hosts]

Default: ``ray.cluster_utils.Cluster`` (a head and a second node, 1 CPU each, separate raylets
on this machine, one filesystem). ``--two-hosts`` (root, Linux): two hosts that share no disk,
made with tests/twohosts.py (host B in its own network and mount namespaces, its own address
on a veth pair; gloo over the veth; each host's Ray pinned to one core of its own with taskset), Ray started on each (`ray start --head` on A, `ray start
--address` on B, token auth), the prepared data reaching B's worker through Ray's object store
and checkpoints going to a directory both hosts mount (NFS's stand-in).

Either way the stage's own pretrain job (lowlabel.runner.jobs) runs with the same global batch
on 1 and then 2 workers (one per node), reached through the cluster's address. Prints images/s
of the epochs after the first and the speed-up. On the 2-core box the ideal is 2x: each node
gets one core, and the gloo all-reduce, the cross-worker gather of SimCLR's negatives and each
worker's own augmentation are what it costs. Uses data/prepared (run the prepare stage) or
--prepared DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

if "--two-hosts" in sys.argv:
    # Token auth for both nodes and this driver; Ray reads the mode once per process, so set it
    # before anything imports ray.
    _TOKEN = Path(tempfile.mkdtemp(prefix="scaling-token-")) / "auth_token"
    _TOKEN.write_text(secrets.token_hex(32))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_TOKEN)})

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import load_params
from lowlabel.data.prepared import PreparedData
from lowlabel.presets import set_param
from lowlabel.runner.jobs import common_config, pretrain_job
from lowlabel.runner.launch import run_training_job
from lowlabel.runner.worker import read_state
from lowlabel.train.pretrain import pretrain_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--two-hosts", action="store_true", help="two hosts that share no disk (root; tests/twohosts.py)")
    args = parser.parse_args()

    params = load_params(args.params)
    raw = params.model_dump(mode="json")
    for key, value in (("pretrain.max_steps_per_epoch", args.steps), ("pretrain.epochs", args.epochs), ("pretrain.min_steps", 0), ("pretrain.eval_every", 1000)):
        set_param(raw, key, str(value))
    params = type(params).model_validate(raw)
    PreparedData.load(args.prepared)  # fails early, naming the folder, when it is not a prepared one

    rates = {}
    cluster = two_host_cluster() if args.two_hosts else simulated_cluster()
    with cluster as (address, storage_root):
        for workers in (1, 2):
            config, name = pretrain_job(params, args.method)
            result = run_training_job(
                pretrain_loop, {**common_config(params, args.prepared), **config, "cpus_per_worker": 1}, name=f"{name}-w{workers}",
                workers=workers, use_gpu=False, cpus_per_worker=1, storage_path=tempfile.mkdtemp(prefix="scaling-", dir=storage_root),
                ray_address=address,
            )
            if result.error is not None:
                raise result.error
            history = read_state(result.checkpoint)["history"]
            rates[workers] = float(np.mean([h["images_per_s"] for h in history if "images_per_s" in h][1:]))
            print(f"{workers} worker(s): {rates[workers]:.0f} img/s", flush=True)

    batch = params.pretrain.batch_size
    where = "two hosts (own network + mount namespaces, gloo over a veth)" if args.two_hosts else "simulated 2-node cluster"
    print(f"\n{args.method} / {params.encoder.arch}, global batch {batch}, {args.steps} steps x {args.epochs - 1} timed epochs, "
          f"{where}, 1 CPU per node")
    print(f"{'workers':>8}{'per-worker batch':>18}{'img/s':>10}{'speed-up':>10}{'efficiency':>12}")
    for workers, rate in rates.items():
        speedup = rate / rates[1]
        print(f"{workers:>8}{batch // workers:>18}{rate:>10.0f}{speedup:>10.2f}{speedup / workers:>12.2f}")


@contextlib.contextmanager
def simulated_cluster() -> Iterator[tuple[str, str | None]]:
    """Two raylets on this machine, one filesystem."""
    import ray
    from ray.cluster_utils import Cluster

    Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)  # Cluster writes its address file there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="rayc-")})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address, None
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def two_host_cluster() -> Iterator[tuple[str, str]]:
    """Hosts A (head) and B (worker node) that share only a directory standing for NFS; every
    process started here is stopped by its process group, the harness removes the rest."""
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from twohosts import VENV, free_ports, missing_reason, two_hosts

    reason = missing_reason()
    if reason:
        raise SystemExit(f"--two-hosts: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="lls"))  # short: A's Ray socket paths live under it
    shared = tmp / "shared"
    shared.mkdir()
    gcs, client, agent, metrics, autoscaler = free_ports(5)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(shared / "token"),
           "AUTOSCALER_METRIC_PORT": str(autoscaler)}
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], shared / "token")
    ray_bin = str(VENV / "bin" / "ray")
    nodes: list[subprocess.Popen] = []
    try:
        with two_hosts(tmp, shared_dir=shared, env=env) as hosts:
            a, b = hosts.a_ip, hosts.b_ip
            common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
            # A host is its CPUs too: each node's processes (raylet, workers, their OpenCV threads)
            # are pinned to a core of their own, so one worker cannot borrow the other host's core.
            head = ["taskset", "-c", "0", ray_bin, "start", "--head", f"--node-ip-address={a}", f"--port={gcs}", f"--temp-dir={hosts.ray_tmp['A']}",
                    f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--include-dashboard=false", *common]
            worker = [*hosts.nsenter, "--", "taskset", "-c", "1", ray_bin, "start", f"--address={a}:{gcs}", f"--node-ip-address={b}",
                      f"--temp-dir={hosts.ray_tmp['B']}", *common]
            for argv, host in ((head, "A"), (worker, "B")):
                node_env = {**os.environ, **hosts.host_env[host]}
                log = open(tmp / f"ray-{host}.log", "wb")  # noqa: SIM115 - closed with the process
                nodes.append(subprocess.Popen(argv, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                if host == "A":
                    time.sleep(3)
            address = f"{a}:{gcs}"
            from lowlabel.runner.launch import ensure_ray

            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    ensure_ray(address)
                    if {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {a, b}:
                        break
                if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
                    logs = "\n".join(f"--- host {h}:\n" + (tmp / f"ray-{h}.log").read_text()[-1500:] for h in "AB")
                    raise SystemExit(f"the two-host cluster did not come up:\n{logs}")
                time.sleep(1)
            try:
                yield address, str(shared)
            finally:
                ray.shutdown()
                for node in nodes:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.pid, 15)
                for node in nodes:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        node.wait(timeout=20)
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, 9)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(os.path.dirname(os.environ["RAY_AUTH_TOKEN_PATH"]), ignore_errors=True)


if __name__ == "__main__":
    main()
