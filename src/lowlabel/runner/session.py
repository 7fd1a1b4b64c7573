"""One local Ray for a whole ``dvc repro``: ``python -m lowlabel.runner.session COMMAND [ARGS...]``.

Each training stage is a process of its own, and alone it starts an embedded Ray and stops it
again: ~6 s and ~2 s on 2 cores, five times in the default pipeline. ``./pipeline repro`` runs
``dvc repro`` under this instead. One local Ray is started the way a stage would start it
(:func:`lowlabel.runner.launch.ensure_ray`: the CPUs of ``runtime.local_num_cpus``, the same temp
dir, the same terminal-signal handling) when the first stage asks for it, its address is
published to the stages (``LOWLABEL_SESSION_RAY``: a file they wait for,
lowlabel.runner.launch.session_address), and it is stopped when the command ends, however it
ends; a repro with nothing to train never starts it. The stages themselves are forked
from one process that imported the stack once, and that Ray's workers from another
(lowlabel.runner.warm). Where a cluster is named
(``RAY_ADDRESS``, ``runtime.ray_address``) the command runs as it is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# The inputs the object store is sized for (twice this, see ensure_ray) while the prepared data
# is not there yet (a fresh repro) or is smaller: every default source fits; a job with larger
# inputs than the store holds spills to disk rather than failing.
SESSION_INPUTS_FLOOR_BYTES = 512 * 1024**2


def prepared_nbytes(folder: Path = Path("data/prepared")) -> int:
    """Bytes of the prepared arrays a job ships through the object store (0 before prepare)."""
    return sum(path.stat().st_size for path in folder.glob("*.npy")) if folder.is_dir() else 0


def session_wanted(params_file: Path) -> tuple[bool, int | None]:
    """(whether to start a local Ray for the command, its CPU count). Not when a cluster is
    named; not when params.yaml does not parse (the stages report that, naming the field)."""
    if os.environ.get("RAY_ADDRESS"):
        return False, None
    from lowlabel.config import load_params
    from lowlabel.errors import UserError

    try:
        runtime = load_params(params_file).runtime
    except (UserError, OSError, ValueError):
        return False, None
    return runtime.ray_address is None, runtime.local_num_cpus


def run_in_session(command: list[str], num_cpus: int | None) -> int:
    """Run ``command`` with the warm-stage server and a local Ray, started here when the first
    stage asks for it (:func:`lowlabel.runner.launch.session_address`); its exit code. A repro with
    nothing to train never starts Ray."""
    import shutil
    import tempfile

    from lowlabel.env import SESSION_RAY_ENV, SESSION_RAY_WANTED
    from lowlabel.runner.warm import SOCKET_ENV, WORKER_PRELOAD, WORKER_SOCKET_ENV

    # What ray.init does for a new local Ray when the mode is unset (token auth on, a token made
    # if there is none), decided before any stage imports Ray (it reads the mode once): the
    # stages that connect to it start before it.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Short: the server's socket path must stay within AF_UNIX's 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="llsess-"))
    address_file, socket_path, worker_socket_path = folder / "ray.json", folder / "warm.sock", folder / "worker.sock"
    wanted = Path(f"{address_file}{SESSION_RAY_WANTED}")
    env = {**os.environ, SESSION_RAY_ENV: str(address_file), SOCKET_ENV: str(socket_path), WORKER_SOCKET_ENV: str(worker_socket_path)}
    warm = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.warm", str(socket_path)], start_new_session=True)
    # The Ray workers' own: Ray is imported in each of them (see warm.Server.refusal).
    warm_workers = subprocess.Popen([sys.executable, "-m", "lowlabel.runner.warm", str(worker_socket_path), *WORKER_PRELOAD], start_new_session=True)
    child, ray_started = None, False
    try:
        _wait_listening(warm, socket_path)
        child = subprocess.Popen(command, env=env)
        forward = lambda signum, frame: child.send_signal(signal.SIGTERM)  # noqa: E731
        # SIGTERM for this process goes on to the command (dvc stops its stage, which closes its
        # MLflow run); a hangup reaches the command from the terminal, as Ctrl-C does.
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while True:
            try:
                return child.wait(timeout=None if ray_started else 0.1)
            except subprocess.TimeoutExpired:
                if wanted.exists():
                    ray_started = True
                    start_ray(address_file, num_cpus, child)
                    signal.signal(signal.SIGTERM, forward)  # ray.init installs its own
            except KeyboardInterrupt:
                continue  # the command got the same Ctrl-C: Ray stays up until it has unwound
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait()
        warm.terminate()
        warm_workers.terminate()
        if ray_started:
            _stop_ray()
        warm.wait()
        warm_workers.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_listening(server: subprocess.Popen, socket_path: Path, timeout_s: float = 10.0) -> None:
    """Until the warm-stage server listens (~0.1 s: it binds before importing anything), so the
    first stage is served too; a server that fails to come up only leaves the stages cold."""
    import time

    deadline = time.monotonic() + timeout_s
    while not socket_path.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def publish_session_address(path: Path, *, address: str | None = None, error: str | None = None) -> None:
    """For the session's stages: its Ray's address, or why there is none."""
    import json

    from lowlabel.atomic import atomic_write_text

    atomic_write_text(path, json.dumps({"address": address, "error": error}))


def start_ray(address_file: Path, num_cpus: int | None, child: subprocess.Popen) -> None:
    """Start the local Ray and publish its address (or why there is none) for the stages."""
    from lowlabel.runner.launch import ensure_ray

    try:
        ensure_ray(None, num_cpus, object_store_bytes=max(SESSION_INPUTS_FLOOR_BYTES, prepared_nbytes()))
    except SystemExit:  # SIGTERM while Ray started (ray.init's handler): the command stops too
        child.send_signal(signal.SIGTERM)
        publish_session_address(address_file, error="the session was stopped while its Ray started")
        return
    except Exception as error:
        publish_session_address(address_file, error=f"the session's local Ray did not start: {error}")
        return
    import ray

    publish_session_address(address_file, address=ray.get_runtime_context().gcs_address)


def _stop_ray() -> None:
    import ray

    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("usage: python -m lowlabel.runner.session COMMAND [ARGS...]   (e.g. dvc repro)", file=sys.stderr)
        return 2
    wanted, num_cpus = session_wanted(Path("params.yaml"))
    if not wanted:
        return subprocess.call(command)
    return run_in_session(command, num_cpus)


if __name__ == "__main__":
    from lowlabel.runner.warm import exit_without_teardown

    exit_without_teardown(main())  # Ray's modules take ~1 s to tear down, for nothing
