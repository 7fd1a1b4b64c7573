"""Entry that `ray submit` runs on the head: the pipeline with every stage's TorchTrainer on the cluster.

    ray submit cluster/config.yaml cluster/run_pipeline.py -- [--env NAME=VALUE ...] [dvc repro args | exp run -S k=v ...]
    python ~/run_pipeline.py publish [RUN]     # on the head: publish the workspace's outputs again

(`./pipeline submit [--detach] ARGS` syncs the checkout, forwards the settings below as
``--env`` and quotes ARGS.) On the head, in the synced checkout:

- ``--env NAME=VALUE`` (LOWLABEL_RESULTS, AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_REGION,
  AWS_DEFAULT_REGION; an empty value unsets) is the complete set for this and later runs: it is
  kept in ``~/.lowlabel/cluster.env``, which the MLflow server's start script reads too. Without
  any ``--env`` the kept set applies.
- the checkout becomes a git repository (rsync leaves out .git): ``git init`` and a commit of
  everything not ignored on the first submit, a commit of the newly synced state on later ones
  (only if something changed), so ``dvc exp run -S k=v`` has a baseline.
- commands that run stages (``repro``, ``exp run``) wait for the head's MLflow server
  (``MLFLOW_TRACKING_URI``, default http://127.0.0.1:5000; exit 2 naming it and the server log
  when it is not healthy within 60 s, LOWLABEL_MLFLOW_WAIT_S), restarting it when LOWLABEL_RESULTS moved its artifacts,
  and create the experiment on it so artifacts go through the server (to ``$LOWLABEL_RESULTS/mlartifacts``).
- ``RAY_ADDRESS=auto``: each stage attaches to this cluster instead of starting a local Ray.
- output goes to the terminal and to ``~/.lowlabel/logs/<time>.log`` (``latest.log`` links the last).
- SIGHUP/SIGTERM/SIGINT go to dvc and its stage (whose MLflow runs end FAILED); exit 128+signal.
- after dvc succeeds, with LOWLABEL_RESULTS set: ``dvc push`` to ``$LOWLABEL_RESULTS/dvc`` and the
  run record to ``$LOWLABEL_RESULTS/runs/<run>/`` + ``latest`` (lowlabel.results.publish_run);
  the run is the DVC experiment's name for ``exp run``, else UTC time + git commit.
  ``./pipeline fetch $LOWLABEL_RESULTS`` brings it back to a laptop.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

# LOWLABEL_CHECKOUT: where a config whose file_mounts put the checkout elsewhere synced it.
REPO_CANDIDATES = [
    *([Path(os.environ["LOWLABEL_CHECKOUT"]).expanduser()] if os.environ.get("LOWLABEL_CHECKOUT") else []),
    Path(__file__).resolve().parents[1], Path.home() / "lowlabel", Path("/tmp/lowlabel"),
]
FORWARDED = ("LOWLABEL_RESULTS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# The head's MLflow server (cluster/mlflow_server.sh): 127.0.0.1, LOWLABEL_MLFLOW_PORT (5000).
MLFLOW_PORT = int(os.environ.get("LOWLABEL_MLFLOW_PORT") or 5000)
DEFAULT_TRACKING_URI = f"http://127.0.0.1:{MLFLOW_PORT}"
GIT_IDENTITY = "lowlabel-cluster"
HEALTH_TIMEOUT_S = float(os.environ.get("LOWLABEL_MLFLOW_WAIT_S") or 60)
SIGNAL_GRACE_S = 90.0  # a stage closing its MLflow run and its Ray Train job after SIGTERM/SIGHUP
DVC_VERBS = ("repro", "exp", "status", "metrics", "plots", "params", "dag", "push", "pull", "publish")


def repo_root() -> Path:
    for candidate in REPO_CANDIDATES:
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise SystemExit(f"no lowlabel checkout with dvc.yaml in {[str(c) for c in REPO_CANDIDATES]} (set LOWLABEL_CHECKOUT)")


def state_dir() -> Path:
    """Per-head state outside the checkout (not synced, not committed): cluster.env, logs, the
    MLflow server's log and destination, the submit lock."""
    path = Path(os.environ.get("LOWLABEL_STATE_DIR") or Path.home() / ".lowlabel")
    path.mkdir(parents=True, exist_ok=True)
    return path


