"""Real Ray Train jobs (local cluster, 2 workers, gloo) on a tiny synthetic dataset."""

from __future__ import annotations

import math
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from lowlabel.runner.launch import ClusterError, check_resources, run_training_job
from lowlabel.runner.worker import read_state
from lowlabel.train.pretrain import pretrain_loop
from lowlabel.train.semisup import semisup_loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory, s3_endpoint):
    import ray

    os.environ["LOWLABEL_RAY_TMP"] = str(tmp_path_factory.mktemp("ray"))
    # Workers get the driver's storage variables when Ray starts (ensure_ray): set them first.
    aws = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {key: os.environ.get(key) for key in aws}
    os.environ.update(aws)
    from lowlabel.runner.launch import ensure_ray

    ensure_ray(None, local_num_cpus=2)
    yield ray
    ray.shutdown()
    for key, value in before.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def common(tiny_prepared, mlflow_uri, run_id):
    return {
        "seed": 0,
        "data": str(tiny_prepared),
        "arch": "conv4",
        "width": 8,
        "loader_workers": 0,
        "cpus_per_worker": 1,
        "amp": "auto",
        "tracking_uri": mlflow_uri,
        "run_id": run_id,
        "grad_clip": None,
    }


def final_state(result):
    assert result.error is None
    return read_state(result.checkpoint)


def fixmatch_config(tiny_prepared, mlflow_uri, run_id, *, label, ema_decay, **method_kwargs):
    """A 6-step, 2-chunk FixMatch job on the tiny data."""
    return common(tiny_prepared, mlflow_uri, run_id) | {
        "label": label,
        "method": "fixmatch",
        "init_encoder": None,
        "steps": 6,
        "eval_every": 3,
        "batch_size": 4,
        "optim": {"optimizer": "sgd", "lr": 0.03, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True, "warmup_fraction": 0.0},
        "ema_decay": ema_decay,
        "method_kwargs": {"mu": 2, "threshold": 0.5, "lambda_u": 1.0} | method_kwargs,
        "randaugment": {"num_ops": 2, "magnitude": 10, "cutout": 0.5},
    }


def new_run(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("t")
    return client, client.create_run(exp).info.run_id


def pretrain_config(tiny_prepared, mlflow_uri, run_id, method="simclr", epochs=2, **method_kwargs):
    kwargs = {"temperature": 0.2, "proj_hidden_dim": 16, "proj_dim": 8} | method_kwargs
    if method == "simclr":
        kwargs["gather_distributed"] = None
    return common(tiny_prepared, mlflow_uri, run_id) | {
        "label": f"test-{method}",
        "method": method,
        "method_kwargs": kwargs,
        "epochs": epochs,
        "batch_size": 32,
        "max_steps_per_epoch": None,
        "optim": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False, "warmup_fraction": 0.1},
        "crop_scale": [0.5, 1.0],
        "eval_every": 1,
        "knn_k": 5,
        "knn_bank_size": 100,
    }


def test_pretrain_job_two_workers(ray_local, tiny_prepared, mlflow_uri, tmp_path):
    client, run_id = new_run(mlflow_uri)
    config = pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=2)
    result = run_training_job(
        pretrain_loop, config, name="t-pretrain", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray")
    )
    state = final_state(result)
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert all(0 <= h["knn_acc"] <= 1 for h in state["history"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"][1:])
    # 160 base images / 32 global batch = 5 steps per epoch, 16 per worker.
    assert set(state["encoder"]) and all(k.startswith(("0.", "1.", "4.", "5.", "8.", "9.", "12.", "13.")) for k in state["encoder"])
    # Rank 0 alone logs: one value per epoch, not one per worker.
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "knn_acc")) == [0, 1, 2]
    assert client.get_run(run_id).data.tags["lowlabel.augment"] == "cpu"  # what runtime.augment resolved to


