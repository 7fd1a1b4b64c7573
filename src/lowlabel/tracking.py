"""MLflow tracking: one experiment, one run per stage (per method), tagged so runs line up.

The driver opens the run and always closes it: FINISHED on success, FAILED on any error or
interrupt, so no run is left RUNNING. Ray workers log metrics into it from rank 0 by run id.

One ``dvc repro`` / ``dvc exp run`` is one pipeline run: the ``source`` stage (which every
repro runs first) opens it (:func:`start_pipeline_run`) and records its id in
:data:`PIPELINE_RUN_FILE` with the DVC process it belongs to; every stage run of that same DVC
process is nested under it (``mlflow.parentRunId``); the report stage links the runs of
stages DVC skipped (cached) and logs its margins there. A stage run by hand, or by another DVC
invocation that did not run ``source``, is not nested.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowlabel.env import configure_quiet_env

configure_quiet_env()

import mlflow  # noqa: E402  (after the quiet environment is in place)
from mlflow.tracking import MlflowClient  # noqa: E402

TAG_STAGE = "lowlabel.stage"
TAG_METHOD = "lowlabel.method"
TAG_DVC_STAGE = "lowlabel.dvc_stage"
TAG_INIT_RUN = "lowlabel.init_run_id"
TAG_ENCODER = "lowlabel.encoder"
TAG_PARENT = "mlflow.parentRunId"
TAG_PIPELINE = "lowlabel.pipeline"
TAG_DVC_EXP = "lowlabel.dvc_exp_name"
TAG_STAGE_RUN = "lowlabel.stage_run."  # + dvc stage: on the pipeline run, each stage run it reports on
# Git- and DVC-ignored, not a DVC output: writing it re-runs nothing.
PIPELINE_RUN_FILE = Path(".lowlabel/pipeline_run.json")
# MLflow 3's marker of a model-training (not GenAI) experiment. The 3.17 UI itself opens on its
# GenAI or "Model training" pages by its sidebar switch (kept in the browser) or the URL's
# ?workflowType=machine_learning, which wins; tests/test_mlflow_ui.py opens it that way.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative sqlite path is made absolute (workers have another cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def artifact_location(artifact_root: str, root: Path) -> str:
    if "://" in artifact_root:
        return artifact_root
    return (root / artifact_root).resolve().as_uri()


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if commit and dirty.strip() else "")


def experiment_id(client: MlflowClient, name: str, location: str) -> str:
    """The experiment's id, created when missing; either way tagged as a training experiment
    (an experiment made before lowlabel set the tag gets it the next time a stage opens it; a
    kind someone chose in the UI is left as it is)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=f"{location.rstrip('/')}/{name}", tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer within seconds, or the stage stops before training."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except OSError as error:
        raise ConnectionError(f"MLflow tracking server {uri} (tracking.uri / MLFLOW_TRACKING_URI) is unreachable: {error}") from None


def _is_dvc(cmdline: list[str]) -> bool:
    return any(Path(arg).name == "dvc" for arg in cmdline[:2]) or any(cmdline[i : i + 2] == ["-m", "dvc"] for i in range(len(cmdline)))


