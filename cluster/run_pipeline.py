"""Entry that `ray submit` runs on the head: the pipeline with every stage's TorchTrainer on the cluster.

    ray submit cluster/config.yaml cluster/run_pipeline.py -- [dvc repro args | exp run -S k=v ...]

`RAY_ADDRESS=auto` makes each stage attach to this cluster instead of starting a local Ray;
MLflow points at the head's tracking server when MLFLOW_TRACKING_URI is not already set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_CANDIDATES = [Path(__file__).resolve().parents[1], Path.home() / "lowlabel", Path("/tmp/lowlabel")]


def repo_root() -> Path:
    for candidate in REPO_CANDIDATES:
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise SystemExit(f"no lowlabel checkout with dvc.yaml in {[str(c) for c in REPO_CANDIDATES]}")


def main(argv: list[str]) -> int:
    root = repo_root()
    env = dict(os.environ)
    env.setdefault("RAY_ADDRESS", "auto")
    env.setdefault("MLFLOW_TRACKING_URI", f"http://{socket.gethostbyname(socket.gethostname())}:5000")
    venv_bin = root / ".venv" / "bin"
    if venv_bin.is_dir():
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    args = argv or ["repro"]
    if args[0] not in ("repro", "exp", "status", "metrics", "plots"):
        args = ["repro", *args]
    if not (root / ".git").exists():
        # The rsynced tree has .dvc but no .git: tell DVC to work without SCM (it refuses otherwise).
        init = ["config", "--local", "core.no_scm", "true"] if (root / ".dvc").is_dir() else ["init", "--no-scm", "-q"]
        subprocess.run(["dvc", *init], cwd=root, env=env, check=True)
    print(f"[submit] {root}: dvc {' '.join(args)} (RAY_ADDRESS={env['RAY_ADDRESS']}, MLflow {env['MLFLOW_TRACKING_URI']})", flush=True)
    return subprocess.run(["dvc", *args], cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