def test_semisup_fixmatch_job_two_workers(ray_local, tiny_prepared, mlflow_uri, tmp_path):
    client, run_id = new_run(mlflow_uri)
    # The head starts as a logistic regression on the (random) encoder's features of the labels.
    config = fixmatch_config(tiny_prepared, mlflow_uri, run_id, label="test-fixmatch", ema_decay=0.99) | {"head_init": "linear_probe"}
    result = run_training_job(
        semisup_loop, config, name="t-fixmatch", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray")
    )
    state = final_state(result)
    assert [h["step"] for h in state["history"]] == [3, 6]
    last = state["history"][-1]
    for key in ("loss_sup", "loss_unsup", "mask_rate", "pseudo_acc", "pseudo_balance", "test_acc", "test_acc_ema"):
        assert key in last
    assert 0 <= last["mask_rate"] <= 1 and 0 <= last["pseudo_balance"] <= 1
    assert set(state["ema"]) == set(state["model"])
    assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_acc_ema")) == [3, 6]


def test_semisup_killed_worker_resumes_with_the_same_ema_weights(ray_local, tiny_prepared, tmp_path):
    """A FreeMatch job (EMA teacher, distribution alignment) whose worker dies mid-chunk restarts
    from the last checkpoint and ends with the uninterrupted run's EMA teacher and running
    statistics (the loop is seeded per chunk; the EMA, which labels the weak view here, the
    alignment mean and the self-adaptive thresholds are saved)."""
    config = fixmatch_config(
        tiny_prepared, None, None, label="test-freematch-resume", ema_decay=0.9,
        teacher="ema", dist_align=True, dist_align_momentum=0.5, sat_momentum=0.5, lambda_f=0.01,
    ) | {"method": "freematch"}
    clean = final_state(run_training_job(
        semisup_loop, config, name="ema-clean", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray")
    ))
    marker = tmp_path / "killed"
    faulty = config | {"fault_injection": {"epoch": 2, "step": 1, "rank": 1, "marker": str(marker), "delay_s": 5.0}}
    restarted = final_state(run_training_job(
        semisup_loop, faulty, name="ema-faulty", workers=2, use_gpu=False, cpus_per_worker=1,
        storage_path=str(tmp_path / "ray"), max_failures=1,
    ))
    assert marker.exists(), "the fault was never injected"
    assert [h["step"] for h in restarted["history"]] == [3, 6]
    for name, tensor in clean["ema"].items():
        assert torch.allclose(tensor.float(), restarted["ema"][name].float(), atol=1e-5), name
    assert restarted["history"][-1]["test_acc_ema"] == pytest.approx(clean["history"][-1]["test_acc_ema"], abs=1e-9)
    assert set(clean["method_state"]) == {"aligner", "thresholds"}
    for module, stats in clean["method_state"].items():
        for name, value in stats.items():
            assert not torch.allclose(value, torch.full_like(value, 1 / 4)), f"{module}.{name} never moved"  # 4 base classes
            # Not bit-exact (the weights above agree to 1e-5 and softmax amplifies that); statistics
            # restarted from 1/C would be off by 0.5**3 x (their value at step 3 - 1/C): several 1e-3 here.
            assert torch.allclose(restarted["method_state"][module][name], value, atol=1e-3), f"{module}.{name}"


def test_impossible_worker_count_fails_fast(ray_local):
    with pytest.raises(ClusterError, match=r"runtime.workers=64 .* asked 64, cluster has 2"):
        check_resources(64, 1, use_gpu=False)
    with pytest.raises(ClusterError, match="GPU: asked 1"):
        check_resources(1, 1, use_gpu=True)


