"""The real cluster launcher on loopback: `ray up` / `ray submit` / `ray down` with cluster/local.yaml.

A private sshd, run per connection in inetd mode (`sshd -i`) as ssh's ProxyCommand with its own
config, host key and authorized key in a temp dir: no daemon, no port, nothing of the system's
sshd touched. The ssh sessions get a throwaway HOME whose .bashrc puts the venv on PATH (what
cluster/config.yaml's setup_commands do on a cloud node) and a `ray` in front of it whose
`ray stop` stops only this cluster: the real one (which `ray down` runs on the head) kills every
Ray process of the user on the machine. Needs root (sshd), sshd, ssh-keygen and rsync.

Runs wherever it can (root, sshd, ssh-keygen, rsync: `./pipeline test` installs the last two
packages on CI machines) and skips with the reason otherwise; `-m cluster` selects it alone.
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
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from twohosts import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (sshd with its own config runs as root)"
    if not os.access(SSHD, os.X_OK):
        return "needs sshd (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not (VENV_BIN / "ray").exists():
        return f"no ray CLI beside {sys.executable}"
    return None


@pytest.fixture()
def sshd_available():
    reason = _missing()
    if reason:
        pytest.skip(reason)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def own_processes(markers: list[str]) -> list[psutil.Process]:
    """Processes whose command line names one of ``markers`` (this test's temp dir, ports), and
    their descendants; never this process or its ancestors."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in spared and any(m in arg for arg in proc.info["cmdline"] or [] for m in markers):
                found[proc.pid] = proc
                found |= {c.pid: c for c in proc.children(recursive=True) if c.pid not in spared}
        except psutil.Error:
            continue
    return list(found.values())


def stop_processes(procs: list[psutil.Process], grace_s: float = 3.0) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:  # gcs_server and the autoscaler monitor can sit out SIGTERM
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


# `ray stop` on the "head", limited to this cluster: it runs under the venv's python.
SCOPED_STOP = """\
import sys
sys.path.insert(0, {tests!r})
from test_cluster_launcher import own_processes, stop_processes
stop_processes(own_processes({markers!r}))
print("scoped ray stop: done")
"""

PROBE = """\
import json, os, sys
import ray
from lowlabel.runner.launch import resolve_workers

ray.init(address=sys.argv[1], log_to_driver=False)
resources = ray.cluster_resources()
head = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

assert ray.get(where.remote()) == head, "the task ran on another cluster"
print("PROBE " + json.dumps({"home": os.environ["HOME"], "auth": os.environ.get("RAY_AUTH_MODE"), "resources": resources, "nodes": len(ray.nodes()), "auto_workers": resolve_workers("auto", 1, False)}), flush=True)
"""


def test_ray_up_submit_down_on_loopback(sshd_available):
    tmp = Path(tempfile.mkdtemp(prefix="llc"))  # short: Ray's socket paths live under it
    name = f"lowlabel-loopback-{os.getpid()}"
    gcs, dashboard, client, agent, mlflow_port = free_ports(5)
    # This cluster's Ray processes name its temp dir, but the ray client server only the GCS
    # address; the rest of tmp (keys, sshd config, cluster yaml) is also in ssh's and `ray up`'s.
    # Ray's ssh ControlMaster (ControlPersist 10 s) renames itself after its control path,
    # /tmp/ray_ssh_<user hash>/<cluster name hash> (ray.autoscaler._private.command_runner).
    control = f"/tmp/ray_ssh_{sha(getpass.getuser())}/{sha(name)}"
    ray_markers, all_markers = [f"{tmp}/raytmp", f":{gcs}"], [str(tmp), f":{gcs}", control]
    env = {**os.environ, "TMPDIR": str(tmp), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)

    def ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        print(f"$ ray {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    created_run_sshd = not Path("/run/sshd").exists()
    up = False
    try:
        # sshd: host key, client key, config; per-connection `sshd -i` is the ProxyCommand.
        home, bin_dir = tmp / "home", tmp / "bin"
        for d in (home, bin_dir):
            d.mkdir()
        for key in ("host_key", "key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
        shutil.copy(tmp / "key.pub", tmp / "authorized_keys")
        (tmp / "sshd_config").write_text(textwrap.dedent(f"""\
            HostKey {tmp}/host_key
            AuthorizedKeysFile {tmp}/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            PidFile none
            SetEnv HOME={home}
            LogLevel ERROR
            """))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        # TMPDIR: the head's autoscaler keeps the local provider's state file under it.
        # LOWLABEL_MLFLOW_PORT: the head's MLflow server (a start command of local.yaml) on a free port.
        (home / ".bashrc").write_text(f'export PATH="{bin_dir}:{VENV_BIN}:$PATH" TMPDIR="{tmp}" LOWLABEL_MLFLOW_PORT={mlflow_port}\n')
        token = tmp / "ray_token"
        token.write_text(secrets.token_hex(32))
        (bin_dir / "stop_own.py").write_text(SCOPED_STOP.format(tests=str(Path(__file__).parent), markers=ray_markers))
        wrapper = bin_dir / "ray"
        wrapper.write_text(f'#!/bin/bash\nif [ "$1" = stop ]; then exec "{sys.executable}" "{bin_dir}/stop_own.py"; fi\nexec "{VENV_BIN}/ray" "$@"\n')
        wrapper.chmod(0o755)
        (tmp / "probe.py").write_text(PROBE)

        # cluster/local.yaml as shipped, pointed at the private sshd, with its own ports and temp dir.
        config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
        assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
        config["cluster_name"] = name
        config["auth"] = {"ssh_user": "root", "ssh_private_key": str(tmp / "key"), "ssh_proxy_command": f"{SSHD} -i -f {tmp}/sshd_config"}
        # The checkout goes where run_pipeline.py looks for it (~/lowlabel), not to a shared /tmp path.
        assert config["file_mounts"] == {"~/lowlabel": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
        config["file_mounts"] = {f"{home}/lowlabel": str(REPO), f"{home}/.ray/auth_token": str(token)}
        isolate = (
            f" --temp-dir={tmp}/raytmp --dashboard-port={dashboard} --ray-client-server-port={client}"
            f" --dashboard-agent-listen-port={agent} --disable-usage-stats"
        )
        starts = [c.replace("--port=6379", f"--port={gcs}") + isolate if c.startswith("ray start") else c for c in config["head_start_ray_commands"]]
        assert any(f"--port={gcs}" in c for c in starts), config["head_start_ray_commands"]
        config["head_start_ray_commands"] = starts
        cluster_yaml = tmp / "cluster.yaml"
        cluster_yaml.write_text(yaml.safe_dump(config))

        started = time.perf_counter()
        up = True
        proc = ray("up", "-y", "--no-config-cache", str(cluster_yaml))
        assert proc.returncode == 0, "ray up failed (output above)"
        synced = home / "lowlabel"  # file_mounts, rsynced over ssh minus what .gitignore names
        assert (synced / "dvc.yaml").is_file() and (synced / "cluster" / "run_pipeline.py").is_file()
        assert not (synced / ".venv").exists() and not (synced / ".git").exists()
        # The head's MLflow server came up from Ray's `bash -c` start command (its pgrep guard
        # must not match that shell), on 127.0.0.1 only.
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, (home / ".lowlabel" / "mlflow-server.log").read_text()[-3000:]
                time.sleep(0.5)
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == mlflow_port}
        assert listening == {"127.0.0.1"}, listening

        proc = ray("submit", str(cluster_yaml), str(tmp / "probe.py"), "--", f"127.0.0.1:{gcs}")
        assert proc.returncode == 0, "ray submit failed (output above)"
        probe = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])
        assert probe["home"] == str(home)  # ran in the ssh session, not in this process
        assert probe["auth"] == "token"  # local.yaml's head_setup_commands: token auth for the driver too
        assert probe["nodes"] == 1 and probe["resources"]["CPU"] == 2  # local.yaml's --num-cpus=2
        assert probe["auto_workers"] == 2  # runtime.workers: auto on this cluster

        # The pipeline's own entry on the cluster: finds the synced checkout, DVC without git.
        proc = ray("submit", str(cluster_yaml), str(REPO / "cluster" / "run_pipeline.py"), "--", "status")
        assert proc.returncode == 0, "ray submit run_pipeline.py failed (output above)"
        assert f"[submit] {synced}: dvc status (RAY_ADDRESS=auto" in proc.stdout
        assert "not a git repository" not in proc.stdout + proc.stderr
        print(f"up + 2 submits: {time.perf_counter() - started:.1f}s")
    finally:
        if up:
            with contextlib.suppress(subprocess.TimeoutExpired):  # the cleanup below still runs
                ray("down", "-y", str(cluster_yaml), timeout=120)
        # ray's ssh ControlMaster lingers ControlPersist (10 s) after the last command; any
        # Ray process a failed step left behind: this test's own, found by temp dir and port.
        stop_processes(own_processes(all_markers))
        leftover = own_processes(all_markers)
        if created_run_sshd:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(Path(control).parent)  # only when no other cluster's is in it
    assert not leftover, [p.cmdline() for p in leftover]
