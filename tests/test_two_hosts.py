"""A real two-node Ray cluster, launched by the cluster launcher, on two hosts that share no disk.

tests/twohosts.py makes host A (head) and host B (worker) on this machine: separate network
namespaces joined by a veth pair, and a mount namespace for B in which /tmp, the checkout and
the system's datasets are its own. `ray up` (the `local` provider, cluster/local.yaml's shape)
starts the head on A over ssh; the head's autoscaler syncs the code to B and starts B's Ray over
ssh. `ray submit` runs a probe on the head that checks, from tasks pinned to each node, what each
host can see, and runs a two-process gloo all_reduce across the nodes. `ray down` and the harness
teardown must leave nothing behind. Token authentication is on (RAY_AUTH_MODE=token, one token
file in the "NFS" directory both hosts mount).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from twohosts import REPO, VENV, TwoHosts, copy_checkout, free_ports, missing_reason, two_hosts

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(240)]

FASHION = Path("/usr/share/datasets/fashion-mnist")

# Runs on the head (A) via `ray submit`: argv = A's IP, B's IP, GCS port, JSON list of paths.
PROBE = """\
import json, os, socket, sys, time
from datetime import timedelta
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

a_ip, b_ip, gcs_port, paths = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ray.init(address=f"{a_ip}:{gcs_port}", log_to_driver=False)
deadline = time.monotonic() + 60
while True:  # B's raylet is up; its registration with the GCS may still be on the way
    nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    if len(nodes) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
assert set(nodes) == {a_ip, b_ip}, nodes

def on(ip):
    return NodeAffinitySchedulingStrategy(nodes[ip], soft=False)

@ray.remote(num_cpus=1)
def look(paths):
    return {"ip": ray.util.get_node_ip_address(), "gloo_if": os.environ.get("GLOO_SOCKET_IFNAME"), "seen": [os.path.exists(p) for p in paths]}

looks = {ip: ray.get(look.options(scheduling_strategy=on(ip)).remote(paths)) for ip in (a_ip, b_ip)}

@ray.remote(num_cpus=1)
def all_reduce(rank, init_method):
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value)
    dist.destroy_process_group()
    return ray.util.get_node_ip_address(), value.item()

with socket.socket() as s:  # rank 0's rendezvous port, on A (the driver runs on the head)
    s.bind((a_ip, 0))
    port = s.getsockname()[1]