def dvc_invocation() -> str | None:
    """The DVC process this stage runs under (the nearest ``dvc`` ancestor: ``dvc repro``,
    ``dvc exp run`` or its executor) as ``"<pid>@<start time>"``; None when run by hand.
    Every stage command of one invocation is its descendant, so this names the invocation."""
    try:
        import psutil
    except ImportError:
        return None
    from lowlabel.runner.warm import stage_pid

    try:
        proc = psutil.Process(stage_pid()).parent()
        while proc is not None:
            if _is_dvc(proc.cmdline()):
                return f"{proc.pid}@{proc.create_time():.3f}"
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def start_pipeline_run(
    *, tracking_uri: str, artifact_root: str, experiment: str, params: dict[str, Any], root: Path, invocation: str
) -> str:
    """The parent run of this DVC invocation; its id goes to :data:`PIPELINE_RUN_FILE`.

    Named after the DVC experiment (``DVC_EXP_NAME``, set by ``dvc exp run``), else the short
    commit and the time; params: the whole params.yaml, flattened. It is ended FINISHED at once
    (nesting is the children's tag; no run is left RUNNING whatever happens later); a stage run
    that fails marks it FAILED, the report stage adds its margins and re-ends it."""
    check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, artifact_location(artifact_root, root))
    commit = git_commit(root)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {TAG_PIPELINE: "true", "mlflow.source.git.commit": commit, "lowlabel.dvc_invocation": invocation}
    if exp_name:
        tags |= {TAG_DVC_EXP: exp_name, "lowlabel.dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    name = exp_name or f"pipeline {commit[:8]} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    from mlflow.entities import Param

    items = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
    client.set_terminated(run_id, "FINISHED")
    from lowlabel.atomic import atomic_write_text

    record = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": exp_id, "invocation": invocation}
    atomic_write_text(root / PIPELINE_RUN_FILE, json.dumps(record) + "\n")
    return run_id


def pipeline_run_id(tracking_uri: str, root: Path) -> str | None:
    """The pipeline run this stage belongs to: the recorded one when it was opened by this same
    DVC invocation in this same store, else None."""
    invocation = dvc_invocation()
    if invocation is None:
        return None
    try:
        record = json.loads((root / PIPELINE_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("invocation") != invocation or record.get("tracking_uri") != tracking_uri:
        return None
    return record.get("run_id")


@contextmanager
def stage_run(
    *,
    tracking_uri: str,
    artifact_root: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    root: Path,
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run for a stage; end it FINISHED, or FAILED if the body raises. Nested
    under ``parent_run_id`` (the pipeline run) when given; a failure marks that FAILED too."""
    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, artifact_location(artifact_root, root))
    all_tags = {"mlflow.source.git.commit": git_commit(root), **tags}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
    try:
        # MLflow caps a param value at 6000 chars; lists of ints can be long.
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        if parent_run_id:
            try:
                client.set_terminated(parent_run_id, "FAILED")
            except Exception:  # the stage's own error is the one to show
                pass
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_prepared_input(data: Any, source: str, digest: str, context: str) -> None:
    """The prepared data (a lowlabel.data.prepared.PreparedData) as a dataset input of the
    active run, named ``prepared/<data.source>``, with its digest
    (lowlabel.data.prepared.prepared_digest): data lineage in MLflow's UI, the same digest on
    two runs means the same bytes."""
    log_data_input(data.root, name=f"prepared/{source}", digest=digest, arrays=data.arrays(), context=context)


def log_data_input(root: Path, *, name: str, digest: str, arrays: dict[str, Any], context: str) -> None:
    """A folder of arrays as a dataset input of the active run. Metadata only, nothing is
    uploaded: the source is the folder, the schema names each array's dtype and shape (first
    axis -1)."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(a.dtype), (-1, *a.shape[1:]), key) for key, a in arrays.items()])
    dataset = MetaDataset(LocalArtifactDatasetSource(Path(root).resolve().as_uri()), name=name, digest=digest, schema=schema)
    # mlflow.log_input would open a run of its own when none is active: a stray RUNNING run.
    if mlflow.active_run() is None:
        raise RuntimeError(f"dataset input {name!r}: no active MLflow run to log it to")
    mlflow.log_input(dataset, context=context)


def stage_run_tag(label: str) -> str:
    """``pretrain@simclr`` -> ``lowlabel.stage_run.pretrain.simclr`` (MLflow tag keys take no ``@``)."""
    return TAG_STAGE_RUN + label.replace("@", ".")


def update_pipeline_run(client: MlflowClient, run_id: str, *, stage_runs: dict[str, str], metrics: dict[str, float]) -> None:
    """The report's part of the pipeline run: a tag per stage run it reports on (cached ones
    included: DVC skipped them, so they are not nested), its metrics, and a new end time."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag(stage_run_tag(label), child) for label, child in sorted(stage_runs.items()) if child]
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags)
    client.set_terminated(run_id, "FINISHED")


BEST_ALIAS = "best-fewshot"


def registered_model_name(encoder: str) -> str:
    """``pretrain/simclr`` -> ``lowlabel-pretrain-simclr``: one registered model per stage and method."""
    return "lowlabel-" + encoder.replace("/", "-")


def register_encoders(client: MlflowClient, encoders: dict[str, str], best: str | None, tags: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Each encoder (name -> the run that logged it as the model ``encoder``) as a version of its registered
    model (:func:`registered_model_name`); a run already registered keeps its version. Alias
    :data:`BEST_ALIAS` goes to ``best``'s version and leaves any other lowlabel model. Returns
    name -> version."""
    versions: dict[str, str] = {}
    for name, run_id in encoders.items():
        model = registered_model_name(name)
        try:
            client.get_registered_model(model)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(model, description=f"lowlabel encoders trained by the DVC stage {name.replace('/', '@', 1)}")
        found = client.search_model_versions(f"name = '{model}' and run_id = '{run_id}'")
        if found:
            version = found[0]
        else:
            # MLflow 3 keeps a logged model apart from its run's artifacts: register the LoggedModel.
            experiment = client.get_run(run_id).info.experiment_id
            logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}' and name = 'encoder'")
            if not logged:
                raise mlflow.exceptions.MlflowException(f"run {run_id} ({name}) logged no model named 'encoder'")
            model_id = logged[0].model_id
            version = client.create_model_version(model, f"models:/{model_id}", run_id=run_id, model_id=model_id)
        versions[name] = str(version.version)
        for key, value in ((tags or {}).get(name) or {}).items():  # a new version's and a found one's alike
            client.set_model_version_tag(model, str(version.version), key, value)
    if best in versions:
        for registered in client.search_registered_models("name LIKE 'lowlabel-%'"):
            if BEST_ALIAS in (registered.aliases or {}) and registered.name != registered_model_name(best):
                client.delete_registered_model_alias(registered.name, BEST_ALIAS)
        client.set_registered_model_alias(registered_model_name(best), BEST_ALIAS, versions[best])
    return versions


PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm"]


def log_encoder(encoder, in_chans: int, image_size: int, name: str = "encoder") -> None:
    """The encoder as an MLflow PyTorch model, with a signature from an example batch.

    Requirements are given, so MLflow does not spend seconds inferring them.
    """
    import mlflow.pytorch
    import numpy as np

    example = np.zeros((2, in_chans, image_size, image_size), dtype=np.float32)
    mlflow.pytorch.log_model(encoder.cpu().eval(), name=name, input_example=example, pip_requirements=PIP_REQUIREMENTS)
