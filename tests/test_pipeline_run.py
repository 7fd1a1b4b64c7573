"""One pipeline run is one thing in MLflow: a parent run per ``dvc repro`` / ``dvc exp run``,
the stage runs nested under it, the report's links, margins and registered encoders.

Real sqlite MLflow stores throughout; the DVC test is a real (tiny, Ray-free) ``dvc repro
prepare`` and ``dvc exp run`` in a temp git repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from dvc_project import dvc_project, ran_stages
from mlflow.tracking import MlflowClient

from lowlabel.config import flatten, parse_params
from lowlabel.tracking import (
    BEST_ALIAS,
    PIPELINE_RUN_FILE,
    TAG_DVC_EXP,
    TAG_INIT_RUN,
    TAG_PARENT,
    TAG_PIPELINE,
    TAG_STAGE,
    pipeline_run_id,
    stage_run,
    start_pipeline_run,
)


def open_pipeline(uri: str, root: Path, invocation: str = "123@1.000") -> str:
    params = flatten(parse_params({}))
    return start_pipeline_run(tracking_uri=uri, artifact_root=str(root / "mlartifacts"), experiment="lowlabel", params=params, root=root,
                              invocation=invocation)


def test_pipeline_run_records_params_and_nests_only_its_own_invocation(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brave-fern")
    run_id = open_pipeline(mlflow_uri, tmp_path)
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "brave-fern"
    assert parent.data.tags[TAG_PIPELINE] == "true" and parent.data.tags[TAG_DVC_EXP] == "brave-fern"
    assert "mlflow.source.git.commit" in parent.data.tags
    assert parent.data.params["pretrain.epochs"] == "2" and parent.data.params["tracking.experiment"] == "lowlabel"
    assert len(parent.data.params) == len(flatten(parse_params({})))  # > 100: logged in batches
    record = json.loads((tmp_path / PIPELINE_RUN_FILE).read_text())
    assert record["run_id"] == run_id

    import lowlabel.tracking as tracking

    monkeypatch.setattr(tracking, "dvc_invocation", lambda: "123@1.000")
    assert pipeline_run_id(mlflow_uri, tmp_path) == run_id
    assert pipeline_run_id(mlflow_uri + "-elsewhere", tmp_path) is None
    monkeypatch.setattr(tracking, "dvc_invocation", lambda: "999@2.000")  # a later `dvc repro -s fewshot`
    assert pipeline_run_id(mlflow_uri, tmp_path) is None
    monkeypatch.setattr(tracking, "dvc_invocation", lambda: None)  # a stage run by hand
    assert pipeline_run_id(mlflow_uri, tmp_path) is None

    # A failing nested stage run marks the pipeline run FAILED.
    with pytest.raises(RuntimeError), stage_run(tracking_uri=mlflow_uri, artifact_root=str(tmp_path / "a"), experiment="lowlabel", run_name="s",
                                                tags={TAG_STAGE: "prepare"}, params={}, root=tmp_path, parent_run_id=run_id) as child:
        raise RuntimeError("boom")
    assert client.get_run(child.info.run_id).data.tags[TAG_PARENT] == run_id
    assert client.get_run(run_id).info.status == "FAILED"


def test_dvc_invocation_is_the_nearest_dvc_ancestor():
    from lowlabel.tracking import _is_dvc, dvc_invocation

    assert dvc_invocation() is None  # pytest is no dvc
    assert _is_dvc(["/v/bin/python", "/v/bin/dvc", "repro"]) and _is_dvc(["dvc", "exp", "run"]) and _is_dvc(["python3", "-m", "dvc", "repro"])
    assert not _is_dvc(["bash", "./pipeline", "repro"]) and not _is_dvc(["python", "-m", "lowlabel.stages.source"])


def fewshot_scores(acc_5s: float) -> dict:
    return {"base_knn_acc": 0.8, "protonet/5w1s": {"acc": acc_5s - 0.1, "ci95": 0.01}, "protonet/5w5s": {"acc": acc_5s, "ci95": 0.01}}


def fake_stages(uri: str, root: Path, parent: str, accs: dict[str, float]) -> dict[str, str]:
    """Training runs that log an encoder, and the fewshot runs that evaluated them (as the stages
    tag them); returns encoder name -> training run id."""
    import mlflow

    from lowlabel.models.encoders import build_encoder
    from lowlabel.tracking import log_encoder

    common = dict(tracking_uri=uri, artifact_root=str(root / "mlartifacts"), experiment="lowlabel", params={}, root=root)
    trained = {}
    for name in accs:
        if name == "random":
            continue
        stage, _, method = name.partition("/")
        with stage_run(run_name=name, tags={TAG_STAGE: stage, "lowlabel.method": method}, **common) as run:
            log_encoder(build_encoder("conv4", 1, width=4), in_chans=1, image_size=16)
        trained[name] = run.info.run_id
    for name, acc in accs.items():
        tags = {TAG_STAGE: "fewshot", "lowlabel.method": name, TAG_INIT_RUN: trained.get(name, "")}
        with stage_run(run_name=f"fewshot {name}", tags=tags, parent_run_id=parent, **common):
            for key, value in fewshot_scores(acc).items():
                if isinstance(value, dict):
                    mlflow.log_metric(f"fewshot/{key}/acc", value["acc"])
    with stage_run(run_name="prepare", tags={TAG_STAGE: "prepare", "lowlabel.method": "fashion_mnist"}, **common):
        mlflow.log_metrics({"base_classes": 5.0, "labeled": 20.0})
    return trained


def test_report_links_stage_runs_logs_margins_and_registers_the_best_encoder(mlflow_uri, tmp_path):
    import mlflow.pytorch
    import torch

    from lowlabel.stages.report import link_and_register

    parent = open_pipeline(mlflow_uri, tmp_path)
    accs = {"random": 0.70, "pretrain/simclr": 0.74, "pretrain/moco": 0.72, "semisup/fixmatch": 0.73}
    trained = fake_stages(mlflow_uri, tmp_path, parent, accs)
    metrics = {"prepare": {"base_classes": 5, "labeled": 20}, "fewshot": {"encoders": {k: fewshot_scores(v) for k, v in accs.items()}}}
    deltas = {"knn: pretrain/simclr - random": 4.0, "protonet/5w5s: pretrain/simclr - random": 4.0}
    common = dict(tracking_uri=mlflow_uri, artifact_root=str(tmp_path / "mlartifacts"), experiment="lowlabel", params={}, root=tmp_path)
    with stage_run(run_name="report", tags={TAG_STAGE: "report"}, parent_run_id=parent, **common) as report_run:
        link_and_register(metrics, deltas, report_run)

    client = MlflowClient(mlflow_uri)
    got = client.get_run(parent)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["report/knn_pretrain_simclr_-_random"] == 4.0
    links = {k.removeprefix("lowlabel.stage_run."): v for k, v in got.data.tags.items() if k.startswith("lowlabel.stage_run.")}
    assert links["pretrain.simclr"] == trained["pretrain/simclr"] and links["semisup.fixmatch"] == trained["semisup/fixmatch"]
    assert {"fewshot.random", "fewshot.pretrain/simclr", "prepare", "report"} <= set(links)
    assert links["report"] == report_run.info.run_id

    names = sorted(m.name for m in client.search_registered_models())
    assert names == ["lowlabel-pretrain-moco", "lowlabel-pretrain-simclr", "lowlabel-semisup-fixmatch"]
    best = client.get_model_version_by_alias("lowlabel-pretrain-simclr", BEST_ALIAS)
    assert best.run_id == trained["pretrain/simclr"] and best.tags["fewshot_setting"] == "protonet/5w5s"
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pytorch.load_model(f"models:/lowlabel-pretrain-simclr@{BEST_ALIAS}")
    assert model(torch.zeros(2, 1, 16, 16)).shape[0] == 2

    # The next report (moco now best): the alias moves, the same runs keep their versions.
    accs2 = dict(accs, **{"pretrain/moco": 0.80})
    parent2 = open_pipeline(mlflow_uri, tmp_path, invocation="124@2.000")
    for name, acc in accs2.items():  # the fewshot stage re-ran; training stages were cached
        with stage_run(run_name=f"fewshot {name}", tags={TAG_STAGE: "fewshot", "lowlabel.method": name, TAG_INIT_RUN: trained.get(name, "")},
                       parent_run_id=parent2, **common):
            for key, value in fewshot_scores(acc).items():
                if isinstance(value, dict):
                    mlflow.log_metric(f"fewshot/{key}/acc", value["acc"])
    metrics2 = {**metrics, "fewshot": {"encoders": {k: fewshot_scores(v) for k, v in accs2.items()}}}
    with stage_run(run_name="report", tags={TAG_STAGE: "report"}, parent_run_id=parent2, **common) as report_run2:
        link_and_register(metrics2, deltas, report_run2)
    assert client.get_model_version_by_alias("lowlabel-pretrain-moco", BEST_ALIAS).run_id == trained["pretrain/moco"]
    assert BEST_ALIAS not in client.get_registered_model("lowlabel-pretrain-simclr").aliases
    assert [str(v.version) for v in client.search_model_versions("name = 'lowlabel-pretrain-simclr'")] == ["1"]
    # The cached training stage is linked from the new pipeline run too.
    assert client.get_run(parent2).data.tags["lowlabel.stage_run.pretrain.simclr"] == trained["pretrain/simclr"]


@pytest.mark.slow
def test_dvc_repro_and_exp_run_are_one_parent_run_each(tmp_path):
    """A real `dvc repro prepare` then `dvc exp run -n NAME prepare` (Fashion-MNIST capped to a
    few images per class): each makes one pipeline run; prepare's run is nested under the first;
    the exp run (prepare cached) is named after the DVC experiment; nothing re-ran for it."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path / "project"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"max_train_per_class": 20, "max_test_per_class": 10}
    sh = dvc_project(root, params)
    assert ran_stages(sh("dvc", "repro", "prepare")) == ["source", "prepare"]
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "lock")
    assert ran_stages(sh("dvc", "exp", "run", "-n", "tiny-exp", "prepare")) == ["source"]

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lowlabel")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get(TAG_PIPELINE) == "true"]
    stages = [r for r in runs if r.data.tags.get(TAG_PIPELINE) != "true"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    first, exp = parents
    assert first.info.run_name.startswith("pipeline ") and exp.info.run_name == "tiny-exp"
    assert exp.data.tags[TAG_DVC_EXP] == "tiny-exp"
    assert first.data.params["data.max_train_per_class"] == "20"
    assert [(r.data.tags[TAG_STAGE], r.data.tags.get(TAG_PARENT)) for r in stages] == [("prepare", first.info.run_id)]


def test_source_stage_warns_at_once_when_the_tracking_server_is_down(tmp_path, monkeypatch, capsys):
    """The pipeline run is a convenience: a dead server costs the source stage a warning within
    seconds (not MLflow's minutes of retries), and the stages that log stop with their own error."""
    import socket
    import time

    from lowlabel import tracking
    from lowlabel.config import parse_params
    from lowlabel.stages.source import open_pipeline_run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    monkeypatch.setattr(tracking, "dvc_invocation", lambda: "123@1.000")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over tracking.uri (earlier tests may set it)
    started = time.monotonic()
    run_id = open_pipeline_run(parse_params({"tracking": {"uri": f"http://127.0.0.1:{port}"}}), tmp_path)
    assert run_id is None and time.monotonic() - started < 10
    assert f"[source] warning: no MLflow pipeline run in http://127.0.0.1:{port}" in capsys.readouterr().out
