"""A cluster run's results outlive the cluster: cluster/run_pipeline.py publishes them to an
S3-compatible store, `./pipeline fetch` (lowlabel.results) brings them back into a fresh clone.

Real components: a moto S3 server over HTTP (as a thread of this process), git, DVC with the
dvc-s3 remote, sqlite, pyarrow; the head's checkout is a copy without .git, as `ray up`'s rsync
leaves it, and is deleted before the fetch, as `ray down` deletes the head's disk. The second
test runs the head's MLflow server start script and run_pipeline.py's wait for it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "lowlabel-test"

TRAIN = """\
import json, pathlib, yaml
k = yaml.safe_load(open("params.yaml"))["k"]
pathlib.Path("models").mkdir(exist_ok=True)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("models/m.bin").write_bytes(bytes(range(256)) * k)
pathlib.Path("metrics/x.json").write_text(json.dumps({"k": k, "score": k / 2}))
"""

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [k]
    outs: [models]
    metrics:
      - metrics/x.json:
          cache: false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def base_env(home: Path) -> dict[str, str]:
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin",
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO / "src"),
    }
    home.mkdir(parents=True, exist_ok=True)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)} -> {proc.returncode} ({time.perf_counter() - started:.1f}s)\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_laptop_repo(root: Path, env: dict[str, str]) -> None:
    """A git + DVC repository with a one-stage pipeline and run_pipeline.py where the real one is."""
    (root / "cluster").mkdir(parents=True)
    shutil.copy(REPO / "cluster" / "run_pipeline.py", root / "cluster")
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("k: 3\n")
    (root / ".gitignore").write_text("/models\n/metrics/\n/mlflow.db\n/cluster-results/\n/dvc.lock.bak\n/params.yaml.bak\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"], ["dvc", "init", "-q"]):
        assert run(cmd, root, env).returncode == 0
    assert run(["git", "add", "-A"], root, env).returncode == 0
    assert run(["git", "commit", "-q", "-m", "pipeline"], root, env).returncode == 0


def mlflow_db_with_a_run(path: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path}")
    exp = client.create_experiment("lowlabel")
    run = client.create_run(exp, run_name="train@cluster")
    client.log_metric(run.info.run_id, "score", 2.5, step=1)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def s3_env(env: dict[str, str], endpoint: str) -> dict[str, str]:
    return {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def test_cluster_run_is_published_and_fetched_after_the_head_is_gone(tmp_path, s3_endpoint):
    started = time.perf_counter()
    results = f"s3://{BUCKET}/team/lowlabel"
    laptop = tmp_path / "laptop"
    env = base_env(tmp_path / "home")
    make_laptop_repo(laptop, env)

    # The head: the checkout as rsync leaves it (no .git), its MLflow store with one run.
    head = tmp_path / "head" / "lowlabel"
    shutil.copytree(laptop, head, ignore=shutil.ignore_patterns(".git"))
    run_id = mlflow_db_with_a_run(head / "mlflow.db")
    head_env = s3_env(base_env(tmp_path / "head"), s3_endpoint)
    head_env.pop("AWS_ENDPOINT_URL")  # only what `./pipeline submit` forwards reaches the driver
    head_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{head / 'mlflow.db'}"
    proc = run([sys.executable, "cluster/run_pipeline.py", "--env", f"LOWLABEL_RESULTS={results}",
                "--env", f"AWS_ENDPOINT_URL={s3_endpoint}", "--env", "AWS_REGION=", "exp", "run", "-S", "k=5"], head, head_env, timeout=180)
    assert proc.returncode == 0, "run_pipeline.py failed (output above)"
    # dvc exp run -S worked in a tree that had no .git: the head got a repository and a baseline.
    assert (head / ".git").is_dir()
    log = run(["git", "log", "--format=%an %s"], head, env).stdout
    assert log.startswith("lowlabel-cluster "), log
    exps = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], head, env).stdout.split()
    names = [ref.rsplit("/", 1)[1] for ref in exps if ref.count("/") == 4]
    assert len(names) == 1, exps
    name = names[0]
    assert f"published {results}/runs/{name}" in proc.stdout
    assert (tmp_path / "head" / ".lowlabel" / "cluster.env").read_text() == f"export AWS_ENDPOINT_URL={s3_endpoint}\nexport LOWLABEL_RESULTS={results}\n"
    model = (head / "models" / "m.bin").read_bytes()
    metrics = json.loads((head / "metrics" / "x.json").read_text())
    assert len(model) == 5 * 256 and metrics == {"k": 5, "score": 2.5}
    head_lock = (head / "dvc.lock").read_text()

    # A second submit without changes commits nothing; the log says where the output went.
    before = run(["git", "rev-parse", "HEAD"], head, env).stdout
    proc = run([sys.executable, "cluster/run_pipeline.py", "status"], head, head_env)
    assert proc.returncode == 0 and "output also in" in proc.stdout
    assert run(["git", "rev-parse", "HEAD"], head, env).stdout != before  # dvc.lock of the run: committed
    again = run(["git", "rev-parse", "HEAD"], head, env).stdout
    assert run([sys.executable, "cluster/run_pipeline.py", "status"], head, head_env).returncode == 0
    assert run(["git", "rev-parse", "HEAD"], head, env).stdout == again

    shutil.rmtree(tmp_path / "head")  # ray down: the head's disk is gone

    # The laptop: a fresh clone, its own params (k: 3), fetches the run.
    fresh = tmp_path / "fresh"
    assert run(["git", "clone", "-q", str(laptop), str(fresh)], tmp_path, env).returncode == 0
    laptop_env = s3_env(env, s3_endpoint)
    proc = run([sys.executable, "-m", "lowlabel.results", "fetch", results], fresh, laptop_env, timeout=180)
    assert proc.returncode == 0, "fetch failed (output above)"
    assert (fresh / "models" / "m.bin").read_bytes() == model
    assert json.loads((fresh / "metrics" / "x.json").read_text()) == metrics
    assert yaml.safe_load((fresh / "params.yaml").read_text()) == {"k": 5}
    assert yaml.safe_load((fresh / "params.yaml.bak").read_text()) == {"k": 3}
    assert (fresh / "dvc.lock").read_text() == head_lock
    record = fresh / "cluster-results" / name
    info = json.loads((record / "run.json").read_text())
    assert info["run"] == name and info["dvc_args"] == ["exp", "run", "-S", "k=5"]
    with sqlite3.connect(record / "mlflow.db") as db:
        runs = db.execute("select run_uuid, name, status from runs").fetchall()
        score = db.execute("select value from metrics where key = 'score'").fetchall()
    assert runs == [(run_id, "train@cluster", "FINISHED")] and score == [(2.5,)]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], fresh, laptop_env).stdout  # outputs match the lock

    # `./pipeline ui --results cluster-results/<run>` serves that snapshot, artifacts from the store.
    sys.path.insert(0, str(REPO / "src"))
    from lowlabel.results import ui_target

    assert ui_target(str(record), fresh) == (record.resolve() / "mlflow.db", f"{results}/mlartifacts")

    # One clear line, exit 2, naming the URI: a missing bucket, a missing run.
    missing = "s3://no-such-bucket/lowlabel"
    proc = run([sys.executable, "-m", "lowlabel.results", "fetch", missing], fresh, laptop_env)
    assert proc.returncode == 2 and missing in proc.stderr and "bucket 'no-such-bucket' does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run([sys.executable, "-m", "lowlabel.results", "fetch", results, "no-such-run"], fresh, laptop_env)
    assert proc.returncode == 2 and f"{results}/runs/no-such-run does not exist" in proc.stderr and name in proc.stderr
    print(f"publish + fetch: {time.perf_counter() - started:.1f}s")


def load_run_pipeline():
    spec = importlib.util.spec_from_file_location("run_pipeline", REPO / "cluster" / "run_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_name_is_the_experiment_or_time_and_commit():
    import datetime as dt

    rp = load_run_pipeline()
    now = dt.datetime(2026, 12, 3, 21, 5, 7, tzinfo=dt.timezone.utc)
    new = {"refs/exps/ab/" + "c" * 38 + "/bushy-lads"}
    assert rp.run_name(["exp", "run", "-S", "k=1"], "0123456789ab", set(), new, now) == "bushy-lads"
    assert rp.run_name(["exp", "run", "-n", "mine"], "0123456789ab", new, new, now) == "mine"
    assert rp.run_name(["repro"], "0123456789ab", set(), set(), now) == "20261203T210507Z-01234567"
    assert rp.split_env_args(["--env", "A=1", "--env", "B=", "exp", "run"]) == ({"A": "1", "B": ""}, ["exp", "run"])
    assert rp.split_env_args(["repro"]) == (None, ["repro"])
    assert rp.publishable(["exp", "run", "--queue"]) and rp.publishable(["repro"]) is None


def test_head_mlflow_server_starts_once_and_submit_waits_for_it(tmp_path, s3_endpoint):
    """cluster/mlflow_server.sh as Ray runs a start command (`bash -c '...'`, which a plain
    `pgrep -f "mlflow server"` would match), twice: one server; run_pipeline.py waits for it and
    creates the experiment with server-side artifacts; a submit with LOWLABEL_RESULTS restarts
    it with its artifacts there (the server alone holds the S3 settings); a dead tracking URI is
    exit 2, named."""
    root = tmp_path / "lowlabel"
    (root / "cluster").mkdir(parents=True)
    for name in ("run_pipeline.py", "mlflow_server.sh"):
        shutil.copy(REPO / "cluster" / name, root / "cluster")
    (root / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs: [hello.txt]\n")
    (root / "params.yaml").write_text("tracking:\n  experiment: lowlabel-test\n")
    env = base_env(tmp_path / "home")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert run(cmd, root, env).returncode == 0
    shutil.rmtree(root / ".git")  # as rsync leaves the checkout on the head
    port = free_port()
    env.update(LOWLABEL_MLFLOW_PORT=str(port), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    pattern = f"[m]lflow server --backend-store-uri sqlite:///{root}/mlflow.db "
    try:
        first = run(["bash", "-c", f"cd {root} && bash cluster/mlflow_server.sh"], root, env)
        assert first.returncode == 0 and "starting" in first.stdout
        second = run(["bash", "-c", f"cd {root} && bash cluster/mlflow_server.sh"], root, env)
        assert second.returncode == 0 and "already running" in second.stdout
        assert len(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()) == 1
        state = tmp_path / "home" / ".lowlabel"
        assert (state / "mlflow-server.destination").read_text().strip() == str(root / "mlartifacts")

        # A submit that forwards LOWLABEL_RESULTS: the server restarts with its artifacts there,
        # the experiment is made on it (server-side artifacts), the pipeline runs and is published.
        uri = f"http://127.0.0.1:{port}"
        results = f"s3://{BUCKET}/restart"
        proc = run([sys.executable, "cluster/run_pipeline.py", "--env", f"LOWLABEL_RESULTS={results}", "--env", f"AWS_ENDPOINT_URL={s3_endpoint}", "repro"],
                   root, {**s3_env(env, s3_endpoint), "MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0 and "restarting the MLflow server" in proc.stdout and f"published {results}/runs/" in proc.stdout
        assert (root / "hello.txt").read_text() == "hello\n"
        assert (state / "mlflow-server.destination").read_text().strip() == f"{results}/mlartifacts"
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lowlabel-test", timeout=5) as r:
            experiment = json.loads(r.read())["experiment"]
        assert experiment["artifact_location"].startswith("mlflow-artifacts:/")
        artifact = f"{experiment['artifact_location'].split(':/', 1)[1]}/run0/artifacts/note.txt"
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{artifact}", data=b"encoder", method="PUT")
        urllib.request.urlopen(request, timeout=30).read()  # what a stage's log_model does, no AWS settings here
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        assert s3.get_object(Bucket=BUCKET, Key=f"restart/mlartifacts/{artifact}")["Body"].read() == b"encoder"

        dead = f"http://127.0.0.1:{free_port()}"
        proc = run([sys.executable, "cluster/run_pipeline.py", "repro"], root, {**env, "MLFLOW_TRACKING_URI": dead, "LOWLABEL_MLFLOW_WAIT_S": "2"})
        assert proc.returncode == 2 and f"MLFLOW_TRACKING_URI={dead}" in proc.stdout
    finally:
        pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        for pid in pids:  # the server this test started, found by its own store's path
            os.kill(int(pid), signal.SIGTERM)
    assert (state / "mlflow-server.log").is_file()


STOPPABLE = """\
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path("stopped.txt").write_text(str(signum))  # a real stage ends its MLflow run FAILED here
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
pathlib.Path("started.txt").write_text("1")
time.sleep(120)
"""


def test_a_dropped_session_reaches_the_stage(tmp_path, signum=signal.SIGHUP):
    """SIGHUP (the ssh session of `ray submit` dropped; SIGTERM takes the same path) to
    run_pipeline.py goes to dvc and the stage it runs; run_pipeline.py exits 128 + the signal."""
    root = tmp_path / "lowlabel"
    (root / "cluster").mkdir(parents=True)
    shutil.copy(REPO / "cluster" / "run_pipeline.py", root / "cluster")
    (root / "stage.py").write_text(STOPPABLE)
    (root / "dvc.yaml").write_text("stages:\n  long:\n    cmd: python stage.py\n    deps: [stage.py]\n")
    env = base_env(tmp_path / "home")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert run(cmd, root, env).returncode == 0
    shutil.rmtree(root / ".git")
    proc = subprocess.Popen([sys.executable, "cluster/run_pipeline.py", "repro"], cwd=root, env={**env, "MLFLOW_TRACKING_URI": "sqlite:///x.db"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (root / "started.txt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "stage did not start"
            time.sleep(0.2)
        # Meanwhile a second submit on this head stops at once, naming the running one.
        second = run([sys.executable, "cluster/run_pipeline.py", "repro"], root, {**env, "MLFLOW_TRACKING_URI": "sqlite:///x.db"})
        assert second.returncode == 2 and f"another run_pipeline.py is running on this head (pid {proc.pid}" in second.stdout
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out)
    assert proc.returncode == 128 + signum, out
    assert (root / "stopped.txt").read_text() == str(int(signum))
    assert f"stopped by signal {int(signum)}" in out
