"""One local Ray for a whole command (lowlabel.runner.session, what ./pipeline repro runs dvc under).

A real Ray is started per test (~6 s) when the command first asks for it: the command's stages
find it through the session's address file with the CPUs params.yaml asks for, a command that
never asks starts none, a stage entry runs forked from
the warm-stage server, nothing of either outlives the command whatever its end (exit code,
SIGTERM), and a named cluster or a params.yaml that does not parse leave the command to itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_dvc_pipeline import ray_processes_under

SHOW_CLUSTER = (
    "import os, ray; from lowlabel.runner.launch import cluster_address; address = cluster_address(None); "
    "ray.init(address=address, log_to_driver=False); print('CPU', int(ray.cluster_resources()['CPU'])); print('ADDRESS', address)"
)


@pytest.fixture()
def workdir():
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="llsess-", dir="/tmp"))
    (folder / "params.yaml").write_text("runtime: {local_num_cpus: 1}\n")
    # TMPDIR: the session's own folder (the warm server's socket) lands here too.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LOWLABEL_RAY_TMP": str(folder / "ray"), "TMPDIR": str(folder)}
    env.pop("RAY_ADDRESS", None)
    yield folder, env
    shutil.rmtree(folder, ignore_errors=True)


def session(args: list[str], cwd: Path, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowlabel.runner.session", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, **kwargs)


def test_the_command_runs_on_one_local_ray_that_stops_with_it(workdir):
    cwd, env = workdir
    out = session([sys.executable, "-c", SHOW_CLUSTER + "; raise SystemExit(3)"], cwd, env)
    assert out.returncode == 3, out.stderr[-2000:]  # the command's exit code
    assert "CPU 1" in out.stdout  # runtime.local_num_cpus
    assert len(list((cwd / "ray").glob("session_2*"))) == 1
    assert not ray_processes_under(cwd)


def test_sigterm_reaches_the_command_and_ray_still_stops(workdir):
    cwd, env = workdir
    marker = cwd / "got-sigterm"
    child = (
        "import signal, sys, time, pathlib; "
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0))); "
        f"pathlib.Path({str(cwd / 'started')!r}).write_text('x'); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.session", sys.executable, "-c", child], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (cwd / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert marker.exists()
        assert not ray_processes_under(cwd)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_stage_entry_runs_forked_from_the_warm_server(workdir):
    cwd, env = workdir
    out = session([sys.executable, "-m", "lowlabel.stages.report", "--help"], cwd, {**env, "LOWLABEL_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    assert "[warm] lowlabel.stages.report: forked from the warm-stage server" in out.stderr
    assert not (cwd / "ray").exists()  # nothing asked for Ray: none was started (a no-op repro)
    assert not ray_processes_under(cwd)  # the server (its socket is under TMPDIR) and Ray are gone


WORKER_PARENT = """
import os, ray
from lowlabel.runner.launch import cluster_address, ensure_ray

@ray.remote
def where():
    return open(f"/proc/{os.getppid()}/cmdline").read().split("\\0"), os.getpgid(0) == os.getpid(), os.getpid(), os.getpriority(os.PRIO_PROCESS, 0)

ensure_ray(cluster_address(None))
parent, own_group, pid, nice = ray.get(where.remote())
print("PARENT", " ".join(parent[1:4]), "OWN-GROUP", own_group)
print("NICE", nice - os.getpriority(os.PRIO_PROCESS, 0))
print("PID", pid)
"""


def test_the_session_rays_workers_are_forked_from_the_warm_worker_server(workdir):
    cwd, env = workdir
    (cwd / "job.py").write_text(WORKER_PARENT)
    out = session([sys.executable, "job.py"], cwd, env)
    assert out.returncode == 0, out.stderr[-2000:]
    # The Ray worker that ran the task: a child of the server of Ray workers, in its own group.
    line = next(line for line in out.stdout.splitlines() if line.startswith("PARENT"))
    assert line.startswith("PARENT -m lowlabel.runner.warm ") and line.endswith("worker.sock OWN-GROUP True"), line
    assert "NICE 15" in out.stdout  # Ray's worker_niceness, as for the process Ray started
    assert not ray_processes_under(cwd)
    worker = int(next(line for line in out.stdout.splitlines() if line.startswith("PID")).split()[1])
    assert not Path(f"/proc/{worker}").exists()  # gone with the session


@pytest.mark.parametrize("case", ["cluster named", "params broken"])
def test_no_local_ray_where_a_cluster_is_named_or_the_params_do_not_parse(workdir, case):
    cwd, env = workdir
    if case == "cluster named":
        env["RAY_ADDRESS"] = "10.9.8.7:6379"
    else:
        (cwd / "params.yaml").write_text("runtime: {workers: lots}\n")
    out = session([sys.executable, "-c", "import os; print('ADDRESS', os.environ.get('RAY_ADDRESS'))"], cwd, env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ADDRESS {env.get('RAY_ADDRESS')}" in out.stdout
    assert not (cwd / "ray").exists()