def say(message: str) -> None:
    try:
        print(f"[submit] {message}", flush=True)
    except OSError:  # the ssh session is gone (SIGHUP): nobody to tell
        pass


# ---------------------------------------------------------------------------- forwarded settings


def split_env_args(argv: list[str]) -> tuple[dict[str, str] | None, list[str]]:
    """Leading ``--env NAME=VALUE`` pairs (None when there are none) and the dvc arguments."""
    forwarded: dict[str, str] | None = None
    while argv and argv[0] == "--env":
        if len(argv) < 2 or "=" not in argv[1]:
            raise SystemExit("run_pipeline.py: --env needs NAME=VALUE")
        name, _, value = argv[1].partition("=")
        forwarded = {**(forwarded or {}), name: value}
        argv = argv[2:]
    return forwarded, argv


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                name, _, value = words[1].partition("=")
                values[name] = value
    return values


def apply_forwarded_env(forwarded: dict[str, str] | None, env: dict[str, str]) -> dict[str, str]:
    """The settings in force: a forwarded set replaces ~/.lowlabel/cluster.env; else that file's."""
    path = state_dir() / "cluster.env"
    if forwarded is not None:
        kept = {k: v for k, v in forwarded.items() if v}
        path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(kept.items())))
        for name in set(FORWARDED) | set(forwarded):
            env.pop(name, None)
        env.update(kept)
        return kept
    kept = read_env_file(path)
    for name, value in kept.items():
        env.setdefault(name, value)
    return kept


# ---------------------------------------------------------------------------- git on the head


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=root, capture_output=True, text=True, check=check)