def test_rerun_under_the_same_name_resumes_from_the_last_checkpoint_on_s3(ray_local, s3_env, tiny_prepared, mlflow_uri):
    """Checkpoints on an S3-compatible store: kept to the newest two, found again by a re-run
    under the same name (which trains only what is missing), removed by remove_run."""
    from conftest import make_bucket

    from lowlabel.runner.launch import remove_run
    from lowlabel.runner.storage import Storage

    make_bucket("ray-resume")
    storage = "s3://ray-resume/runs"
    _, run_id = new_run(mlflow_uri)
    first = final_state(
        run_training_job(pretrain_loop, pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=1), name="resume", workers=2,
                         use_gpu=False, cpus_per_worker=1, storage_path=storage)
    )
    # Same run name, a longer budget: only the missing epoch is trained.
    second = final_state(
        run_training_job(pretrain_loop, pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=3), name="resume", workers=2,
                         use_gpu=False, cpus_per_worker=1, storage_path=storage)
    )
    assert [h["epoch"] for h in second["history"]] == [0, 1, 2, 3]
    assert second["history"][1] == first["history"][1]
    assert len(Storage.parse(storage).checkpoints("resume")) == 2  # CheckpointConfig(num_to_keep=2)
    remove_run(storage, "resume")
    assert Storage.parse(storage).checkpoints("resume") == []


