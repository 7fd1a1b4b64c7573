"""``runtime.workers: auto`` resolved against a local Ray with a known CPU count (2)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from lowlabel.config import ConfigError, parse_params
from lowlabel.runner.launch import ClusterError, resolve_workers, run_training_job

pytestmark = pytest.mark.slow


def test_auto_counts_the_cluster_cpus(ray_two_cpus):
    assert ray_two_cpus.cluster_resources().get("GPU", 0) == 0
    assert resolve_workers("auto", 1, use_gpu=False) == 2
    assert resolve_workers("auto", 0.5, use_gpu=False) == 4
    assert resolve_workers("auto", 2, use_gpu=False) == 1
    assert resolve_workers("auto", 4, use_gpu=False) == 1  # at least one (check_resources then says why it cannot run)
    assert resolve_workers(3, 1, use_gpu=False) == 3  # a fixed count is left alone
    # use_gpu: true on a cluster without GPUs: one worker, which check_resources rejects clearly.
    assert resolve_workers("auto", 1, use_gpu=True) == 1


@pytest.mark.parametrize(
    "resources, cpus_per_worker, use_gpu, expected",
    [
        ({"CPU": 32, "GPU": 4}, 4, True, 4),  # one per GPU
        ({"CPU": 32, "GPU": 4}, 4, False, 8),  # GPUs present but not used: CPUs decide
        ({"CPU": 4, "GPU": 8}, 1, True, 4),  # never more than the CPUs can hold
        ({"CPU": 0}, 1, False, 1),  # a CPU-less head alone: 1 (check_resources then says why it cannot run)
    ],
)
def test_auto_on_a_gpu_cluster(monkeypatch, resources, cpus_per_worker, use_gpu, expected):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert resolve_workers("auto", cpus_per_worker, use_gpu) == expected


def auto_params(tmp_path, **sections):
    return parse_params({"runtime": {"workers": "auto", "use_gpu": "auto"}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, **sections})


def test_stage_records_the_resolved_count(ray_two_cpus, tmp_path, monkeypatch):
    from lowlabel.stages.common import tracked_run
    from lowlabel.stages.training import resolve_auto_workers

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = auto_params(tmp_path)
    with tracked_run(params, stage="pretrain", method="simclr", dvc_stage="pretrain@simclr", sections=("seed", "runtime")) as run:
        resolved, name = resolve_auto_workers(params, "pretrain-simclr-0123456789")
    assert resolved.runtime.workers == 2
    assert name == "pretrain-simclr-0123456789-w2"  # the Ray run dir (resume) never mixes counts
    logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.info.run_id).data.params
    assert logged["runtime.workers"] == "2" and logged["runtime.workers_setting"] == "auto"


def test_batch_check_fires_once_auto_is_resolved(ray_two_cpus, tmp_path, monkeypatch):
    from lowlabel.stages.training import resolve_auto_workers

    monkeypatch.chdir(tmp_path)
    params = auto_params(tmp_path, pretrain={"batch_size": 255})  # fine at parse time; odd for 2 workers
    with pytest.raises(ConfigError, match=r"pretrain.batch_size \(255\) must be a multiple of runtime.workers \(auto -> 2\)"):
        resolve_auto_workers(params, "pretrain-simclr-x")
    params = auto_params(tmp_path, semisup={"batch_size": 3}, runtime={"workers": "auto", "cpus_per_worker": 2})
    assert resolve_auto_workers(params, "semisup-x")[0].runtime.workers == 1  # 3 is fine for one worker


def test_run_training_job_resolves_auto_before_scheduling(ray_two_cpus, tmp_path):
    # Resolved, then checked against the cluster: fails in run_training_job before any worker starts.
    with pytest.raises(ClusterError, match=r"runtime.workers=1 x cpus_per_worker=4 cannot be scheduled \(CPU: asked 4, cluster has 2\)"):
        run_training_job(lambda config: None, {}, name="auto-big", workers="auto", use_gpu="auto", cpus_per_worker=4, storage_path=str(tmp_path / "ray"))
