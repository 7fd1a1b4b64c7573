"""DVC stage ``fewshot``: every encoder the pipeline produced, frozen, on classes no stage trained on.

Per encoder: embeddings of the novel-class test images computed once, then N-way K-shot
episodes (the same episodes for every encoder) run on that cache with each head; plus the
base-class kNN accuracy, so every encoder is also compared on the classes it did see.
One MLflow run per encoder, metrics named ``fewshot/<head>/<N>w<K>s/acc`` so the UI's
compare view lines them up. A meta-trained encoder (``meta/<method>``) is also scored through
its method's own test-time head, stored beside it (``own/<N>w<K>s``: prototypes, matching
attention, the relation module, or MAML/Reptile adaptation on the support set).

The protocol itself (episodes, heads, pool embedding, base accuracies) is
:mod:`lowlabel.fewshot.protocol`'s; this stage picks the encoders on disk, logs each to MLflow
and writes ``metrics/fewshot.json`` and ``plots/fewshot.csv``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import mlflow
import torch

from lowlabel.config import Params
from lowlabel.data.prepared import PreparedData, prepared_digest
from lowlabel.fewshot.protocol import (
    RANDOM,
    FewShotProtocol,
    evaluate_encoder,
    evaluate_meta_method,
    meta_method_from_state,
    plan_episodes,
    random_encoder,
    setting_name,
)
from lowlabel.meta.base import MetaMethod
from lowlabel.models.store import ENCODER_FILE, META_HEAD_FILE
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
from lowlabel.stages.encoder_files import load_encoder_file, load_failure
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


# The key prefix of a meta-trained method's own test-time head ("own/5w1s").
OWN_HEAD = "own"


def load_meta_head(name: str, encoder: torch.nn.Module, in_chans: int, image_size: int) -> MetaMethod:
    """The stored MetaMethod of the encoder ``meta/<method>`` (models/meta/<method>/meta_head.pt),
    around a copy of ``encoder``."""
    path = MODELS_DIR / name / META_HEAD_FILE
    remake = f"dvc repro {name.replace('/', '@', 1)}"
    try:
        # weights_only: a model file must not be a way to run code here.
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return meta_method_from_state(blob, copy.deepcopy(encoder), in_chans, image_size)
    except Exception as error:  # missing, cut off, another encoder's
        raise StageError(f"{path} cannot be loaded: {load_failure(error)}; re-create it with `{remake}`") from None


def own_head_scores(method: MetaMethod, data: PreparedData, plans: dict) -> dict[str, dict]:
    """A meta-trained encoder through its method's own test-time head, on the same episodes."""
    out = {}
    for (n_way, k_shot), episodes in plans.items():
        if method.adapts and n_way != method.ways:
            continue  # its head has the trained number of outputs
        result = evaluate_meta_method(method, data, episodes)
        out[f"{OWN_HEAD}/{setting_name(n_way, k_shot)}"] = {"acc": result.accuracy, "ci95": result.ci95}
    return out


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
    heads = {name: load_meta_head(name, encoders[name][0], data.in_chans, data.image_size) for name in encoders if name.startswith("meta/")}
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
            if name in heads:
                scores |= own_head_scores(heads[name], data, plans)
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
