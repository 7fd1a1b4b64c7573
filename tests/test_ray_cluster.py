"""The pretrain loop on a simulated 2-node Ray cluster, reached through an address like RAY_ADDRESS."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from test_ray_train import pretrain_config

from lowlabel.runner.launch import ClusterError, run_training_job
from lowlabel.runner.worker import read_state
from lowlabel.train.pretrain import pretrain_loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # Cluster writes the head's address to <default temp dir>/ray/ray_current_cluster whatever
    # temp_dir says; on a fresh machine that folder does not exist yet.
    Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(tmp_path_factory.mktemp("rayc"))})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_pretrain_spreads_over_two_nodes(two_nodes, tiny_prepared, tmp_path):
    import ray

    config = pretrain_config(tiny_prepared, None, None, method="simclr", epochs=1)
    result = run_training_job(
        pretrain_loop, config, name="two-nodes", workers=2, use_gpu=False, cpus_per_worker=1,
        storage_path=str(tmp_path / "ray"), ray_address=two_nodes.address,
    )
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    state = read_state(result.checkpoint)
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert {"loss", "knn_acc", "images_per_s"} <= set(state["history"][-1])


def test_more_workers_than_the_cluster_has_fails_fast(two_nodes, tiny_prepared, tmp_path):
    config = pretrain_config(tiny_prepared, None, None, epochs=1)
    with pytest.raises(ClusterError, match=r"runtime.workers=3 .*CPU: asked 3, cluster has 2"):
        run_training_job(pretrain_loop, config, name="too-many", workers=3, use_gpu=False, cpus_per_worker=1,
                         storage_path=str(tmp_path / "ray"), ray_address=two_nodes.address)


def test_unreachable_cluster_address_fails_in_seconds():
    import socket
    import time

    from lowlabel.runner.launch import check_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray cluster at .*127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=3)
    with pytest.raises(ClusterError, match="ray://127.0.0.1"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout_s=3)
    assert time.perf_counter() - started < 10
