"""Warm stage processes (lowlabel.runner.warm): a stage forked from a server that imported the
stack behaves as the same ``python -m`` run cold would, and runs cold wherever the server could
not stand in for a fresh interpreter.

A real server process per test, serving a probe package written to a temp folder (its
``__init__`` calls ``delegate`` as lowlabel.stages' does); it preloads only the probe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

PROBE = '''
import json, os, signal, sys, time
from pathlib import Path

def on_term(signum, frame):
    Path(os.environ["PROBE_MARK"]).write_text("terminated")
    sys.exit(7)

if __name__ == "__main__":
    if "--exit-message" in sys.argv:  # what the interpreter does at exit, without its teardown
        import atexit, threading
        atexit.register(lambda: Path(os.environ["PROBE_MARK"] + ".atexit").write_text("ran"))
        threading.Thread(target=lambda: (time.sleep(0.5), Path(os.environ["PROBE_MARK"] + ".thread").write_text("ran"))).start()
        sys.stdout.write("unflushed")
        sys.exit("the stage's message")
    signal.signal(signal.SIGTERM, on_term)
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "ppid": os.getppid(), "pid": os.getpid(),
                      "value": os.environ.get("PROBE_VALUE"), "main": __name__, "path0": sys.path[0],
                      "stage_pid": os.environ.get("LOWLABEL_STAGE_PID")}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--wait" in sys.argv:
        Path(os.environ["PROBE_MARK"]).write_text("started")
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
'''


@pytest.fixture()
def served(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="llwarm-", dir="/tmp"))  # a short AF_UNIX path
    (tmp_path / "llprobe").mkdir()
    (tmp_path / "llprobe" / "__init__.py").write_text("from lowlabel.runner.warm import delegate\ndelegate(__name__)\n")
    (tmp_path / "llprobe" / "main.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(tmp_path)]), "PROBE_MARK": str(tmp_path / "mark")}
    socket_path = folder / "warm.sock"
    server = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.warm", str(socket_path), "llprobe.main"],
                              env={**env, "LOWLABEL_VERBOSE": "1"}, start_new_session=True, stderr=subprocess.PIPE, text=True)
    env["LOWLABEL_WARM_SOCKET"] = str(socket_path)
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert server.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # Served as soon as it listens, while it still imports (the child imports the rest itself).
    assert report(probe(env, tmp_path, "0"))["ppid"] == server.pid
    assert "[warm] ready: 1 modules imported" in server.stderr.readline()
    yield server, env, tmp_path
    server.terminate()
    server.wait(timeout=30)
    folder.rmdir() if folder.exists() and not any(folder.iterdir()) else None


def probe(env: dict, cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llprobe.main", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)


def report(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout.splitlines()[0])


def test_a_served_stage_is_the_same_run_forked_from_the_server(served, tmp_path):
    server, env, _ = served
    cwd = tmp_path / "work"
    cwd.mkdir()
    stage = subprocess.Popen([sys.executable, "-m", "llprobe.main", "3", "--flag"], cwd=cwd, env={**env, "PROBE_VALUE": "from the stage"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = stage.communicate(timeout=60)
    out = subprocess.CompletedProcess(stage.args, stage.returncode, stdout, stderr)
    assert out.returncode == 3, out.stderr
    seen = report(out)
    assert seen["ppid"] == server.pid  # forked from the server, not run here
    assert seen["stage_pid"] == str(stage.pid)  # it knows the process DVC waits for (lowlabel.tracking.dvc_invocation)
    assert seen["argv"] == ["3", "--flag"]
    assert seen["cwd"] == str(cwd) == seen["path0"]  # the stage's folder, first on sys.path as under -m
    assert seen["value"] == "from the stage"  # the stage's environment, not the server's
    assert seen["main"] == "__main__"
    assert out.stderr.strip().endswith("to stderr")  # its own streams
    again = report(probe(env, cwd, "0"))
    assert again["pid"] != seen["pid"] and again["ppid"] == server.pid  # a fresh child per stage


def waiting_stage(env: dict, folder: Path) -> subprocess.Popen:
    """A served stage that has started and sleeps (its child wrote the mark)."""
    stage = subprocess.Popen([sys.executable, "-m", "llprobe.main", "0", "--wait"], cwd=folder, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mark = folder / "mark"
    deadline = time.monotonic() + 30
    while not (mark.exists() and mark.read_text() == "started"):
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()
        time.sleep(0.05)
    return stage


def test_signals_reach_the_child_and_its_end_is_the_stage_processes(served, tmp_path):
    _, env, _ = served
    stage = waiting_stage(env, tmp_path)
    mark = tmp_path / "mark"
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=30) == 7  # the child's handler ran and its exit code came back
    assert mark.read_text() == "terminated"


def test_a_killed_stage_process_takes_its_child_with_it(served, tmp_path):
    _, env, _ = served
    stage = waiting_stage(env, tmp_path)
    mark = tmp_path / "mark"
    child = json.loads(stage.stdout.readline())["pid"]
    stage.kill()
    stage.wait()
    deadline = time.monotonic() + 30
    while mark.read_text() != "terminated":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while os.path.exists(f"/proc/{child}"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_child_killed_by_a_signal_ends_the_stage_process_by_it(served, tmp_path):
    _, env, _ = served
    stage = subprocess.Popen([sys.executable, "-m", "llprobe.main", "0", "--wait"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = json.loads(stage.stdout.readline())["pid"]
    os.kill(child, signal.SIGKILL)
    assert stage.wait(timeout=30) == -signal.SIGKILL, stage.stderr.read()


@pytest.mark.parametrize("case", ["no server", "interpreter variable", "source changed"])
def test_the_stage_runs_cold_where_the_server_cannot_stand_in(served, tmp_path, case):
    server, env, _ = served
    if case == "no server":
        env = {**env, "LOWLABEL_WARM_SOCKET": str(tmp_path / "absent.sock")}
    elif case == "interpreter variable":
        env = {**env, "PYTHONWARNINGS": "ignore"}
    else:
        main = tmp_path / "llprobe" / "main.py"
        main.write_text(main.read_text() + "\n# edited\n")
    out = probe(env, tmp_path, "5")
    assert out.returncode == 5, out.stderr
    assert report(out)["ppid"] != server.pid  # ran in the stage's own process
    assert server.poll() is None  # and the server serves on
    if case == "source changed":
        main.write_text(PROBE)
        os.utime(main)
        assert report(probe(env, tmp_path, "0"))["ppid"] != server.pid  # stale stays stale until a new server


def test_a_warm_stage_ends_as_the_interpreter_would(served, tmp_path):
    _, env, _ = served
    out = probe(env, tmp_path, "0", "--exit-message")
    assert out.returncode == 1  # a SystemExit with a message: 1, the message on stderr
    assert out.stderr.strip().endswith("the stage's message")
    assert out.stdout == "unflushed"  # streams flushed
    assert (tmp_path / "mark.atexit").read_text() == "ran"  # atexit handlers ran
    assert (tmp_path / "mark.thread").read_text() == "ran"  # a non-daemon thread was waited for


WORKER = '''
import json, os, sys
print(json.dumps({"argv": sys.argv, "ppid": os.getppid(), "pid": os.getpid(), "pgid": os.getpgid(0), "path0": sys.path[0],
                  "value": os.environ.get("PROBE_VALUE"), "socket": os.environ.get("LOWLABEL_WARM_WORKER_SOCKET"),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}), flush=True)
sys.exit(4)
'''


def test_a_ray_worker_command_is_forked_as_python_script_would_run(served, tmp_path):
    """What Ray runs for a worker of the session's Ray (lowlabel.runner.warm_worker SCRIPT ARGS):
    the script forked from the server, in a process group of its own (Ray stops workers by group)."""
    server, env, _ = served
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "default_worker.py"
    script.write_text(WORKER)
    env = {**env, "LOWLABEL_WARM_WORKER_SOCKET": env.pop("LOWLABEL_WARM_SOCKET"), "PROBE_VALUE": "from Ray"}
    # Ray's worker environment names lowlabel's sources for other nodes; here they are on the path.
    env["PYTHONPATH"] += os.pathsep + str(REPO / "src")
    # Ray starts its workers at nice 15: the forked one runs at its launcher's priority too.
    out = subprocess.run([sys.executable, "-m", "lowlabel.runner.warm_worker", str(script), "--node-ip-address=x"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.nice(5))
    assert out.returncode == 4, out.stderr
    seen = report(out)
    assert seen["ppid"] == server.pid
    assert seen["pgid"] == seen["pid"]
    assert seen["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 5
    assert seen["argv"] == [str(script), "--node-ip-address=x"]
    assert seen["path0"] == str(script.parent)  # as `python SCRIPT` puts it
    assert seen["value"] == "from Ray" and seen["socket"] == env["LOWLABEL_WARM_WORKER_SOCKET"]  # Ray's environment, whole


def test_a_ray_worker_runs_cold_where_ray_is_imported_in_the_server(tmp_path):
    """Ray's core library takes the worker's job id from the environment when it loads: a server
    that has loaded it cannot stand in for a worker, which then runs as Ray would start it."""
    folder = Path(tempfile.mkdtemp(prefix="llwarm-", dir="/tmp"))
    socket_path = folder / "worker.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LOWLABEL_VERBOSE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.warm", str(socket_path), "ray"], env=env,
                              start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        assert "[warm] ready: 1 modules imported" in server.stderr.readline()
        script = tmp_path / "default_worker.py"
        script.write_text(WORKER)
        launcher = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.warm_worker", str(script)], cwd=tmp_path,
                                    env={**env, "LOWLABEL_WARM_WORKER_SOCKET": str(socket_path)}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        stdout, stderr = launcher.communicate(timeout=60)
        assert launcher.returncode == 4, stderr
        assert json.loads(stdout.splitlines()[0])["pid"] == launcher.pid  # the interpreter exec'd in place
        assert "running default_worker.py cold: Ray is imported in this server" in stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
