"""How large a job input can reach a worker on another host through Ray's object store.

    sudo .venv/bin/python bench/object_store_limit.py [--store-mb 80] [--sizes 50,150,300]

Two hosts that share no disk (tests/twohosts.py; root, Linux): a head on A with no CPUs (the
driver's ``ray.put`` lands there), a worker node on B whose object store is ``--store-mb``. For
each size, an array is put on A and a task on B reads it. Prints a table: size, where it ran,
seconds, outcome. Inputs larger than B's store still arrive when Ray's fallback allocation
(disk-mapped memory under the node's Ray temp dir) can hold them.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

_TOKEN = Path(tempfile.mkdtemp(prefix="osl-token-")) / "auth_token"
_TOKEN.write_text(secrets.token_hex(32))
# Token auth for both nodes and this driver, set before anything imports ray (read once per process).
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_TOKEN), "RAY_USAGE_STATS_ENABLED": "0"})

import numpy as np
import ray
from twohosts import VENV, free_ports, missing_reason, two_hosts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-mb", type=int, default=80, help="host B's object store (Ray's minimum is ~75 MB)")
    parser.add_argument("--sizes", default="50,150,300", help="input sizes in MB")
    args = parser.parse_args()
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    tmp = Path(tempfile.mkdtemp(prefix="llo"))
    shared = tmp / "shared"
    shared.mkdir()
    shutil.copy(_TOKEN, shared / "token")
    gcs, client, agent, metrics, autoscaler = free_ports(5)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(shared / "token"), "RAY_USAGE_STATS_ENABLED": "0",
           "AUTOSCALER_METRIC_PORT": str(autoscaler)}
    ray_bin = str(VENV / "bin" / "ray")
    nodes: list[subprocess.Popen] = []
    rows = []
    try:
        with two_hosts(tmp, shared_dir=shared, env=env) as hosts:
            head = [ray_bin, "start", "--head", f"--node-ip-address={hosts.a_ip}", f"--port={gcs}", f"--temp-dir={hosts.ray_tmp['A']}",
                    "--num-cpus=0", f"--object-store-memory={4 * max(map(int, args.sizes.split(','))) * 10**6}", "--include-dashboard=false",
                    f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--block"]
            worker = [*hosts.nsenter, "--", ray_bin, "start", f"--address={hosts.a_ip}:{gcs}", f"--node-ip-address={hosts.b_ip}",
                      f"--temp-dir={hosts.ray_tmp['B']}", "--num-cpus=1", f"--object-store-memory={args.store_mb * 10**6}", "--block"]
            for argv, host in ((head, "A"), (worker, "B")):
                nodes.append(subprocess.Popen(argv, env={**os.environ, **hosts.host_env[host]}, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
                time.sleep(4 if host == "A" else 0)
            ray.init(address=f"{hosts.a_ip}:{gcs}")
            deadline = time.monotonic() + 120
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("host B never joined")
                time.sleep(0.5)

            @ray.remote(num_cpus=1)
            def read(array: np.ndarray) -> tuple[str, int]:
                return ray.util.get_node_ip_address(), int(array[::4096].sum())

            for mb in map(int, args.sizes.split(",")):
                array = np.random.default_rng(mb).integers(0, 255, size=mb * 10**6, dtype=np.uint8)
                ref = ray.put(array)
                started = time.perf_counter()
                try:
                    where, checksum = ray.get(read.remote(ref), timeout=300)
                    outcome = "ok" if checksum == int(array[::4096].sum()) else "WRONG DATA"
                except Exception as error:
                    where, outcome = "-", f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
                rows.append((mb, where, time.perf_counter() - started, outcome))
                print(f"{mb} MB: {rows[-1][1:]}", flush=True)
                del ref
            ray.shutdown()
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, 9)
        for node in nodes:
            node.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(_TOKEN.parent, ignore_errors=True)
    print(f"\nhost B's object store: {args.store_mb} MB; inputs put on host A, read by a task on B")
    print(f"{'input MB':>9}{'ran on':>16}{'seconds':>9}  outcome")
    for mb, where, seconds, outcome in rows:
        print(f"{mb:>9}{where:>16}{seconds:>9.1f}  {outcome}")


if __name__ == "__main__":
    main()
