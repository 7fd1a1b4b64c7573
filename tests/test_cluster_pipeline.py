"""The whole pipeline on a two-host cluster whose hosts share no disk (tests/twohosts.py).

`ray up` (the `local` provider: head on host A, a worker node on host B), then, with this test
process as a second driver of that cluster: a storage path only A sees is refused before any
training, the shared ("NFS") directory is accepted, and a pretraining job whose worker on B is
killed mid-epoch resumes from the shared directory and ends with the uninterrupted run's weights.
Then `ray submit cluster/run_pipeline.py` runs every stage (prepare, pretrain@simclr,
semisup@fixmatch, meta@protonet, fewshot, report) on a tiny config with checkpoints on an S3-compatible server
(moto's, on A's address; the product code only sees AWS_ENDPOINT_URL), each training job with a
worker on each host; the run is published to the same store; `ray down`, the head's copy of the
project is deleted (a terminated node), and `./pipeline fetch`'s code brings metrics, report,
models and the MLflow runs (encoder artifacts on S3) back into a fresh checkout.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_dvc_pipeline import TINY, merge
from test_ray_train import pretrain_config
from test_two_hosts import b_raylet_running, cluster_config, ray_cli_on_a, sha
from twohosts import REPO, VENV, copy_checkout, free_ports, missing_reason, two_hosts

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLUSTER_TINY = merge(TINY, {
    "pretrain": {"methods": ["simclr"]},
    "semisup": {"methods": ["fixmatch"]},
    "runtime": {"workers": 2, "use_gpu": False, "storage_path": "s3://checkpoints/runs", "max_failures": 1},
})
STAGES = ["prepare", "pretrain@simclr", "semisup@fixmatch", "meta@protonet", "fewshot", "report"]


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    if not FASHION.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist on the head (./pipeline setup installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="llp"))  # short: A's Ray socket paths live under it
    shared = tmp / "shared"  # stands for NFS: both hosts see it at this path
    shared.mkdir()
    token = shared / "ray_token"
    token.write_text(secrets.token_hex(32))
    name = f"lowlabel-pipe-{os.getpid()}"
    control = Path(f"/tmp/ray_ssh_{sha(getpass.getuser())}/{sha(name)}")
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "metrics", "mlflow", "s3"), free_ports(7)))
    ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
               "AUTOSCALER_METRIC_PORT": str(ports["metrics"])}
    timings: dict[str, float] = {}
    moto = None
    try:
        with two_hosts(tmp, shared_dir=shared, env=ray_env) as hosts:
            hosts.markers += [str(control), f"{tmp}/"]
            a = hosts.a_ip
            s3 = f"http://{a}:{ports['s3']}"
            # The S3-compatible store listens on A's address: B reaches it over the veth.
            with open(tmp / "moto.log", "wb") as log:
                moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", a, "-p", str(ports["s3"])],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_http(s3)
            aws = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            import pyarrow.fs as pafs

            for bucket in ("checkpoints", "results"):
                pafs.S3FileSystem(endpoint_override=s3, access_key="testing", secret_key="testing",
                                  allow_bucket_creation=True).create_dir(bucket)

            # The head's login environment: the AWS chain (credentials as environment variables
            # here; an instance role on a cloud head) and its MLflow server's port. B gets nothing
            # of it: its workers receive the storage settings through the job's runtime env.
            head_env = {**ray_env, **aws, "LOWLABEL_MLFLOW_PORT": str(ports["mlflow"]), "LOWLABEL_CHECKOUT": str(hosts.remote_repo)}
            bashrc = hosts.homes["A"] / ".bashrc"
            bashrc.write_text(bashrc.read_text() + "export " + " ".join(f"{k}={v}" for k, v in head_env.items()) + "\n")

            project = copy_checkout(tmp / "project")
            params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), CLUSTER_TINY)
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            config = cluster_config(hosts, name, project, ports)
            base = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
            # The shipped config's MLflow start command, run in the synced checkout on the head.
            mlflow_start = [c for c in base["head_start_ray_commands"] if "mlflow_server.sh" in c]
            assert mlflow_start, base["head_start_ray_commands"]
            config["head_start_ray_commands"] += [c.replace("~/lowlabel", str(hosts.remote_repo)) for c in mlflow_start]
            cluster_yaml = tmp / "cluster.yaml"
            cluster_yaml.write_text(yaml.safe_dump(config))
            ray_cli = ray_cli_on_a(hosts, ray_env, cwd=tmp)

            started = time.perf_counter()
            up = ray_cli("up", "-y", "--no-config-cache", str(cluster_yaml))
            assert up.returncode == 0, "ray up failed (output above)"
            deadline = time.monotonic() + 120
            while not b_raylet_running(hosts):
                assert time.monotonic() < deadline, "B's raylet did not start in 120 s"
                time.sleep(0.5)
            timings["ray up + worker"] = round(time.perf_counter() - started, 1)
            state = {"tmp": tmp, "hosts": hosts, "ports": ports, "aws": aws, "s3": s3, "shared": shared, "token": token,
                     "project": project, "cluster_yaml": cluster_yaml, "ray_cli": ray_cli, "timings": timings, "down": False}
            try:
                yield state
            finally:
                if not state["down"]:
                    ray_cli("down", "-y", str(cluster_yaml), timeout=120)
                print(f"timings (s): {timings}")
        leftovers = hosts.leftovers()
        assert not leftovers, leftovers
    finally:
        if moto is not None:
            moto.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                moto.wait(timeout=10)
            if moto.poll() is None:
                moto.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
        with contextlib.suppress(OSError):
            control.parent.rmdir()


@contextlib.contextmanager
def driver(cluster):
    """This test process as a driver of the two-host cluster (token auth, as the nodes)."""
    import ray

    # Ray reads the auth mode and token once per process and caches both: re-read after the change.
    from ray._private.authentication_test_utils import reset_auth_token_state

    ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster["token"])})
    os.environ.pop("RAY_ADDRESS", None)
    reset_auth_token_state()
    address = f"{cluster['hosts'].a_ip}:{cluster['ports']['gcs']}"
    try:
        from lowlabel.runner.launch import ensure_ray

        ensure_ray(address)
        # B's raylet runs before the GCS lists it alive: wait for both nodes.
        deadline = time.monotonic() + 90
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, f"host B never joined: {ray.nodes()}"
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        reset_auth_token_state()


def test_storage_only_the_head_sees_is_refused_and_a_shared_one_accepted(cluster):
    import ray

    from lowlabel.runner.storage import Storage, StorageError

    head_only = cluster["tmp"] / "head-only"  # under A's temp root: B has its own /tmp
    with driver(cluster):
        assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {cluster["hosts"].a_ip, cluster["hosts"].b_ip}
        with pytest.raises(StorageError, match=rf"runtime.storage_path='{head_only}' is not shared by every node .*node {cluster['hosts'].b_ip}: cannot read"):
            Storage.parse(str(head_only)).check_visible_from_nodes()
        Storage.parse(str(cluster["shared"] / "ckpt")).check_visible_from_nodes()
        # The probe's marker is gone again: nothing is left on the storage.
        assert list((cluster["shared"] / "ckpt" / ".lowlabel-storage-check").iterdir()) == []


def test_worker_on_b_killed_mid_job_resumes_from_shared_storage(cluster, tiny_prepared):
    from lowlabel.runner.launch import run_training_job
    from lowlabel.runner.worker import read_state

    storage = str(cluster["shared"] / "ckpt")
    b = cluster["hosts"].b_ip
    with driver(cluster) as address:
        clean = run_training_job(pretrain_loop_ref(), pretrain_config(tiny_prepared, None, None, epochs=2), name="clean", workers=2,
                                 use_gpu=False, cpus_per_worker=1, storage_path=storage, ray_address=address)
        marker = cluster["shared"] / "killed"  # on storage every node sees: the restarted rank must find it
        faulty = pretrain_config(tiny_prepared, None, None, epochs=2) | {
            "fault_injection": {"epoch": 2, "step": 2, "node_ip": b, "marker": str(marker), "delay_s": 5.0}}
        started = time.perf_counter()
        restarted = run_training_job(pretrain_loop_ref(), faulty, name="faulty", workers=2, use_gpu=False, cpus_per_worker=1,
                                     storage_path=storage, max_failures=1, ray_address=address)
        cluster["timings"]["killed-on-B job"] = round(time.perf_counter() - started, 1)
    assert marker.read_text().startswith("killed rank"), "the worker on B was never killed"
    clean_state, restarted_state = read_state(clean.checkpoint), read_state(restarted.checkpoint)
    assert [h["epoch"] for h in restarted_state["history"]] == [0, 1, 2]
    for name, tensor in clean_state["encoder"].items():
        assert torch.allclose(tensor.float(), restarted_state["encoder"][name].float(), atol=1e-5), name


def pretrain_loop_ref():
    from lowlabel.train.pretrain import pretrain_loop

    return pretrain_loop


def test_pipeline_submitted_runs_on_both_hosts_and_survives_ray_down(cluster, tmp_path):
    hosts, ray_cli = cluster["hosts"], cluster["ray_cli"]
    results = "s3://results/lowlabel"
    veth = Path("/sys/class/net") / hosts.a_if / "statistics"
    to_b_before, from_b_before = (int((veth / f).read_text()) for f in ("tx_bytes", "rx_bytes"))
    started = time.perf_counter()
    proc = ray_cli("submit", str(cluster["cluster_yaml"]), str(REPO / "cluster" / "run_pipeline.py"), "--",
                   "--env", f"LOWLABEL_RESULTS={results}", "--env", f"AWS_ENDPOINT_URL={cluster['s3']}", "repro", timeout=900)
    cluster["timings"]["submitted pipeline"] = round(time.perf_counter() - started, 1)
    assert proc.returncode == 0, "the submitted pipeline failed (output above)"
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout, stage
    # What crossed the wire between the hosts: B has no copy of data/, so its workers' inputs
    # (the prepared arrays, through Ray's object store) came over the veth, once per job.
    to_b, from_b = (int((veth / f).read_text()) - before for f, before in (("tx_bytes", to_b_before), ("rx_bytes", from_b_before)))
    prepared = sum(f.stat().st_size for f in (hosts.remote_repo / "data" / "prepared").glob("*.npy"))
    print(f"bytes A->B {to_b / 1e6:.1f} MB, B->A {from_b / 1e6:.1f} MB; prepared arrays {prepared / 1e6:.1f} MB; "
          + "; ".join(line for line in proc.stdout.splitlines() if "through the object store" in line))
    cluster["timings"] |= {"MB A->B": round(to_b / 1e6, 1), "MB B->A": round(from_b / 1e6, 1)}
    assert to_b >= 3 * prepared * 0.9, "three training jobs, each with a worker on B: their inputs must have crossed to B"

    # Every training job ran a worker on each host (its rank 0 tags the run with the nodes).
    db = hosts.remote_repo / "mlflow.db"
    with sqlite3.connect(db) as con:
        tags = dict(con.execute(
            "SELECT r.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'lowlabel.worker_nodes'").fetchall())
        durations = {n: (e - s) / 1000 for n, s, e in con.execute("SELECT name, start_time, end_time FROM runs")}
    assert set(tags) == {"pretrain@simclr", "semisup@fixmatch", "meta@protonet"}, tags
    for run, nodes in tags.items():
        assert set(nodes.split(",")) == {hosts.a_ip, hosts.b_ip}, (run, nodes)
    print("stage run wall times (s):", json.dumps(durations))
    cluster["timings"] |= {f"mlflow run {k}": round(v, 1) for k, v in durations.items()}

    # `ray down`, and the head's disk with it.
    down = ray_cli("down", "-y", str(cluster["cluster_yaml"]), timeout=120)
    cluster["down"] = True
    assert down.returncode == 0
    shutil.rmtree(hosts.remote_repo)

    # A laptop: a fresh copy of the project, then `./pipeline fetch`'s code.
    laptop = copy_checkout(tmp_path / "laptop")
    shutil.copy(cluster["project"] / "params.yaml", laptop / "params.yaml")
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(["git", *git], cwd=laptop, check=True)  # a clone, as a user's checkout is
    env = {**os.environ, **cluster["aws"], "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    fetch = subprocess.run([sys.executable, "-m", "lowlabel.results", "fetch", results], cwd=laptop, env=env,
                           capture_output=True, text=True, timeout=300)
    print(fetch.stdout[-4000:], fetch.stderr[-4000:])
    assert fetch.returncode == 0
    report = json.loads((laptop / "metrics" / "report.json").read_text())
    assert report["margins"]
    assert (laptop / "reports" / "report.md").is_file()
    for path in ("models/pretrain/simclr/encoder.pt", "models/semisup/fixmatch/encoder.pt", "models/meta/protonet/encoder.pt", "metrics/fewshot.json"):
        assert (laptop / path).is_file(), path
    fetched_db = next((laptop / "cluster-results").glob("*/mlflow.db"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{fetched_db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    # The encoders' artifacts are on the results store, not on the head that is gone.
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=cluster["s3"], access_key="testing", secret_key="testing")
    stored = s3.get_file_info(pafs.FileSelector("results/lowlabel/mlartifacts", recursive=True))
    assert any(info.path.endswith("MLmodel") for info in stored), "no encoder model on the results store"
