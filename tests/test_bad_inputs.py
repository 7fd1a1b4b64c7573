"""The bad-input matrix: each row one bad input a user can give a stage.

Every row runs a stage in a process of its own, as ``python -m lowlabel.stages.<stage>``
would, in a work dir of its own laid out like the repository, and must end: exit code 2; the
last line on stderr an ``error:`` line naming the field or file and the bad value (no
traceback); no MLflow run left RUNNING (the only runs allowed are the FAILED ones the row
lists); nothing written into the stage's DVC outputs, and no temporary file left; no Ray
started; and where the problem is knowable before a run opens, no MLflow run at all. Tampered
files carry a payload that would create a marker file: it must not exist afterwards.

A stage that stops early spends most of its seconds importing torch, Ray and MLflow, so the
rows' processes are forks of one process that imported them once (tests/stage_forks.py),
run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import synthetic_images
from mlflow.tracking import MlflowClient
from PIL import Image

from lowlabel.data.prepared import channel_stats, write_prepared
from lowlabel.data.splits import make_split
from lowlabel.models.store import ENCODER_FILE
from lowlabel.runner.worker import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "prepare": ["lowlabel.stages.prepare"],
    "pretrain": ["lowlabel.stages.pretrain", "--method", "simclr"],
    "semisup": ["lowlabel.stages.semisup", "--method", "fixmatch"],
    "fewshot": ["lowlabel.stages.fewshot"],
}
# What each stage hands on (dvc.yaml's outs, metrics and plots): a failed stage writes none of it.
STAGE_OUTPUTS = {
    "prepare": ["data/prepared", "metrics/prepare.json"],
    "pretrain": ["models/pretrain/simclr", "metrics/pretrain/simclr.json", "plots/pretrain/simclr.csv"],
    "semisup": ["models/semisup/fixmatch", "metrics/semisup/fixmatch.json", "plots/semisup/fixmatch.csv"],
    "fewshot": ["metrics/fewshot.json", "plots/fewshot.csv"],
}
# A tampered file's code would create this; the product must never run it.
PAYLOAD_MARKER = "PAYLOAD-RAN"
TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-")  # lowlabel.atomic's temporary names
IMAGE_SIZE = 28


# --------------------------------------------------------------------------- inputs


class RunsCode:
    """Unpickled, it creates ``marker``: proof that loading a file ran its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_params(wd: Path, **sections: dict[str, Any]) -> None:
    """A small pipeline (1 worker, tiny encoder) whose MLflow store and Ray storage live in ``wd``;
    ``sections`` override it key by key."""
    params: dict[str, Any] = {
        "data": {"novel_classes": [4, 5], "labels_per_class": 2},
        "encoder": {"width": 8},
        "runtime": {"workers": 1, "storage_path": str(wd / "ray")},
        "tracking": {"uri": f"sqlite:///{wd / 'mlflow.db'}", "artifact_root": str(wd / "mlartifacts")},
        "pretrain": {"methods": ["simclr"], "epochs": 1, "min_steps": 0, "batch_size": 32},
        "semisup": {"methods": ["fixmatch"], "init": "random", "steps": 2, "batch_size": 8},
        "fewshot": {"ways": [2], "shots": [1, 5], "queries": 10, "episodes": 5},
    }
    for key, value in sections.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    (wd / "params.yaml").write_text(yaml.safe_dump(params))


def image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``: 28 px gray noise, ``per_class[name]`` images per class."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, count in per_class.items():
        (root / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8), mode="L").save(root / name / f"{i}.png")
    return root


def prepared(wd: Path, labels_per_class: int = 2, drop_test_class: int | None = None) -> None:
    """``wd/data/prepared`` as the prepare stage writes it: conftest's ``tiny_prepared`` data (6
    classes of 16 px squares, novel 4 and 5, 40 training and 20 test images each), with
    ``labels_per_class`` and ``drop_test_class`` (a class without test images) to vary it."""
    train_x, train_y = synthetic_images(40, 6, seed=1)
    test_x, test_y = synthetic_images(20, 6, seed=2)
    if drop_test_class is not None:
        keep = test_y != drop_test_class
        test_x, test_y = test_x[keep], test_y[keep]
    split = make_split(train_y, test_y, novel_classes=[4, 5], labels_per_class=labels_per_class, seed=0)
    mean, std = channel_stats(train_x[split.pretrain])
    info = {"class_names": [str(c) for c in range(6)], "mean": mean, "std": std, "skipped": []}
    write_prepared(wd / "data" / "prepared", train_x, train_y, test_x, test_y, split, info)


