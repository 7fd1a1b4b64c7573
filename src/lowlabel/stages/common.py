"""What every stage entry shares: argument parsing, clean errors, outputs written atomically, the
stage's MLflow run. Light on purpose (no Ray, no torch): DVC re-runs every stage when it changes."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.atomic import atomic_write_text  # noqa: E402
from lowlabel.config import Params, flatten, load_params  # noqa: E402
from lowlabel.errors import UserError, first_line  # noqa: E402
from lowlabel.tracking import (  # noqa: E402
    TAG_DVC_STAGE,
    TAG_METHOD,
    TAG_STAGE,
    pipeline_run_id,
    resolve_tracking_uri,
    stage_run,
)

PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")

log = logging.getLogger("lowlabel")


class StageError(UserError, RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


# Problems with the user's input or setup (lowlabel.errors.UserError and its kinds; an
# unreachable tracking server): shown as one clear line, no traceback, exit 2.
USER_ERRORS = (UserError, ConnectionError)


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@contextmanager
def tracked_run(
    params: Params, *, stage: str, method: str, dvc_stage: str, sections: Iterable[str], tags: dict[str, str] | None = None, run_name: str | None = None
) -> Iterator[Any]:
    """The stage's MLflow run, with the params of ``sections`` flattened into it, nested under the
    pipeline run of the ``dvc repro`` / ``dvc exp run`` it is part of (lowlabel.tracking). A
    store the run cannot be opened in (a sqlite path under a file or unwritable, an unknown
    scheme, a server that answers with errors) stops the stage with one line naming it."""
    root = Path.cwd()
    flat = {}
    for section in sections:
        value = getattr(params, section)
        flat |= flatten(value, prefix=f"{section}.") if hasattr(value, "model_dump") else {section: value}
    if flat.get("runtime.workers") == "auto":
        # MLflow params cannot change: train_in_ray logs the resolved count under this name.
        flat["runtime.workers_setting"] = flat.pop("runtime.workers")
    uri = resolve_tracking_uri(params.tracking.uri, root)
    opening = stage_run(
        tracking_uri=uri,
        artifact_root=params.tracking.artifact_root,
        experiment=params.tracking.experiment,
        run_name=run_name or dvc_stage,
        tags={TAG_STAGE: stage, TAG_METHOD: method, TAG_DVC_STAGE: dvc_stage, **(tags or {})},
        params=flat,
        root=root,
        parent_run_id=pipeline_run_id(uri, root),
    )
    with ExitStack() as stack:
        try:
            run = stack.enter_context(opening)
        except ConnectionError:
            raise  # an unreachable server: its message already names it
        except Exception as error:  # MLflow, SQLAlchemy and OS errors: each kind of store fails its own way
            raise StageError(f"MLflow tracking store {uri} (tracking.uri / MLFLOW_TRACKING_URI) cannot be used: {first_line(error)}") from None
        yield run


def _terminate(signum, frame):
    # SIGTERM (dvc/ray killing us) and SIGHUP (the ssh session of `ray submit` dropped) unwind
    # like Ctrl-C, so MLflow runs are closed as FAILED; checkpoints stay for the re-run.
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def stage_main(description: str, run: Callable[[Params, argparse.Namespace], None], add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        params = load_params(args.params)
        run(params, args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
