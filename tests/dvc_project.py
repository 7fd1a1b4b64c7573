"""A temporary git + DVC project made of this checkout's stages and code, for tests that run the
real ``dvc`` (repro, exp run, status) in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# What the stages write that git must not see (DVC tracks the outputs; .lowlabel/ is bookkeeping).
GIT_IGNORED = ("mlflow.db", "mlartifacts/", ".ray/", "metrics/", "plots/", "/.lowlabel/")


def ran_stages(output: str) -> list[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` says it ran, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def dvc_project(root: Path, params: dict[str, Any], extra_env: dict[str, str] | None = None) -> Callable[..., str]:
    """``root`` as a committed git + DVC project: this repo's dvc.yaml, .dvcignore and src/, with
    ``params`` as params.yaml. Returns ``sh(*args) -> stdout``, which runs a command there (the
    venv's tools first on PATH, this project's src importable, no tracking URI, Ray address or
    DVC experiment inherited from the test process) and fails the test on a non-zero exit."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".dvcignore", root)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("".join(f"{line}\n" for line in GIT_IGNORED))
    env = {
        **os.environ,
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        **(extra_env or {}),
    }
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DVC_EXP_NAME"):
        env.pop(key, None)

    def sh(*args: str) -> str:
        proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(*command)
    return sh