def encoder_bomb(path: Path, marker: Path) -> None:
    """An encoder file in the pipeline's format whose weights are a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": "conv4", "width": 8, "in_chans": 1, "state_dict": RunsCode(marker)}, path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    id: str
    stage: str
    setup: Callable[[Path], None]  # writes params.yaml and the row's inputs into the work dir
    # What the stage's last stderr line must name (the field or file, the bad value); "{wd}" is the work dir.
    names: tuple[str, ...]
    # Statuses of the MLflow runs the stage may leave: none where the problem is knowable
    # before a run opens; prepare opens its run first, so it ends FAILED.
    runs: tuple[str, ...] = ()


def _unknown_key(wd: Path) -> None:
    write_params(wd, pretrain={"epohcs": 3})


def _wrong_type(wd: Path) -> None:
    write_params(wd, pretrain={"epochs": "two"})


def _out_of_range(wd: Path) -> None:
    write_params(wd, semisup={"fixmatch": {"threshold": 1.5}})


def _no_novel_class(wd: Path) -> None:
    write_params(wd, data={"novel_classes": []})


def _folder_row(per_class: dict[str, int], **data: Any) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        image_folder(wd / "images", per_class)
        write_params(wd, data={"source": "imagefolder", "root": str(wd / "images"), "novel_classes": [1], "labels_per_class": 2, **data})

    return setup


def _corrupt_image(wd: Path) -> None:
    _folder_row({"a": 6, "b": 6}, on_corrupt="error")(wd)
    (wd / "images" / "a" / "zz.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _truncated_image(wd: Path) -> None:
    _folder_row({"a": 6, "b": 6}, on_corrupt="error")(wd)
    whole = (wd / "images" / "b" / "0.png").read_bytes()
    (wd / "images" / "b" / "zz.png").write_bytes(whole[: len(whole) // 2])


def _on_prepared(labels_per_class: int = 2, drop_test_class: int | None = None, **sections: Any) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        prepared(wd, labels_per_class, drop_test_class)
        write_params(wd, **sections)

    return setup


def _unwritable_storage(wd: Path) -> None:
    prepared(wd)
    (wd / "a-file").write_text("a directory cannot be made under a file, even by root")
    write_params(wd, runtime={"storage_path": str(wd / "a-file" / "ray")})


def _unreachable_tracking(wd: Path) -> None:
    prepared(wd)
    write_params(wd, tracking={"uri": f"http://127.0.0.1:{closed_port()}"})


class _Launched(Exception):
    """Raised where the stage would launch its Ray job; carries the job's run name."""


def ray_run_of_pretrain(wd: Path) -> str:
    """The Ray run pretrain@simclr launches (and a re-run resumes) in ``wd``: named by the stage
    itself, whatever goes into the name, and stopped right there (no MLflow run, no Ray)."""
    from lowlabel.config import load_params
    from lowlabel.stages import pretrain as stage

    def launch(params, loop, config, name):
        raise _Launched(name)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(wd)
        patch.setattr(stage, "train_in_ray", launch)
        patch.setattr(stage, "tracked_run", lambda *args, **kwargs: contextlib.nullcontext())
        patch.setattr(stage, "log_prepared_input", lambda *args, **kwargs: None)  # no run to log to
        with pytest.raises(_Launched) as launched:
            stage.pretrain(load_params("params.yaml"), "simclr")
    return str(launched.value)


def _unusable_tracking_store(wd: Path) -> None:
    prepared(wd)
    (wd / "a-file").write_text("no sqlite store can be made under a file")
    write_params(wd, tracking={"uri": f"sqlite:///{wd / 'a-file' / 'mlflow.db'}"})


def _tampered_checkpoint(wd: Path) -> None:
    """A pickle payload as the state file of the checkpoint a re-run of this stage would resume from."""
    prepared(wd)
    write_params(wd)
    state = wd / "ray" / ray_run_of_pretrain(wd) / "checkpoint_2026-01-01_00-00-00.000000" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_bytes(pickle.dumps({"epoch": 1, "model": RunsCode(wd / PAYLOAD_MARKER)}))


