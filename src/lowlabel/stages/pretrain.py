"""DVC stage ``pretrain@<method>``: self-supervised pretraining as a Ray Train job."""

from __future__ import annotations

import argparse
from typing import Any

from lowlabel.config import PRETRAIN_METHODS, Params
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.runner.jobs import pretrain_job
from lowlabel.stages.common import PREPARED_DIR, stage_main, tracked_run
from lowlabel.stages.preflight import check_before_training, check_storage
from lowlabel.stages.training import train_in_ray, write_training_outputs
from lowlabel.tracking import log_prepared_input


def run_pretrain_loop(config: dict[str, Any]) -> None:
    """The loop as Ray Train's workers run it. Its module is imported there, not in this
    driver process, which never runs it (torchvision, kornia, timm's optimisers: ~3 s of import
    per stage on 2 cores)."""
    from lowlabel.train.pretrain import pretrain_loop

    pretrain_loop(config)


def pretrain(params: Params, method: str) -> dict:
    data = PreparedData.load(PREPARED_DIR)
    check_before_training(params, data)
    check_storage(params)
    dvc_stage = f"pretrain@{method}"
    with tracked_run(params, stage="pretrain", method=method, dvc_stage=dvc_stage, sections=("seed", "data", "encoder", "runtime", "pretrain")) as run:
        log_prepared_input(data, params.data.source, prepared_digest(PREPARED_DIR), context="training")
        config, name = pretrain_job(params, method, inputs=(PREPARED_DIR,))
        state, ray_run = train_in_ray(params, run_pretrain_loop, config, name)
        history = state["history"]
        last = history[-1]
        knn = [h for h in history if "knn_acc" in h]
        metrics = {
            "loss": last["loss"],
            "knn_acc": knn[-1]["knn_acc"],
            "knn_acc_init": knn[0]["knn_acc"] if knn[0]["epoch"] == 0 else None,
            "images_per_s": sum(h["images_per_s"] for h in history if "images_per_s" in h) / max(1, len(history) - 1),
            "epochs": last["epoch"],
        }
        write_training_outputs(params, ray_run, "pretrain", method, state["encoder"], data, run.info.run_id, metrics, history)
    return metrics


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=PRETRAIN_METHODS)


def main() -> None:
    stage_main(__doc__, lambda params, args: pretrain(params, args.method), _args)


if __name__ == "__main__":
    main()
