"""The cluster configs pass Ray's own launcher validation; a misspelled field does not."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_config_validates(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_misspelled_field_is_rejected(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    config["max_wokers"] = config.pop("max_workers")
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))



def test_aws_pool_is_all_started_by_ray_up():
    # Jobs are checked against the nodes that are up (they do not wait for the autoscaler), and
    # runtime.workers: auto counts those: `ray up` must start the whole GPU pool.
    config = yaml.safe_load((CLUSTER / "config.yaml").read_text())
    pool = config["available_node_types"]["gpu_worker"]
    assert pool["min_workers"] == pool["max_workers"] <= config["max_workers"]
    assert config["provider"]["cache_stopped_nodes"] is False  # ray down terminates, leaves no stopped nodes


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_checkout_sync_skips_what_git_ignores(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert ".gitignore" in config["rsync_filter"] and ".git" in config["rsync_exclude"]


def test_run_pipeline_works_in_a_synced_tree_without_git(tmp_path):
    # What rsync leaves on the head: the checkout with .dvc/ but no .git; DVC refuses that
    # unless told to work without SCM.
    import shutil
    import subprocess
    import sys

    root = tmp_path / "lowlabel"
    (root / "cluster").mkdir(parents=True)
    shutil.copy(CLUSTER / "run_pipeline.py", root / "cluster")
    shutil.copytree(CLUSTER.parent / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (root / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello\n")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "sqlite:///x.db", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "cluster/run_pipeline.py", "status"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[submit] {root}: dvc status (RAY_ADDRESS=auto" in proc.stdout
    assert "not a git repository" not in proc.stdout + proc.stderr