def _encoder_bomb_for(stage_params: dict[str, Any]) -> Callable[[Path], None]:
    def setup(wd: Path) -> None:
        prepared(wd)
        encoder_bomb(wd / "models" / "pretrain" / "simclr" / ENCODER_FILE, wd / PAYLOAD_MARKER)
        write_params(wd, **stage_params)

    return setup


ROWS = [
    Row("unknown_key", "prepare", _unknown_key, ("params.yaml", "pretrain.epohcs", "unknown key (value 3)")),
    Row("wrong_type", "pretrain", _wrong_type, ("params.yaml", "pretrain.epochs", "(got 'two')")),
    Row("out_of_range", "semisup", _out_of_range, ("params.yaml", "semisup.fixmatch.threshold", "(got 1.5)")),
    Row("novel_classes_empty", "fewshot", _no_novel_class, ("params.yaml", "data.novel_classes", "(got [])")),
    Row("imagefolder_empty", "prepare", _folder_row({}), ("data.root='{wd}/images'", "no class folders"), runs=("FAILED",)),
    Row("imagefolder_one_class", "prepare", _folder_row({"a": 6}), ("data.root='{wd}/images'", "one class folder ('a')"), runs=("FAILED",)),
    Row("imagefolder_one_image_per_class", "prepare", _folder_row({"a": 1, "b": 1}),
        ("data.root='{wd}/images'", "{'a': 1, 'b': 1}"), runs=("FAILED",)),
    Row("corrupt_image", "prepare", _corrupt_image, ("{wd}/images/a/zz.png", "data.on_corrupt='error'"), runs=("FAILED",)),
    Row("truncated_image", "prepare", _truncated_image, ("{wd}/images/b/zz.png", "data.on_corrupt='error'"), runs=("FAILED",)),
    Row("novel_classes_all", "prepare", _folder_row({"a": 6, "b": 6, "c": 6}, novel_classes=[0, 1, 2]),
        ("data.novel_classes", "[0, 1, 2]", "no base classes"), runs=("FAILED",)),
    Row("labels_per_class_over_class_size", "prepare", _folder_row({"a": 6, "b": 6}, labels_per_class=6),
        ("data.labels_per_class is 6", "only 5 training images"), runs=("FAILED",)),
    Row("labels_per_class_equals_class_size", "semisup", _on_prepared(labels_per_class=40, data={"labels_per_class": 40}),
        ("data/prepared", "data.labels_per_class=40", "['fixmatch'] need unlabeled images")),
    Row("shots_queries_over_novel_class", "pretrain", _on_prepared(fewshot={"queries": 16}),
        ("data/prepared", "fewshot.queries (16)", "{4: 20, 5: 20}")),
    Row("shots_queries_over_novel_class_at_fewshot", "fewshot", _on_prepared(fewshot={"queries": 16}),
        ("fewshot.shots=5", "fewshot.queries=16")),
    Row("novel_class_without_images", "pretrain", _on_prepared(drop_test_class=5), ("data/prepared", "fewshot.queries (10)", "{5: 0}")),
    Row("pretrain_batch_over_data", "pretrain", _on_prepared(pretrain={"batch_size": 512}),
        ("data/prepared", "pretrain.batch_size=512", "160 base-class training images")),
    Row("tracking_unreachable", "pretrain", _unreachable_tracking, ("tracking.uri", "http://127.0.0.1:", "unreachable")),
    Row("tracking_store_unusable", "pretrain", _unusable_tracking_store, ("tracking.uri", "sqlite:///{wd}/a-file/mlflow.db", "cannot be used")),
    Row("storage_unwritable", "pretrain", _unwritable_storage, ("runtime.storage_path='{wd}/a-file/ray'", "cannot be written")),
    # Found once the Ray run's name is known, after the MLflow run opened: it ends FAILED, no job starts.
    Row("checkpoint_tampered", "pretrain", _tampered_checkpoint, ("{wd}/ray/pretrain-simclr-", STATE_FILE), runs=("FAILED",)),
    Row("encoder_bomb_semisup_init", "semisup", _encoder_bomb_for({"semisup": {"init": "simclr"}}),
        (f"models/pretrain/simclr/{ENCODER_FILE}", "pretrain@simclr")),
    Row("encoder_bomb_fewshot", "fewshot", _encoder_bomb_for({"semisup": {"methods": []}}),
        (f"models/pretrain/simclr/{ENCODER_FILE}", "pretrain@simclr")),
]


