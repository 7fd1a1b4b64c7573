"""DVC stage ``fewshot``: every encoder the pipeline produced, frozen, on classes no stage trained on.

Per encoder: embeddings of the novel-class test images computed once, then N-way K-shot
episodes (the same episodes for every encoder) run on that cache with each head; plus the
base-class kNN accuracy, so every encoder is also compared on the classes it did see.
One MLflow run per encoder, metrics named ``fewshot/<head>/<N>w<K>s/acc`` so the UI's
compare view lines them up.

The protocol itself (episodes, heads, pool embedding, base accuracies) is
:mod:`lowlabel.fewshot.protocol`'s; this stage picks the encoders on disk, logs each to MLflow
and writes ``metrics/fewshot.json`` and ``plots/fewshot.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow

from lowlabel.config import Params
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.fewshot.protocol import RANDOM, FewShotProtocol, evaluate_encoder, plan_episodes, random_encoder
from lowlabel.models.store import ENCODER_FILE
from lowlabel.stages.common import (
    METRICS_DIR,
    MODELS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    StageError,
    stage_main,
    tracked_run,
    write_csv,
    write_json,
)
from lowlabel.stages.encoder_files import load_encoder_file
from lowlabel.tracking import TAG_ENCODER, TAG_INIT_RUN, log_prepared_input


def encoder_paths(params: Params) -> dict[str, Path | None]:
    """Encoder name -> its file (None: random init), in report order."""
    paths: dict[str, Path | None] = {RANDOM: None}
    for stage, methods in (("pretrain", params.pretrain.methods), ("semisup", params.semisup.methods), ("meta", params.meta.methods)):
        for method in methods:
            path = MODELS_DIR / stage / method / ENCODER_FILE
            if not path.is_file():
                raise StageError(f"{path} is missing; run `dvc repro {stage}@{method}` first")
            paths[f"{stage}/{method}"] = path
    return paths


def fewshot(params: Params) -> dict:
    protocol = FewShotProtocol.from_params(params)
    data = PreparedData.load(PREPARED_DIR)
    novel_labels = data.novel_pool_labels()
    plans = plan_episodes(protocol, novel_labels)
    # Every encoder loaded before the first MLflow run: a bad file stops the stage naming it,
    # not after the encoders before it were evaluated.
    encoders = {}
    for name, path in encoder_paths(params).items():
        if path is None:
            # The training stages' seed: exactly the weights they started from.
            encoders[name] = random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed), {}
        else:  # name "pretrain/simclr" is written by the DVC stage pretrain@simclr
            encoders[name] = load_encoder_file(path, f"dvc repro {name.replace('/', '@', 1)}")
    results: dict[str, dict] = {}
    rows = []
    digest = prepared_digest(PREPARED_DIR)
    for name, (encoder, meta) in encoders.items():
        started = time.perf_counter()
        tags = {TAG_ENCODER: name, TAG_INIT_RUN: meta.get("mlflow_run_id", "")}
        with tracked_run(
            params, stage="fewshot", method=name, dvc_stage="fewshot", sections=("seed", "fewshot"), tags=tags, run_name=f"fewshot {name}"
        ):
            log_prepared_input(data, params.data.source, digest, context="evaluation")
            scores = evaluate_encoder(protocol, encoder, data, plans, novel_labels)
            mlflow.log_metrics({"base/knn_acc": scores["base_knn_acc"], "base/linear_acc": scores["base_linear_acc"]})
            for key, value in scores.items():
                if isinstance(value, dict):
                    mlflow.log_metrics({f"fewshot/{key}/acc": value["acc"], f"fewshot/{key}/ci95": value["ci95"]})
        results[name] = scores
        shown = ", ".join(f"{k} {v['acc'] * 100:.1f}±{v['ci95'] * 100:.1f}" for k, v in scores.items() if isinstance(v, dict))
        print(f"[fewshot] {name}: base kNN {scores['base_knn_acc'] * 100:.1f} linear {scores['base_linear_acc'] * 100:.1f} | {shown} ({time.perf_counter() - started:.1f} s)", flush=True)
        for key, value in scores.items():
            if isinstance(value, dict):
                head, setting = key.split("/")
                n_way, k_shot = setting.removesuffix("s").split("w")
                rows.append({"encoder": name, "head": head, "ways": int(n_way), "shots": int(k_shot), "acc": value["acc"], "ci95": value["ci95"]})
    payload = {
        "episodes": params.fewshot.episodes,
        "queries": params.fewshot.queries,
        "feature_norm": params.fewshot.feature_norm,
        "encoders": results,
    }
    write_json(METRICS_DIR / "fewshot.json", payload)
    write_csv(PLOTS_DIR / "fewshot.csv", rows)
    return payload


def main() -> None:
    stage_main(__doc__, lambda params, args: fewshot(params))


if __name__ == "__main__":
    main()
