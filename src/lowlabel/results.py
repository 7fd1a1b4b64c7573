"""A cluster run's results: what `ray submit` leaves in ``LOWLABEL_RESULTS``, and bringing it back.

The head (``cluster/run_pipeline.py``) publishes a finished run; a laptop fetches it after
``ray down`` has taken the head's disk away. Layout under a results URI (``s3://bucket/prefix``
through the standard AWS chain and ``AWS_ENDPOINT_URL`` for S3-compatible stores, or a path
every host mounts)::

    dvc/                DVC remote ``lowlabel-results``: the cached stage outputs (models, data/prepared, reports)
    mlartifacts/        the head MLflow server's --artifacts-destination (encoders as MLflow models)
    runs/<run>/         the run record: dvc.lock, params.yaml, metrics/, plots/, reports/,
                        mlflow.db (a consistent sqlite snapshot), run.json, pipeline.log
    latest              the name of the last run published

    python -m lowlabel.results fetch RESULTS_URI [RUN]     # ./pipeline fetch
    python -m lowlabel.results ui RUN_DIR_OR_URI [--port N] # ./pipeline ui --results ...
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import posixpath
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

REMOTE = "lowlabel-results"
RECORD_FILES = ("dvc.lock", "params.yaml")
# metrics/ and plots/ are `cache: false` outputs: DVC does not push them, the record carries them.
RECORD_DIRS = ("metrics", "plots", "reports")
LOCAL_DIR = "cluster-results"


class ResultsError(RuntimeError):
    """A results URI or run that cannot be used; the message names it."""


def _storage(uri: str):
    # Imported here: lowlabel.runner.storage imports ray (seconds), which `--help` does not need.
    from lowlabel.runner.storage import Storage, StorageError

    if "?" in uri:
        raise ResultsError(f"results URI {uri!r}: give the endpoint in AWS_ENDPOINT_URL, not as a URI query")
    try:
        return Storage.parse(uri.rstrip("/"))
    except StorageError as error:
        raise ResultsError(f"results URI {uri!r} is not usable: {error}") from None


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def open_results(uri: str):
    """The storage of ``uri``, whose bucket (or local folder) must be there."""
    storage = _storage(uri)
    if storage.is_local:
        if not Path(storage.root).is_dir():
            raise ResultsError(f"no cluster results at {uri}: folder {storage.root} does not exist")
    else:
        bucket = storage.root.split("/", 1)[0]
        try:
            found = storage.exists(bucket)
        except OSError as error:
            raise ResultsError(f"cannot reach cluster results at {uri}: {_first_line(error)}") from None
        if not found:
            raise ResultsError(f"no cluster results at {uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
    return storage


def _first_line(error: BaseException) -> str:
    from lowlabel.runner.storage import first_line

    return first_line(error)


def dvc_remote(uri: str, env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(URL, endpointurl) of the DVC remote under ``uri``: ``<uri>/dvc``; the endpoint of an
    S3-compatible store from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (dvc-s3 needs it in its config)."""
    env = os.environ if env is None else env
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve() / "dvc"), None
    endpoint = None
    if uri.startswith("s3://"):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    return _join(uri, "dvc"), endpoint