# --------------------------------------------------------------------------- running them


@dataclass(frozen=True)
class Outcome:
    wd: Path
    proc: subprocess.CompletedProcess
    files_before: dict[str, tuple[int, int]]
    outputs_before: set[str]


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def stage_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # params.yaml decides, not the caller's shell
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """The rows this session selected, each set up in its own work dir, then run as forks of
    one process that imported the stack once, one per core (at least 2) at a time."""
    rows = [item.callspec.params["row"] for item in request.session.items
            if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})]
    logs = tmp_path_factory.mktemp("logs")
    jobs, before = [], {}
    for row in rows:
        wd = tmp_path_factory.mktemp(row.id)
        row.setup(wd)
        before[row.id] = (wd, files(wd), {out for out in STAGE_OUTPUTS[row.stage] if (wd / out).exists()})
        module, *args = STAGES[row.stage]
        jobs.append({"cwd": str(wd), "module": module, "args": args, "stdout": str(logs / f"{row.id}.out"), "stderr": str(logs / f"{row.id}.err")})
    spec = logs / "jobs.json"
    spec.write_text(json.dumps({"parallel": min(4, max(2, os.cpu_count() or 2)), "jobs": jobs}))
    forks = subprocess.run([sys.executable, str(REPO / "tests" / "stage_forks.py"), str(spec)], env=stage_env(),
                           capture_output=True, text=True, timeout=600)
    assert forks.returncode == 0, forks.stderr[-3000:]
    codes = json.loads(forks.stdout.splitlines()[-1])
    outcomes = {}
    for row, job, code in zip(rows, jobs, codes):
        proc = subprocess.CompletedProcess([job["module"], *job["args"]], code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
        outcomes[row.id] = Outcome(before[row.id][0], proc, *before[row.id][1:])
    return outcomes


def mlflow_statuses(wd: Path) -> list[str]:
    db = wd / "mlflow.db"
    if not db.exists():  # no run was ever opened (and querying would create the store)
        return []
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.info.status for r in client.search_runs(experiments)) if experiments else []


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_stops_the_stage_cleanly(row: Row, outcomes: dict[str, Outcome]):
    out = outcomes[row.id]
    wd, proc = out.wd, out.proc
    shown = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    print(f"[{row.id}] exit {proc.returncode}: {last}")
    assert last.startswith("error: "), shown
    for name in row.names:
        assert name.replace("{wd}", str(wd)) in last, f"{name!r} not in the last line: {last}"

    # No run left RUNNING; none at all where the problem is knowable before a run opens.
    assert mlflow_statuses(wd) == sorted(row.runs)
    # No Ray started, no training job launched.
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr, shown
    assert not re.search(r"^\[\S+\] inputs:", proc.stdout + proc.stderr, re.MULTILINE), shown

    # Nothing written into the stage's outputs, no temporary file or folder left anywhere.
    assert {o for o in STAGE_OUTPUTS[row.stage] if (wd / o).exists()} == out.outputs_before
    changed = {path for path, stat in files(wd).items() if out.files_before.get(path) != stat}
    assert {p for p in changed if not p.startswith(("mlflow.db", "mlartifacts/"))} == set(), "files written or changed"
    assert [str(p) for p in wd.rglob("*") if TEMP_NAME.match(p.name)] == []
    # Whatever a tampered file holds did not run.
    assert not (wd / PAYLOAD_MARKER).exists(), "a payload in a loaded file ran"


def test_the_payloads_run_code_when_unpickled_unsafely(tmp_path):
    """The tampered files of the rows are live: an unsafe load runs their code (so the rows'
    marker check can fail), a safe one refuses them."""
    marker = tmp_path / PAYLOAD_MARKER
    pickle.loads(pickle.dumps({"epoch": 1, "model": RunsCode(marker)}))
    assert marker.exists()
    marker.unlink()
    encoder_bomb(tmp_path / ENCODER_FILE, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / ENCODER_FILE, weights_only=True)
    assert not marker.exists()
    torch.load(tmp_path / ENCODER_FILE, weights_only=False)
    assert marker.exists()
