"""DVC stage ``semisup@<method>``: a semi-supervised method (FixMatch, UDA, FreeMatch) or the supervised baseline as a Ray Train job."""

from __future__ import annotations

import argparse
from typing import Any

from lowlabel.config import SEMISUP_METHODS, Params
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.models.heads import Classifier
from lowlabel.models.store import CLASSIFIER_EMA_FILE, ENCODER_FILE
from lowlabel.runner.jobs import semisup_job
from lowlabel.stages.common import MODELS_DIR, PREPARED_DIR, StageError, stage_main, tracked_run
from lowlabel.stages.encoder_files import load_encoder_file
from lowlabel.stages.preflight import check_before_training, check_storage
from lowlabel.stages.training import train_in_ray, write_training_outputs
from lowlabel.tracking import TAG_INIT_RUN, log_prepared_input


def run_semisup_loop(config: dict[str, Any]) -> None:
    """The loop as Ray Train's workers run it. Its module is imported there, not in this
    driver process, which never runs it (torchvision, kornia, timm's optimisers: ~3 s of import
    per stage on 2 cores)."""
    from lowlabel.train.semisup import semisup_loop

    semisup_loop(config)


def init_encoder(params: Params) -> tuple[str | None, str]:
    """(path of the encoder to start from or None for random init, its MLflow run id or '')."""
    if params.semisup.init == "random":
        return None, ""
    path = MODELS_DIR / "pretrain" / params.semisup.init / ENCODER_FILE
    if not path.is_file():
        raise StageError(f"semisup.init={params.semisup.init!r} but {path} does not exist; run `dvc repro pretrain@{params.semisup.init}` first")
    # Loaded whole here, before any MLflow run or Ray: a bad file stops the stage naming it.
    _, meta = load_encoder_file(path, f"dvc repro pretrain@{params.semisup.init}")
    return str(path.resolve()), meta.get("mlflow_run_id", "")


def semisup(params: Params, method: str) -> dict:
    cfg = params.semisup
    data = PreparedData.load(PREPARED_DIR)
    check_before_training(params, data)
    check_storage(params)
    init_path, init_run = init_encoder(params)
    dvc_stage = f"semisup@{method}"
    tags = {TAG_INIT_RUN: init_run, "lowlabel.init": cfg.init}
    with tracked_run(
        params, stage="semisup", method=method, dvc_stage=dvc_stage, sections=("seed", "data", "encoder", "runtime", "semisup"), tags=tags
    ) as run:
        log_prepared_input(data, params.data.source, prepared_digest(PREPARED_DIR), context="training")
        config, name = semisup_job(params, method, init_path, inputs=(PREPARED_DIR,))
        state, ray_run = train_in_ray(params, run_semisup_loop, config, name)
        history = state["history"]
        last = history[-1]
        metrics = {
            "test_acc": last["test_acc"],
            "test_acc_ema": last["test_acc_ema"],
            "best_test_acc_ema": max(h["test_acc_ema"] for h in history),
            "steps": last["step"],
            "init": cfg.init,
        }
        for key in ("mask_rate", "pseudo_acc", "pseudo_balance", "loss_sup", "loss_unsup"):
            if key in last:
                metrics[key] = last[key]
        # The EMA weights are the ones evaluated, so they are the ones handed on.
        encoder_state = Classifier.encoder_state(state["ema"])
        write_training_outputs(
            params, ray_run, "semisup", method, encoder_state, data, run.info.run_id, metrics, history,
            extra_files={CLASSIFIER_EMA_FILE: state["ema"]}, init_run_id=init_run,
        )
    return metrics


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=SEMISUP_METHODS)


def main() -> None:
    stage_main(__doc__, lambda params, args: semisup(params, args.method), _args)


if __name__ == "__main__":
    main()
