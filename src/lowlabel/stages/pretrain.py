"""DVC stage ``pretrain@<method>``: self-supervised pretraining as a Ray Train job."""

from __future__ import annotations

import argparse

from lowlabel.config import PRETRAIN_METHODS, Params
from lowlabel.data.prepared import PreparedData
from lowlabel.methods.moco import default_queue_size
from lowlabel.models.store import ENCODER_FILE, save_encoder
from lowlabel.stages.common import MODELS_DIR, PREPARED_DIR, params_hash, publish_training_outputs, stage_main, tracked_run, train_in_ray
from lowlabel.train.pretrain import pretrain_loop

# The per-epoch monitor uses a fixed 5k subset of the base training images as its bank,
# to stay cheap; the fewshot stage reports kNN against all of them.
KNN_BANK_SIZE = 5000


def method_kwargs(params: Params, method: str, num_images: int) -> dict:
    kwargs = getattr(params.pretrain, method).model_dump()
    if method == "moco" and kwargs["queue_size"] is None:
        kwargs["queue_size"] = default_queue_size(num_images, params.pretrain.batch_size)
    return kwargs


def pretrain(params: Params, method: str) -> dict:
    cfg = params.pretrain
    data = PreparedData.load(PREPARED_DIR)
    out = MODELS_DIR / "pretrain" / method / ENCODER_FILE
    dvc_stage = f"pretrain@{method}"
    with tracked_run(params, stage="pretrain", method=method, dvc_stage=dvc_stage, sections=("seed", "data", "encoder", "runtime", "pretrain")) as run:
        config = {
            "label": dvc_stage,
            "method": method,
            "method_kwargs": method_kwargs(params, method, len(data.split.pretrain)),
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "max_steps_per_epoch": cfg.max_steps_per_epoch,
            "optim": cfg.optim.model_dump(exclude={"grad_clip"}),
            "grad_clip": cfg.optim.grad_clip,
            "crop_scale": list(cfg.crop_scale),
            "eval_every": cfg.eval_every,
            "knn_k": cfg.knn_k,
            "knn_bank_size": KNN_BANK_SIZE,
        }
        name = f"pretrain-{method}-{params_hash(params.seed, params.data, params.encoder, params.runtime, cfg)}"
        state = train_in_ray(params, pretrain_loop, config, name)
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
        save_encoder(
            out, state["encoder"], arch=params.encoder.arch, width=params.encoder.width, in_chans=data.in_chans,
            image_size=data.image_size, source=dvc_stage, mlflow_run_id=run.info.run_id,
        )
        publish_training_outputs("pretrain", method, metrics, history, out, data.in_chans, data.image_size)
    return metrics


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=PRETRAIN_METHODS)


def main() -> None:
    stage_main(__doc__, lambda params, args: pretrain(params, args.method), _args)


if __name__ == "__main__":
    main()