def _run(cmd: list[str], cwd: Path, env: Mapping[str, str] | None, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=None if env is None else dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ResultsError(f"{what} failed ({' '.join(cmd)}): {detail[-1] if detail else f'exit {proc.returncode}'}")


def configure_remote(root: Path, uri: str, env: Mapping[str, str] | None = None) -> str:
    """Point the checkout's DVC remote ``lowlabel-results`` (in .dvc/config.local) at ``<uri>/dvc``."""
    url, endpoint = dvc_remote(uri, env)
    _run(["dvc", "remote", "add", "--local", "-f", REMOTE, url], root, env, "dvc remote add")
    if endpoint:
        _run(["dvc", "remote", "modify", "--local", REMOTE, "endpointurl", endpoint], root, env, "dvc remote modify")
    return url


def snapshot_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a sqlite database another process may be writing (the backup API,
    which copies whole transactions, not the file's bytes mid-write)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _copy_tree(filesystem_from, source: str, filesystem_to, target: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(source, target, source_filesystem=filesystem_from, destination_filesystem=filesystem_to)


def publish_run(
    root: Path,
    uri: str,
    run: str,
    *,
    info: Mapping[str, object] | None = None,
    mlflow_db: Path | None = None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """After a successful ``dvc repro``/``exp run`` in ``root``: ``dvc push`` its outputs to
    ``<uri>/dvc`` and upload the run record to ``<uri>/runs/<run>/``, then ``<uri>/latest``
    (last, so ``latest`` never names a half-written record). Returns the record's URI."""
    import pyarrow.fs as pafs

    storage = open_results(uri)
    configure_remote(root, uri, env)
    _run(["dvc", "push", "-r", REMOTE], root, env, f"dvc push to {_join(uri, 'dvc')}")
    mlflow_db = root / "mlflow.db" if mlflow_db is None else mlflow_db
    with tempfile.TemporaryDirectory(prefix="lowlabel-record-") as tmp:
        staging = Path(tmp)
        for name in RECORD_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, staging / name)
        for name in RECORD_DIRS:
            if (root / name).is_dir():
                shutil.copytree(root / name, staging / name)
        if mlflow_db.is_file():
            snapshot_sqlite(mlflow_db, staging / "mlflow.db")
        if log is not None and log.is_file():
            shutil.copy2(log, staging / "pipeline.log")
        (staging / "run.json").write_text(json.dumps({"run": run, "results": uri, **(info or {})}, indent=2) + "\n")
        target = storage.path("runs", run)
        try:
            if storage.exists(target):
                storage.filesystem.delete_dir(target)
            _copy_tree(pafs.LocalFileSystem(), str(staging), storage.filesystem, target)
            storage.write_bytes(storage.path("latest"), f"{run}\n".encode())
        except OSError as error:
            raise ResultsError(f"uploading the run record to {_join(uri, 'runs', run)} failed: {_first_line(error)}") from None
    return _join(uri, "runs", run)


def list_runs(storage) -> list[str]:
    import pyarrow.fs as pafs

    infos = storage.filesystem.get_file_info(pafs.FileSelector(storage.path("runs"), allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def resolve_run(storage, uri: str, run: str | None) -> str:
    """``run``, or the one ``<uri>/latest`` names; it must have a record."""
    if run is None:
        latest = storage.path("latest")
        if not storage.exists(latest):
            raise ResultsError(f"no published run in {uri}: {_join(uri, 'latest')} does not exist (did `./pipeline submit` run with LOWLABEL_RESULTS={uri}?)")
        run = storage.read_bytes(latest).decode().strip()
    if not run or "/" in run or run.startswith("."):
        raise ResultsError(f"{run!r} is not a run name")
    if not storage.exists(storage.path("runs", run)):
        known = list_runs(storage)
        raise ResultsError(f"no run {run!r} in {uri}: {_join(uri, 'runs', run)} does not exist (runs there: {', '.join(known) or 'none'})")
    return run


def _install(source: Path, target: Path) -> str | None:
    """Copy ``source`` over ``target``; a local ``target`` that differs is kept as ``<target>.bak``."""
    backup = None
    if target.is_file() and not filecmp.cmp(source, target, shallow=False):
        backup = target.with_name(target.name + ".bak")
        shutil.copy2(target, backup)
    shutil.copy2(source, target)
    return str(backup) if backup else None


def fetch_run(root: Path, uri: str, run: str | None = None, env: Mapping[str, str] | None = None, log=print) -> Path:
    """Bring a published run back into the checkout ``root``: the record into
    ``cluster-results/<run>/``, its dvc.lock and params.yaml into the checkout (local ones that
    differ kept as ``.bak``), metrics/ and plots/ from the record, and ``dvc pull`` of the cached
    outputs (models, reports, prepared data) from ``<uri>/dvc``. Returns the record's folder."""
    import pyarrow.fs as pafs

    storage = open_results(uri)
    run = resolve_run(storage, uri, run)
    local = root / LOCAL_DIR / run
    if local.exists():
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        _copy_tree(storage.filesystem, storage.path("runs", run), pafs.LocalFileSystem(), str(local))
    except OSError as error:
        raise ResultsError(f"downloading {_join(uri, 'runs', run)} failed: {_first_line(error)}") from None
    (local / "source.json").write_text(json.dumps({"results": uri, "run": run}, indent=2) + "\n")
    for name in RECORD_FILES:
        if (local / name).is_file():
            backup = _install(local / name, root / name)
            if backup:
                log(f"[fetch] {name}: the local one differed, kept as {Path(backup).name}")
    for name in ("metrics", "plots"):
        if (local / name).is_dir():
            shutil.copytree(local / name, root / name, dirs_exist_ok=True)
    configure_remote(root, uri, env)
    # --force: the run's outputs replace what the checkout had (local cached versions stay in
    # .dvc/cache: `dvc checkout` with the .bak lock brings them back).
    _run(["dvc", "pull", "--force", "-r", REMOTE], root, env, f"dvc pull from {_join(uri, 'dvc')}")
    if (local / "reports").is_dir() and not (root / "reports").exists():
        shutil.copytree(local / "reports", root / "reports")
    return local


def ui_target(target: str, root: Path) -> tuple[Path, str | None]:
    """(mlflow.db, artifacts destination) for ``./pipeline ui --results TARGET``: a fetched run's
    folder (``cluster-results/<run>``), or a results URI (its latest run) or ``<uri>/runs/<run>``,
    whose MLflow snapshot is downloaded into ``cluster-results/<run>/``."""
    folder = Path(target).expanduser()
    if "://" not in target and (folder / "mlflow.db").is_file():
        source = folder / "source.json"
        results = json.loads(source.read_text())["results"] if source.is_file() else None
        return folder.resolve() / "mlflow.db", (_join(results, "mlartifacts") if results else None)
    uri, run = target.rstrip("/"), None
    head, sep, tail = uri.rpartition("/runs/")
    if sep and tail and "/" not in tail:
        uri, run = head, tail
    storage = open_results(uri)
    run = resolve_run(storage, uri, run)
    local = root / LOCAL_DIR / run
    local.mkdir(parents=True, exist_ok=True)
    db = storage.path("runs", run, "mlflow.db")
    if not storage.exists(db):
        raise ResultsError(f"run {run!r} in {uri} has no MLflow snapshot ({_join(uri, 'runs', run, 'mlflow.db')})")
    (local / "mlflow.db").write_bytes(storage.read_bytes(db))
    (local / "source.json").write_text(json.dumps({"results": uri, "run": run}, indent=2) + "\n")
    return local.resolve() / "mlflow.db", _join(uri, "mlartifacts")


def artifacts_destination(destination: str) -> str:
    return destination if "://" in destination else str(Path(destination).expanduser().resolve())


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlabel.results", description="Fetch a cluster run's results, or serve its MLflow snapshot.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="bring a published run back into this checkout")
    fetch.add_argument("uri", help="the LOWLABEL_RESULTS the run was submitted with (s3://bucket/prefix or a path)")
    fetch.add_argument("run", nargs="?", help="run name (default: the one <uri>/latest names)")
    ui = sub.add_parser("ui", help="MLflow UI over a run's snapshot, artifacts from the results storage")
    ui.add_argument("target", help="cluster-results/<run>, a results URI (its latest run) or <uri>/runs/<run>")
    ui.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if args.command == "fetch":
            if not (root / "dvc.yaml").is_file():
                raise ResultsError(f"{root} is not a lowlabel checkout (no dvc.yaml): run ./pipeline fetch from the repo")
            local = fetch_run(root, args.uri, args.run)
            print(f"[fetch] run {local.name} from {args.uri}: dvc.lock, params.yaml, metrics/, plots/ and the DVC outputs are in {root}; "
                  f"MLflow snapshot {local / 'mlflow.db'}; view it: ./pipeline ui --results {os.path.relpath(local, root)}")
            return 0
        db, destination = ui_target(args.target, root)
    except ResultsError as error:
        print(f"lowlabel.results: error: {error}", file=sys.stderr)
        return 2
    cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    if destination:
        cmd[4:4] = ["--artifacts-destination", artifacts_destination(destination)]
    print(f"[ui] {db} on http://127.0.0.1:{args.port} (artifacts: {destination or 'none recorded'}); training runs: "
          "pick 'Model training' in the sidebar, or add ?workflowType=machine_learning to an experiment's URL", flush=True)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