def test_moco_job_two_workers_keeps_one_queue(ray_local, tiny_prepared, mlflow_uri, tmp_path):
    _, run_id = new_run(mlflow_uri)
    config = pretrain_config(tiny_prepared, mlflow_uri, run_id, method="moco", epochs=1, queue_size=64, momentum=0.9)
    state = final_state(
        run_training_job(pretrain_loop, config, name="moco", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    )
    # 5 steps x global batch 32 = 160 keys through a 64-slot queue: pointer at 160 % 64.
    assert int(state["model"]["queue_ptr"]) == 160 % 64
    assert torch.allclose(state["model"]["queue"].norm(dim=0), torch.ones(64), atol=1e-5)


def test_killed_worker_restarts_from_checkpoint_and_matches_an_uninterrupted_run(ray_local, tiny_prepared, mlflow_uri, tmp_path):
    client, run_id = new_run(mlflow_uri)
    clean = final_state(
        run_training_job(pretrain_loop, pretrain_config(tiny_prepared, None, None, epochs=2), name="clean", workers=2,
                         use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    )
    marker = tmp_path / "killed"
    faulty = pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=2) | {
        "fault_injection": {"epoch": 2, "step": 2, "rank": 1, "marker": str(marker), "delay_s": 5.0}
    }
    result = run_training_job(pretrain_loop, faulty, name="faulty", workers=2, use_gpu=False, cpus_per_worker=1,
                              storage_path=str(tmp_path / "ray"), max_failures=1)
    restarted = final_state(result)
    assert marker.exists(), "the fault was never injected"
    # The restart resumed at epoch 1 (recorded in MLflow) and lost only the epoch in progress.
    assert [m.value for m in client.get_metric_history(run_id, "resumed_at_epoch")] == [1.0]
    assert [h["epoch"] for h in restarted["history"]] == [0, 1, 2]
    # Same seed, same data order, same weights at the restart: the same result (float tolerance).
    for a, b in zip(clean["history"][1:], restarted["history"][1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["knn_acc"] == pytest.approx(b["knn_acc"], abs=1e-9)
    for name, tensor in clean["encoder"].items():
        assert torch.allclose(tensor.float(), restarted["encoder"][name].float(), atol=1e-5), name


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("byol", {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16, "momentum": 0.9, "momentum_final": 1.0}),
        ("barlowtwins", {"proj_hidden_dim": 16, "proj_dim": 16, "lambda_offdiag": 0.0051, "gather_distributed": None}),
        ("vicreg", {"proj_hidden_dim": 16, "proj_dim": 16, "sim_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0, "gather_distributed": None}),
        ("rotnet", {"hidden_dim": 16}),
    ],
)
def test_more_ssl_methods_train_as_two_worker_jobs(ray_local, tiny_prepared, mlflow_uri, tmp_path, method, kwargs):
    _, run_id = new_run(mlflow_uri)
    config = pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=1) | {"label": f"test-{method}", "method": method, "method_kwargs": kwargs}
    state = final_state(
        run_training_job(pretrain_loop, config, name=method, workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    )
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert math.isfinite(state["history"][1]["loss"]) and 0 <= state["history"][1]["knn_acc"] <= 1
    if method == "byol":  # the target followed the online network: 5 steps of EMA
        assert any(key.startswith("momentum_branch.") for key in state["model"])


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_dino_multi_crop_trains_as_a_two_worker_job(ray_local, tiny_prepared, mlflow_uri, tmp_path, augment):
    """2 global views at 16 px + 2 local ones at 8 px, on both augment paths; a globally pooled
    encoder (Conv-4's features change width with the input size)."""
    _, run_id = new_run(mlflow_uri)
    kwargs = {"proj_hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 32, "momentum": 0.9, "local_crops": 2, "local_crop_size": 8}
    config = pretrain_config(tiny_prepared, mlflow_uri, run_id, epochs=1) | {
        "label": "test-dino", "method": "dino", "method_kwargs": kwargs, "arch": "wrn10_1", "augment": augment,
    }
    state = final_state(
        run_training_job(pretrain_loop, config, name=f"dino-{augment}", workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    )
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert math.isfinite(state["history"][1]["loss"]) and 0 <= state["history"][1]["knn_acc"] <= 1
    # 5 steps: the centre moved off zero, the teacher's temperature along its warm-up.
    assert state["model"]["center"].abs().sum() > 0
    assert float(state["model"]["teacher_temp"]) > 0.04


@pytest.mark.parametrize(
    "method, augment, kwargs",
    [
        ("pseudolabel", "cpu", {"mu": 2, "lambda_u": 1.0, "threshold": 0.5, "rampup_start": 0.0, "rampup_end": 0.4}),
        ("meanteacher", "device", {"mu": 2, "lambda_u": 50.0, "rampup_fraction": 0.4, "teacher": "ema"}),
        ("mixmatch", "cpu", {"mu": 2, "temperature": 0.5, "mix_alpha": 0.5, "lambda_u": 100.0, "rampup_fraction": 0.4}),
        ("flexmatch", "device", {"mu": 2, "lambda_u": 1.0, "threshold": 0.5, "threshold_warmup": True, "teacher": "student", "dist_align": False,
                                 "debias": 0.4, "debias_momentum": 0.9}),
    ],
)
def test_more_semisup_methods_train_as_two_worker_jobs(ray_local, tiny_prepared, mlflow_uri, tmp_path, method, augment, kwargs):
    """Each method gets the unlabeled views it asks for, on either augmentation path; FlexMatch's
    per-image record is filled from both workers' batches and checkpointed, as is its DebiasPL prior."""
    client, run_id = new_run(mlflow_uri)
    config = fixmatch_config(tiny_prepared, mlflow_uri, run_id, label=f"test-{method}", ema_decay=0.9)
    config |= {"method": method, "method_kwargs": kwargs, "augment": augment}
    state = final_state(
        run_training_job(semisup_loop, config, name=method, workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))
    )
    last = state["history"][-1]
    assert [h["step"] for h in state["history"]] == [3, 6]
    assert math.isfinite(last["loss"]) and math.isfinite(last["loss_unsup"]) and 0 <= last["test_acc"] <= 1
    assert client.get_run(run_id).data.tags["lowlabel.augment"] == augment
    if method == "flexmatch":
        selected = state["method_state"]["learning_effect"]["selected"]
        # one entry per unlabeled image (4 base classes x 40, less 2 labels each); some recorded
        assert len(selected) == 4 * 40 - 4 * 2 and (selected >= -1).all() and (selected >= 0).any()
        prior = state["method_state"]["debiaser"]["prior"]
        assert prior.sum().item() == pytest.approx(1.0) and not torch.allclose(prior, torch.full_like(prior, 0.25))