def ensure_git_repo(root: Path) -> str:
    """Make the synced checkout a git repository with its current state committed; returns HEAD.

    The first call: ``git init`` (local identity ``lowlabel-cluster``) and a commit of everything
    .gitignore does not exclude. Later calls commit what changed since (a new sync, dvc.lock
    written by the last run), and nothing when nothing did. DVC needs a commit for ``exp run``.
    """
    fresh = not (root / ".git").exists()
    if fresh:
        _git(root, "init", "-q")
        for key, value in (("user.name", GIT_IDENTITY), ("user.email", f"{GIT_IDENTITY}@localhost"), ("commit.gpgsign", "false")):
            _git(root, "config", "--local", key, value)
    _git(root, "add", "-A")
    has_head = _git(root, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0
    changed = _git(root, "diff", "--cached", "--quiet", check=False).returncode != 0
    if not has_head or changed:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        message = f"{GIT_IDENTITY}: checkout as synced to {socket.gethostname()}, {stamp}"
        _git(root, "commit", "-q", "--allow-empty", "--no-verify", "-m", message)
    # An older run_pipeline.py told DVC to work without git on this head; that would now hide git.
    local_config = root / ".dvc" / "config.local"
    if local_config.is_file() and "no_scm" in local_config.read_text():
        subprocess.run(["dvc", "config", "--local", "--unset", "core.no_scm"], cwd=root, capture_output=True)
    return _git(root, "rev-parse", "HEAD").stdout.strip()


def experiment_refs(root: Path) -> set[str]:
    out = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps", check=False).stdout
    # refs/exps/<2 hex>/<38 hex of the baseline>/<name>; refs/exps/exec/... are DVC's own.
    return {ref for ref in out.split() if re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", ref)}


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def run_name(args: list[str], commit: str, refs_before: set[str], refs_after: set[str], now: dt.datetime) -> str:
    """The DVC experiment's name for ``exp run``; else UTC time + the git commit."""
    if args[:2] == ["exp", "run"]:
        new = sorted(refs_after - refs_before)
        if len(new) == 1:
            return new[0].rsplit("/", 1)[1]
        named = _option(args, "-n", "--name")
        if named:
            return named
    return f"{now:%Y%m%dT%H%M%SZ}-{commit[:8]}"


# ---------------------------------------------------------------------------- MLflow on the head


def healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def wait_healthy(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if healthy(uri):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def is_head_server(uri: str) -> bool:
    parsed = urllib.parse.urlparse(uri)
    return parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost") and (parsed.port or 80) == MLFLOW_PORT


def artifacts_destination(root: Path, results: str | None) -> str:
    return f"{results.rstrip('/')}/mlartifacts" if results else str(root / "mlartifacts")


def ensure_mlflow(root: Path, env: dict[str, str]) -> str | None:
    """Wait for the tracking server; for the head's own one, (re)start it first when it is not
    running or its artifacts destination is not the one LOWLABEL_RESULTS asks for. Returns an
    error line, or None when the server is healthy."""
    uri = env["MLFLOW_TRACKING_URI"]
    if not uri.startswith(("http://", "https://")):
        return None
    state = state_dir()
    log = state / "mlflow-server.log"
    script = root / "cluster" / "mlflow_server.sh"
    if is_head_server(uri) and script.is_file():
        want = artifacts_destination(root, env.get("LOWLABEL_RESULTS"))
        recorded = state / "mlflow-server.destination"
        have = recorded.read_text().strip() if recorded.is_file() else None
        restart = have is not None and have != want
        if restart:
            say(f"restarting the MLflow server: artifacts to {want} (was {have})")
        subprocess.run(["bash", str(script), *(["--restart"] if restart else [])], cwd=root, env=env, check=False, stdout=subprocess.DEVNULL)
    if not wait_healthy(uri):
        where = f"server log: {log}" if is_head_server(uri) else "a server this cluster does not start"
        return f"error: no healthy MLflow server at MLFLOW_TRACKING_URI={uri} after {HEALTH_TIMEOUT_S:.0f} s ({where})"
    return None


def experiment_name(root: Path) -> str:
    try:
        import yaml

        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
        return str((params.get("tracking") or {}).get("experiment") or "lowlabel")
    except Exception:
        return "lowlabel"


def ensure_experiment(uri: str, name: str) -> str | None:
    """Create the experiment on the server without an artifact location, so the server gives it
    ``mlflow-artifacts:/<id>`` and artifacts go through it to its --artifacts-destination (the
    stages reuse an experiment that exists). Returns its artifact location."""
    base = uri.rstrip("/") + "/api/2.0/mlflow/experiments"

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        try:
            return call("/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))["experiment"]["artifact_location"]
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
        call("/create", {"name": name, "tags": [{"key": "mlflow.experimentKind", "value": "custom_model_development"}]})
        return call("/get-by-name?" + urllib.parse.urlencode({"experiment_name": name}))["experiment"]["artifact_location"]
    except (OSError, ValueError, KeyError) as error:
        say(f"note: could not create MLflow experiment {name!r} on {uri} ({error}); the stages will")
        return None


# ---------------------------------------------------------------------------- running dvc


def open_log() -> tuple[Path, object]:
    logs = state_dir() / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}.log"
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by main
    latest = logs / "latest.log"
    latest.unlink(missing_ok=True)
    latest.symlink_to(path.name)
    return path, handle


def _tee(source, log) -> None:
    out = sys.stdout.buffer
    while chunk := os.read(source.fileno(), 65536):
        log.write(chunk)
        try:
            out.write(chunk)
            out.flush()
        except OSError:  # the terminal went away; the log still gets everything
            pass


def run_dvc(args: list[str], root: Path, env: dict[str, str], log) -> int:
    """``dvc ARGS`` in its own process group, its output teed to ``log``. SIGHUP (the ssh
    session of ``ray submit`` dropped), SIGTERM and SIGINT go to the whole group: dvc and the
    stage it runs, which ends its MLflow run FAILED; then exit 128 + the signal."""
    proc = subprocess.Popen(["dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    reader = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
    reader.start()
    try:
        rc = proc.wait()
        if received:
            # dvc itself may exit first; its stage is still closing its runs: give the group time.
            deadline = time.monotonic() + SIGNAL_GRACE_S
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        reader.join(timeout=10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        say(f"stopped by signal {received[0]} ({signal.Signals(received[0]).name}); dvc exited {rc}")
        return 128 + received[0]
    return rc


def runs_stages(args: list[str]) -> bool:
    return args[0] == "repro" or args[:2] == ["exp", "run"]


def publishable(args: list[str]) -> str | None:
    """Why a successful ``args`` leaves nothing to publish in the workspace, or None."""
    if not runs_stages(args):
        return "not a run"
    for flag in ("--dry", "--queue", "--temp", "--run-all"):
        if flag in args:
            return f"{flag}: the outputs are not in the workspace (publish later: python ~/run_pipeline.py publish NAME)"
    return None


def acquire_lock():
    """One pipeline per head (a second one would also restart the MLflow server under the first):
    the open lock file, or None (said why) when another run_pipeline.py holds it."""
    handle = open(state_dir() / "submit.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "?"
        handle.close()
        say(f"error: another run_pipeline.py is running on this head (pid {other}; its output: "
            f"{state_dir() / 'logs' / 'latest.log'}); wait for it, or stop it first")
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def publish(root: Path, env: dict[str, str], name: str, info: dict, log_path: Path | None) -> int:
    results = env.get("LOWLABEL_RESULTS")
    sys.path.insert(0, str(root / "src"))  # the checkout's lowlabel, also without the venv's editable install
    from lowlabel.results import ResultsError, publish_run

    tracking = env.get("MLFLOW_TRACKING_URI", "")
    db = Path(tracking[len("sqlite:///"):]) if tracking.startswith("sqlite:///") else root / "mlflow.db"
    say(f"publishing run {name} to {results} (dvc push, run record)")
    try:
        where = publish_run(root, results, name, info=info, mlflow_db=db, log=log_path, env=env)
    except Exception as error:
        detail = error if isinstance(error, ResultsError) else f"{type(error).__name__}: {error}"
        say(f"error: the pipeline finished but publishing to LOWLABEL_RESULTS={results} failed: {detail}. "
            f"The outputs are still on the head: retry with `python ~/run_pipeline.py publish {name}`")
        return 3
    say(f"published {where}; on your machine: ./pipeline fetch {results} {name}")
    return 0


def main(argv: list[str]) -> int:
    root = repo_root()
    env = dict(os.environ)
    forwarded, argv = split_env_args(list(argv))
    apply_forwarded_env(forwarded, env)
    env.setdefault("RAY_ADDRESS", "auto")
    env.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    env.setdefault("PYTHONUNBUFFERED", "1")
    venv_bin = root / ".venv" / "bin"
    if venv_bin.is_dir():
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    # This process publishes too (pyarrow reads AWS_* from its own environment): same settings.
    os.environ["PATH"] = env["PATH"]
    for name in FORWARDED:
        if name in env:
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)
    args = argv or ["repro"]
    if args[0] not in DVC_VERBS:
        args = ["repro", *args]
    lock = None
    if runs_stages(args) or args[0] == "publish":
        lock = acquire_lock()
        if lock is None:
            return 2
    try:
        commit = ensure_git_repo(root)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        say(f"error: could not make {root} a git repository for DVC (git {' '.join(getattr(error, 'cmd', [])[3:])}): {detail[-1] if detail else error}")
        return 2
    results = env.get("LOWLABEL_RESULTS")

    if args[0] == "publish":
        if not results:
            say("error: publish needs LOWLABEL_RESULTS (./pipeline submit forwards it)")
            return 2
        name = args[1] if len(args) > 1 else run_name(["repro"], commit, set(), set(), dt.datetime.now(dt.timezone.utc))
        return publish(root, env, name, {"dvc_args": args, "git_commit": commit, "published_again": True}, None)

    if runs_stages(args):
        problem = ensure_mlflow(root, env)
        if problem:
            say(problem)
            return 2
        if env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://")):
            location = ensure_experiment(env["MLFLOW_TRACKING_URI"], experiment_name(root))
            if location and not location.startswith("mlflow-artifacts:"):
                say(f"note: MLflow experiment {experiment_name(root)!r} keeps artifacts at {location} (made before this server): they stay on the head")

    say(f"{root}: dvc {' '.join(args)} (RAY_ADDRESS={env['RAY_ADDRESS']}, MLflow {env['MLFLOW_TRACKING_URI']}, "
        f"results {results or 'not published: LOWLABEL_RESULTS unset'})")
    log_path, log = open_log()
    say(f"output also in {log_path}")
    started = dt.datetime.now(dt.timezone.utc)
    refs_before = experiment_refs(root)
    try:
        rc = run_dvc(args, root, env, log)
        if rc != 0 or not results:
            return rc
        why_not = publishable(args)
        if why_not:
            if why_not != "not a run":
                say(f"not publishing: {why_not}")
            return rc
        name = run_name(args, commit, refs_before, experiment_refs(root), started)
        info = {
            "dvc_args": args,
            "git_commit": commit,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "head": socket.gethostname(),
            "mlflow_tracking_uri": env["MLFLOW_TRACKING_URI"],
        }
        return publish(root, env, name, info, log_path)
    finally:
        log.close()
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
