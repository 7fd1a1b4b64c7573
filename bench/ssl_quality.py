"""Pretraining quality: kNN and linear-probe accuracy of each encoder on the base classes, against
random init (the floor) and a supervised encoder trained on every base label (the ceiling).

    python bench/ssl_quality.py WORKDIR [--ceiling-steps 1000] [--no-ceiling] [--out FILE.json]

WORKDIR is a folder where the pipeline ran (bench/pipeline_e2e.py --workdir leaves one): its
params.yaml, data/prepared and models/**/encoder.pt. Every encoder is frozen; features of all
base training images (bank / probe training set) and base test images (queries) are computed
once. kNN: weighted, k = fewshot.knn_k, the whole training set as the bank (the stage's final
number, not the pretraining monitor's 5k subset). Linear probe: L2-penalised multinomial
logistic regression, full-batch L-BFGS (lowlabel.evaluation.linear_probe_accuracy).

The ceiling is the supervised-only semisup job (same encoder, optimiser and augmentation as the
stage) on a copy of the split where every base training image is labeled, for
--ceiling-steps steps, run as a Ray Train job like the stage's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import load_params
from lowlabel.data.prepared import PreparedData, write_prepared
from lowlabel.evaluation import knn_split
from lowlabel.fewshot.protocol import KNN_BANK_SIZE, FewShotProtocol, base_accuracies, random_encoder
from lowlabel.models.heads import Classifier
from lowlabel.models.store import load_encoder
from lowlabel.runner.jobs import common_config, run_job, semisup_job
from lowlabel.train.semisup import semisup_loop


def train_ceiling(params, data: PreparedData, steps: int, workdir: Path) -> dict:
    """Supervised-only on every base training image's label; returns the encoder's state dict."""
    everything = dataclasses.replace(data.split, labeled=list(data.split.pretrain), unlabeled=[])
    prepared = workdir / "prepared-all-labels"
    write_prepared(prepared, data.train_images, data.train_labels, data.test_images, data.test_labels, everything, data.info)
    raw = params.model_dump(mode="json")
    raw["semisup"] |= {"steps": steps, "eval_every": steps, "init": "random"}
    ceiling_params = type(params).model_validate(raw)
    config, name = semisup_job(ceiling_params, "supervised", None)
    state = run_job(ceiling_params, semisup_loop, {**common_config(ceiling_params, prepared), **config}, f"{name}-ceiling",
                    storage_path=str(workdir / "ray"))
    return Classifier.encoder_state(state["ema"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--ceiling-steps", type=int, default=1000)
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    params = load_params(args.workdir / "params.yaml")
    data = PreparedData.load(args.workdir / "data" / "prepared")

    def fresh_encoder() -> torch.nn.Module:  # the training stages' initial weights
        return random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed)

    encoders: dict[str, torch.nn.Module] = {"random init": fresh_encoder()}
    for path in sorted((args.workdir / "models").glob("*/*/encoder.pt")):
        encoders[f"{path.parent.parent.name}/{path.parent.name}"] = load_encoder(path)[0]
    if not args.no_ceiling:
        started = time.perf_counter()
        ceiling = fresh_encoder()
        ceiling.load_state_dict(train_ceiling(params, data, args.ceiling_steps, Path(tempfile.mkdtemp(prefix="lowlabel-ceiling-"))))
        encoders[f"ceiling: supervised, all {len(data.split.pretrain)} base labels"] = ceiling.eval()
        print(f"ceiling trained for {args.ceiling_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)

    protocol = FewShotProtocol.from_params(params)
    bank_idx, test_idx = knn_split(data, KNN_BANK_SIZE, protocol.seed)
    rows = []
    for name, encoder in encoders.items():
        started = time.perf_counter()
        scores = base_accuracies(protocol, encoder, data)  # the fewshot stage's base_knn_acc and base_linear_acc
        knn, probe = scores["base_knn_acc"], scores["base_linear_acc"]
        rows.append({"encoder": name, "knn": knn, "linear_probe": probe, "seconds": time.perf_counter() - started})
        print(f"{name}: kNN {knn:.4f} linear {probe:.4f}", flush=True)

    print(f"\n{params.data.source}, {params.encoder.arch}: base classes, {len(bank_idx)} train / {len(test_idx)} test images, "
          f"pretrain {params.pretrain.epochs} epochs")
    print(f"{'encoder':<48}{'kNN-' + str(params.fewshot.knn_k):>10}{'linear':>10}")
    for row in rows:
        print(f"{row['encoder']:<48}{row['knn'] * 100:>10.1f}{row['linear_probe'] * 100:>10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"workdir": str(args.workdir), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
