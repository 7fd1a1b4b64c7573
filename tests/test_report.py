"""The linear probe beside kNN: the fewshot stage's base evaluation and the report's table and margins."""

from __future__ import annotations

from lowlabel.config import parse_params


def test_base_evaluation_has_knn_and_linear_probe(tiny_prepared, one_torch_thread):
    from lowlabel.data.prepared import PreparedData
    from lowlabel.fewshot.protocol import FewShotProtocol, base_accuracies, random_encoder

    params = parse_params({"encoder": {"width": 8}, "fewshot": {"knn_k": 5}})
    data = PreparedData.load(tiny_prepared)
    encoder = random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed)
    scores = base_accuracies(FewShotProtocol.from_params(params), encoder, data)
    assert set(scores) == {"base_knn_acc", "base_linear_acc"}
    # 4 base classes (chance 0.25); the synthetic classes are bright squares at separate places.
    assert 0.5 < scores["base_linear_acc"] <= 1 and 0.5 < scores["base_knn_acc"] <= 1


def metrics(linear: bool) -> dict:
    def scores(knn: float, probe: float, acc: float) -> dict:
        out = {"base_knn_acc": knn, "protonet/5w5s": {"acc": acc, "ci95": 0.01}}
        return out | ({"base_linear_acc": probe} if linear else {})

    return {
        "prepare": {"base_classes": 5, "labeled": 20, "unlabeled": 100, "novel_classes": 5, "test_novel": 50},
        "pretrain": {"simclr": {"loss": 4.0, "knn_acc": 0.8, "knn_acc_init": 0.7, "images_per_s": 100.0}},
        "semisup": {},
        "fewshot": {"episodes": 10, "queries": 5, "feature_norm": "l2",
                    "encoders": {"random": scores(0.80, 0.75, 0.70), "pretrain/simclr": scores(0.85, 0.83, 0.74)}},
    }


def test_report_shows_the_linear_probe_and_its_margin():
    from lowlabel.stages.report import margins, markdown

    params = parse_params({"pretrain": {"methods": ["simclr"]}, "semisup": {"methods": ["supervised"]}})
    deltas = margins(metrics(linear=True), params)
    assert round(deltas["linear probe: pretrain/simclr - random"], 6) == 8.0
    assert round(deltas["knn: pretrain/simclr - random"], 6) == 5.0
    text = markdown(metrics(linear=True), params, deltas)
    assert "| encoder | base kNN-20 | base linear probe | base test (EMA) | protonet/5w5s |" in text
    assert "| pretrain/simclr | 85.0 | 83.0 | – | 74.0 ± 1.0 |" in text
    assert "- linear probe: pretrain/simclr - random: +8.0" in text
    # A fewshot.json written before the probe existed still reports (no probe column values, no margin).
    old = metrics(linear=False)
    old_deltas = margins(old, params)
    assert not any(k.startswith("linear probe") for k in old_deltas)
    assert "| random | 80.0 | – | – | 70.0 ± 1.0 |" in markdown(old, params, old_deltas)


def test_fewshot_stage_logs_linear_probe_and_its_data_input(tmp_path, tiny_prepared):
    """The real fewshot stage (random encoder only: no training stages needed) in a subprocess:
    fewshot.json and the MLflow run carry the linear probe beside kNN, and the run names the
    prepared data it evaluated on (context ``evaluation``)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from conftest import REPO
    from mlflow.tracking import MlflowClient

    from lowlabel.data.prepared import prepared_digest

    shutil.copytree(tiny_prepared, tmp_path / "data" / "prepared")
    params = {"encoder": {"width": 8}, "pretrain": {"methods": []}, "semisup": {"methods": [], "init": "random"},
              "fewshot": {"ways": [2], "shots": [1], "queries": 3, "episodes": 5, "knn_k": 5}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "lowlabel.stages.fewshot"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[fewshot] random: base kNN" in proc.stdout and " linear " in proc.stdout
    scores = json.loads((tmp_path / "metrics" / "fewshot.json").read_text())["encoders"]["random"]
    assert 0.5 < scores["base_linear_acc"] <= 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lowlabel").experiment_id])
    assert run.data.metrics["base/linear_acc"] == scores["base_linear_acc"]
    assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("prepared/fashion_mnist", prepared_digest(tiny_prepared))]
    assert [t.value for t in run.inputs.dataset_inputs[0].tags if t.key == "mlflow.data.context"] == ["evaluation"]
