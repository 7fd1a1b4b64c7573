"""A real `dvc repro` of the whole pipeline in a temp git repo, on a tiny config.

Then a no-op second repro, then a param change that re-runs only the affected stages.
Uses the real Fashion-MNIST files Debian's dataset-fashion-mnist installs (./pipeline setup).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import FASHION_DIR, REPO
from dvc_project import ran_stages
from mlflow.tracking import MlflowClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (./pipeline setup installs it)"),
]

TINY = {
    "data": {"max_train_per_class": 60, "max_test_per_class": 30, "labels_per_class": 2},
    "encoder": {"width": 16},
    "pretrain": {"epochs": 1, "min_steps": 0, "batch_size": 64},
    "semisup": {"steps": 4, "eval_every": 2, "batch_size": 8, "fixmatch": {"mu": 2, "threshold": 0.95, "lambda_u": 1.0}},
    # Meta from the params.yaml start (fixmatch), on the 2 labels per class: 1 shot + 1 query.
    "meta": {"episodes_from": "labels", "ways": 3, "shots": 1, "queries": 1, "meta_batch": 2, "steps": 2, "eval_every": 2, "eval_episodes": 10},
    "fewshot": {"episodes": 50, "queries": 5, "shots": [1, 5]},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def ray_processes_under(temp_dir: Path) -> list[str]:
    """Command lines of running processes that name ``temp_dir`` (a Ray's daemons do)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if str(temp_dir) in line:
            found.append(line)
    return found


def sh(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "src"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if src.is_dir() else {}))
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    venv_bin = Path(os.sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "LOWLABEL_RAY_TMP": str(tmp_path_factory.mktemp("ray")),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.ray/\nmetrics/\nplots/\n")
    sh(["git", "init", "-q"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    # As ./pipeline repro runs it: one local Ray for every stage (later repros: one per stage).
    first = sh([os.sys.executable, "-m", "lowlabel.runner.session", "dvc", "repro"], root, env)
    return root, env, first


def test_first_repro_runs_every_stage_and_writes_outputs(project):
    root, env, first = project
    ran = ran_stages(first.stdout)
    assert sorted(ran) == sorted(
        ["source", "prepare", "pretrain@simclr", "pretrain@moco", "semisup@fixmatch", "semisup@supervised", "meta@protonet", "fewshot", "report"]
    )
    order = {stage: i for i, stage in enumerate(ran)}
    assert order["source"] == 0 and order["prepare"] == 1 and order["report"] == len(ran) - 1
    assert max(order["pretrain@simclr"], order["pretrain@moco"]) < min(order["semisup@fixmatch"], order["semisup@supervised"])
    assert order["semisup@fixmatch"] < order["meta@protonet"] < order["fewshot"]
    for path in ("data/prepared/split.json", "models/pretrain/simclr/encoder.pt", "models/semisup/fixmatch/encoder.pt", "models/meta/protonet/encoder.pt", "models/meta/protonet/meta_head.pt", "reports/report.md", "reports/fewshot_shots.png"):
        assert (root / path).is_file(), path
    fewshot = json.loads((root / "metrics/fewshot.json").read_text())
    assert set(fewshot["encoders"]) == {"random", "pretrain/simclr", "pretrain/moco", "semisup/fixmatch", "semisup/supervised", "meta/protonet"}
    for scores in fewshot["encoders"].values():
        for setting in ("protonet/5w1s", "protonet/5w5s"):
            assert 0.0 < scores[setting]["acc"] <= 1.0 and scores[setting]["ci95"] > 0
    # The meta-trained encoder also through its method's own head (ProtoNet: unnormalised prototypes).
    assert {"own/5w1s", "own/5w5s"} <= set(fewshot["encoders"]["meta/protonet"])
    report = json.loads((root / "metrics/report.json").read_text())
    assert "knn: pretrain/simclr - random" in report["margins"]
    # Five Ray Train jobs, one Ray started (Ray makes a session folder per start); none left running.
    ray_tmp = Path(env["LOWLABEL_RAY_TMP"])
    assert len([p for p in ray_tmp.iterdir() if p.name.startswith("session_2")]) == 1
    assert not ray_processes_under(ray_tmp)
    assert "protonet/5w5s: meta/protonet - semisup/fixmatch" in report["margins"]
    assert "| random |" in (root / "reports/report.md").read_text()


def test_every_mlflow_run_finished_and_linked(project):
    root, _, _ = project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    # One `dvc repro`, one pipeline run: every stage run of it nested under it.
    (parent,) = [r for r in runs if r.data.tags.get("lowlabel.pipeline") == "true"]
    runs = [r for r in runs if r is not parent]
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parent.info.run_id}
    stages = sorted(r.data.tags["lowlabel.stage"] for r in runs)
    assert stages == sorted(["prepare", "pretrain", "pretrain", "semisup", "semisup", "meta"] + ["fewshot"] * 6 + ["report"])
    pretrain = next(r for r in runs if r.data.tags.get("lowlabel.dvc_stage") == "pretrain@simclr")
    fixmatch = next(r for r in runs if r.data.tags.get("lowlabel.dvc_stage") == "semisup@fixmatch")
    assert fixmatch.data.tags["lowlabel.init_run_id"] == pretrain.info.run_id
    meta = next(r for r in runs if r.data.tags.get("lowlabel.dvc_stage") == "meta@protonet")
    assert meta.data.tags["lowlabel.init_run_id"] == fixmatch.info.run_id and "val_acc" in meta.data.metrics
    assert "knn_acc" in pretrain.data.metrics
    # MLflow 3 keeps models as LoggedModel entities linked to their source run.
    models = client.search_logged_models([pretrain.info.experiment_id], filter_string=f"source_run_id = '{pretrain.info.run_id}'")
    assert [m.name for m in models] == ["encoder"]
    # The report: links and margins on the pipeline run, each trained encoder registered.
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["lowlabel.stage_run.pretrain.simclr"] == pretrain.info.run_id
    assert any(k.startswith("report/") for k in parent.data.metrics)
    assert parent.data.params["pretrain.epochs"] == "1"
    assert sorted(m.name for m in client.search_registered_models()) == [
        "lowlabel-meta-protonet", "lowlabel-pretrain-moco", "lowlabel-pretrain-simclr", "lowlabel-semisup-fixmatch", "lowlabel-semisup-supervised"]
    import mlflow.pytorch

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    best = next(m for m in client.search_registered_models() if "best-fewshot" in m.aliases)
    assert mlflow.pytorch.load_model(f"models:/{best.name}@best-fewshot") is not None


def test_second_repro_is_a_noop(project):
    root, env, _ = project
    again = sh(["dvc", "repro"], root, env)
    assert ran_stages(again.stdout) == ["source"]  # always runs: fingerprints the source data, unchanged


def test_param_change_reruns_only_affected_stages(project):
    root, env, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fewshot"]["episodes"] = 60
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], root, env)
    assert ran_stages(out.stdout) == ["source", "fewshot", "report"]
    assert json.loads((root / "metrics/fewshot.json").read_text())["episodes"] == 60