init = f"tcp://{a_ip}:{port}"
reduced = ray.get([all_reduce.options(scheduling_strategy=on(ip)).remote(rank, init) for rank, ip in enumerate((a_ip, b_ip))], timeout=120)
print("PROBE " + json.dumps({"nodes": sorted(nodes), "looks": looks, "reduced": reduced}), flush=True)
"""


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def b_raylet_running(hosts: TwoHosts) -> bool:
    for proc in hosts.own_processes():
        with contextlib.suppress(psutil.Error):
            if proc.name() == "raylet" and any(str(hosts.ray_tmp["B"]) in arg for arg in proc.cmdline()):
                return True
    return False


def ray_cli_on_a(hosts: TwoHosts, ray_env: dict[str, str], cwd: Path) -> Callable[..., subprocess.CompletedProcess]:
    """The ray CLI (`ray up`/`submit`/`down`) run from host A, printing each command's output.

    It runs with the head's TMPDIR: the local provider keeps its cluster state under it, and the
    head's autoscaler must find the head there as running."""
    env = {**os.environ, **ray_env, "TMPDIR": str(hosts.roots["A"]), "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)

    def ray(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VENV / "bin" / "ray"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        print(f"$ ray {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
        return proc

    return ray


def cluster_config(hosts: TwoHosts, name: str, source: Path, ports: dict[str, int]) -> dict:
    """cluster/local.yaml's shape: head on A (reached through the harness's ProxyCommand), one
    worker on B, the code synced to the same path on both."""
    a, b = hosts.a_ip, hosts.b_ip
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    assert config["provider"]["type"] == "local" and config["head_node_type"] == "local.cluster.node"
    config["cluster_name"] = name
    config["provider"] = {"type": "local", "head_ip": a, "worker_ips": [b]}
    # With local.cluster.node in available_node_types Ray takes the node types as given
    # (autoscaler/_private/local/config.py: prepare_local). A worker of the head's type is
    # never launched by autoscaler v2 (the default for `ray up`), so B gets a type of its own.
    config["max_workers"] = 1
    config["available_node_types"]["local.worker"] = {"node_config": {}, "resources": {}, "min_workers": 1, "max_workers": 1}
    config["auth"] = {"ssh_user": hosts.ssh_user, "ssh_private_key": str(hosts.ssh_key), "ssh_proxy_command": hosts.proxy_command}
    config["file_mounts"] = {str(hosts.remote_repo): str(source)}
    config["head_start_ray_commands"] = [
        "ray stop",  # the harness's scoped one
        f"ray start --head --node-ip-address={a} --port={ports['gcs']} --autoscaling-config=~/ray_bootstrap_config.yaml"
        f" --num-cpus=1 --temp-dir={hosts.ray_tmp['A']} --dashboard-port={ports['dashboard']}"
        f" --ray-client-server-port={ports['client']} --dashboard-agent-listen-port={ports['agent']} --disable-usage-stats",
    ]
    # B's ports are its own (own network namespace): Ray's defaults are fine there.
    config["worker_start_ray_commands"] = [
        f"ray start --address=$RAY_HEAD_IP:{ports['gcs']} --node-ip-address={b} --num-cpus=1"
        f" --temp-dir={hosts.ray_tmp['B']} --disable-usage-stats"
    ]
    return config


def test_ray_cluster_on_two_hosts():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="llh"))  # short: A's Ray socket paths live under it
    shared = tmp / "shared"  # stands for NFS: both hosts see it
    shared.mkdir()
    token = shared / "ray_token"
    token.write_text(secrets.token_hex(32))
    name = f"lowlabel-2hosts-{os.getpid()}"
    control = Path(f"/tmp/ray_ssh_{sha(getpass.getuser())}/{sha(name)}")  # Ray's ssh ControlMaster dir
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "metrics"), free_ports(5)))
    ray_env = {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        # The head's autoscaler metrics server; its default 44217 may be another cluster's.
        "AUTOSCALER_METRIC_PORT": str(ports["metrics"]),
    }
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        timings[what] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    try:
        with two_hosts(tmp, shared_dir=shared, env=ray_env) as hosts:
            lap("harness up")
            hosts.markers.append(str(control))  # the ssh mux renames itself after its control path
            a, b = hosts.a_ip, hosts.b_ip
            ray = ray_cli_on_a(hosts, ray_env, cwd=tmp)

            cluster_yaml = tmp / "cluster.yaml"
            cluster_yaml.write_text(yaml.safe_dump(cluster_config(hosts, name, copy_checkout(tmp / "checkout"), ports)))
            try:
                proc = ray("up", "-y", "--no-config-cache", str(cluster_yaml))
                assert proc.returncode == 0, "ray up failed (output above)"
                lap("ray up (head)")
                assert (hosts.remote_repo / "dvc.yaml").is_file()  # synced to the head
                # The head's autoscaler now syncs the code to B and starts B's Ray; Ray starts after
                # the file mounts, so B's raylet running means B's copy is final.
                deadline = time.monotonic() + 120
                while not b_raylet_running(hosts):
                    assert time.monotonic() < deadline, "B's raylet did not start in 120 s (the head's autoscaler log below)"
                    time.sleep(0.5)
                lap("worker up")
                only_on_a = hosts.remote_repo / "only-on-A.txt"
                only_on_a.write_text("written after B's sync, in A's copy only")

                # path: (A sees it, B sees it)
                checks = {
                    only_on_a: (True, False),  # each host has its own copy of the remote repo ...
                    hosts.remote_repo / "dvc.yaml": (True, True),  # ... both with the synced code
                    hosts.homes["A"]: (True, False),  # nothing of A's /tmp on B
                    FASHION: (FASHION.is_dir(), False),  # no system datasets on B
                    token: (True, True),  # the shared ("NFS") dir
                    REPO / "dvc.yaml": (True, True),  # B's checkout: its git-visible files ...
                    VENV / "bin" / "python": (True, True),  # ... and the venv
                }
                if (REPO / "data").is_dir():
                    checks[REPO / "data"] = (True, False)  # ... but not A's git-ignored data
                probe = tmp / "probe.py"
                probe.write_text(PROBE)
                paths = json.dumps([str(p) for p in checks])
                proc = ray("submit", str(cluster_yaml), str(probe), "--", a, b, str(ports["gcs"]), f"'{paths}'")
                assert proc.returncode == 0, "ray submit failed (output above)"
                result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])
                lap("probe")
                assert result["nodes"] == sorted([a, b])
                looks = result["looks"]
                assert (looks[a]["ip"], looks[b]["ip"]) == (a, b)
                assert (looks[a]["gloo_if"], looks[b]["gloo_if"]) == (hosts.a_if, hosts.b_if)
                assert dict(zip(checks, zip(looks[a]["seen"], looks[b]["seen"]))) == checks
                # Gloo across the veth: without GLOO_SOCKET_IFNAME the ranks offer 127.0.0.1 and
                # connectFullMesh fails ("Connection refused, remote=[127.0.0.1]:PORT").
                assert result["reduced"] == [[a, 3.0], [b, 3.0]]
            except BaseException:
                for log in sorted(hosts.ray_tmp["A"].glob("session_latest/logs/monitor.*")):  # the autoscaler's
                    lines = [line for line in log.read_text().splitlines() if "Adding 1 node" not in line]
                    print(f"--- head's {log.name} (last 80 lines but 'Adding 1 node')\n" + "\n".join(lines[-80:]))
                raise
            finally:
                ray("down", "-y", str(cluster_yaml), timeout=120)
                lap("ray down")
                # `ray down` (local provider) stops Ray on the head only; the teardown stops B's.
                print(f"B's raylet after ray down: {'running' if b_raylet_running(hosts) else 'gone'}")
        lap("teardown")
        leftovers = hosts.leftovers()
        assert not leftovers, leftovers
        assert hosts.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert f" {hosts.a_if}@" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert str(hosts.infra) not in Path("/proc/self/mountinfo").read_text()
        print(f"timings (s): {timings}, total {sum(timings.values()):.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
        with contextlib.suppress(OSError):
            control.parent.rmdir()  # only when no other cluster's is in it


# Runs on host B: one control-plane call to the GCS at argv[1] (lists the nodes).
GCS_PROBE = """\
import json, sys
from ray._raylet import GcsClient
try:
    nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
    print("GCS_PROBE " + json.dumps({"ok": True, "nodes": len(nodes)}))
except Exception as error:
    print("GCS_PROBE " + json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}))
"""


def test_the_embedded_ray_of_a_stage_refuses_another_host_without_the_token():
    """A stage's local Ray (ensure_ray without an address) listens on every interface; from
    another host (B's network namespace, through the veth) its GCS port is reachable, and any
    call without this machine's token is refused (auth mode off, or a wrong token), while the
    same call with the token works: the refusal is the auth, not the network."""
    import ray

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    from lowlabel.runner.launch import ensure_ray

    ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="lla"))
    before = os.environ.get("LOWLABEL_RAY_TMP")
    os.environ["LOWLABEL_RAY_TMP"] = str(tmp / "ray")  # short: Ray's socket paths live under it
    try:
        with two_hosts(tmp) as hosts:
            ensure_ray(None, local_num_cpus=1)
            port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
            token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
            token = token_file.read_text().strip()
            probe = hosts.infra / "gcs_probe.py"  # the harness dir: B sees it too
            probe.write_text(GCS_PROBE)

            reach = hosts.run_on_b([sys.executable, "-c", f"import socket; socket.create_connection(('{hosts.a_ip}', {port}), timeout=5); print('open')"],
                                   capture_output=True, text=True, timeout=30)
            assert reach.stdout.strip() == "open", f"the GCS port is not reachable from B: {reach.stderr[-500:]}"

            def call_from_b(**auth: str) -> dict:
                env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", **auth}
                proc = hosts.run_on_b([sys.executable, str(probe), f"{hosts.a_ip}:{port}"], env=env, capture_output=True, text=True, timeout=60)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("GCS_PROBE ")]
                return json.loads(lines[0][10:]) if lines else {"ok": False, "error": (proc.stderr or proc.stdout)[-300:]}

            without = call_from_b(RAY_AUTH_MODE="disabled")
            wrong = call_from_b(RAY_AUTH_TOKEN=secrets.token_hex(32))
            right = call_from_b(RAY_AUTH_TOKEN=token)
            print({"disabled": without, "wrong token": wrong, "right token": right})
            for refused in (without, wrong):
                assert not refused["ok"] and "InvalidAuthToken" in refused["error"], refused
            assert right == {"ok": True, "nodes": 1}, right
            ray.shutdown()
        assert not hosts.leftovers(), hosts.leftovers()
    finally:
        ray.shutdown()
        os.environ.pop("LOWLABEL_RAY_TMP", None) if before is None else os.environ.__setitem__("LOWLABEL_RAY_TMP", before)
        shutil.rmtree(tmp, ignore_errors=True)
