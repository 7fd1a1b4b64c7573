"""One local Ray for a whole ``dvc repro``: ``python -m lowlabel.runner.session COMMAND [ARGS...]``.

Each training stage is a process of its own, and alone it starts an embedded Ray and stops it
again: ~6 s and ~2 s on 2 cores, five times in the default pipeline. ``./pipeline repro`` runs
``dvc repro`` under this instead. One local Ray is started the way a stage would start it
(:func:`lowlabel.runner.launch.ensure_ray`: the CPUs of ``runtime.local_num_cpus``, the same temp
dir, the same terminal-signal handling), every stage is handed its address as ``RAY_ADDRESS``
and attaches to it, and it is stopped when the command ends, however it ends. Where a cluster is
named (``RAY_ADDRESS``, ``runtime.ray_address``) the command runs as it is.
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
    """Run ``command`` with ``RAY_ADDRESS`` pointing at a local Ray started here; its exit code."""
    import ray

    from lowlabel.runner.launch import ensure_ray

    ensure_ray(None, num_cpus, object_store_bytes=max(SESSION_INPUTS_FLOOR_BYTES, prepared_nbytes()))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        child = subprocess.Popen(command, env=env)
        # SIGTERM for this process goes on to the command (dvc stops its stage, which closes
        # its MLflow run); a hangup reaches the command from the terminal, as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # the command got the same Ctrl-C: Ray stays up until it has unwound
    finally:
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
    sys.exit(main())
