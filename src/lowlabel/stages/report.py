"""DVC stage ``report``: one comparison of every encoder x head x setting, from the stages' metrics.

Writes ``reports/report.md`` (+ a PNG of accuracy vs shots), ``metrics/report.json``, and
logs all of it to an MLflow run. The headline margins the project promises are computed
here from the measured numbers, never typed in.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or cluster heads
import matplotlib.pyplot as plt
import mlflow

from lowlabel.atomic import atomic_write_text
from lowlabel.config import Params
from lowlabel.stages.common import METRICS_DIR, REPORTS_DIR, StageError, stage_main, tracked_run, write_json


def _load(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path} is missing; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def collect(params: Params) -> dict:
    return {
        "prepare": _load(METRICS_DIR / "prepare.json"),
        "pretrain": {m: _load(METRICS_DIR / "pretrain" / f"{m}.json") for m in params.pretrain.methods},
        "semisup": {m: _load(METRICS_DIR / "semisup" / f"{m}.json") for m in params.semisup.methods},
        "fewshot": _load(METRICS_DIR / "fewshot.json"),
    }


def margins(metrics: dict, params: Params) -> dict[str, float]:
    """The comparisons the pipeline exists to show, in accuracy points (positive = claim holds)."""
    encoders = metrics["fewshot"]["encoders"]
    out: dict[str, float] = {}
    for method in params.pretrain.methods:
        out[f"knn: pretrain/{method} - random"] = 100 * (encoders[f"pretrain/{method}"]["base_knn_acc"] - encoders["random"]["base_knn_acc"])
        for key, value in encoders[f"pretrain/{method}"].items():
            if key.startswith("protonet/") and key in encoders["random"]:
                out[f"{key}: pretrain/{method} - random"] = 100 * (value["acc"] - encoders["random"][key]["acc"])
    semisup = metrics["semisup"]
    if "supervised" in semisup:
        for method in semisup:
            if method != "supervised":
                out[f"base test acc: {method} - supervised"] = 100 * (semisup[method]["test_acc_ema"] - semisup["supervised"]["test_acc_ema"])
    return out


def markdown(metrics: dict, params: Params, deltas: dict[str, float]) -> str:
    fs = metrics["fewshot"]
    encoders = fs["encoders"]
    settings = sorted({k for scores in encoders.values() for k in scores if "/" in k})
    prep = metrics["prepare"]
    lines = [
        "# lowlabel report",
        "",
        f"Data: {params.data.source}, {prep['base_classes']} base classes ({prep['labeled']} labeled, {prep['unlabeled']} unlabeled training images), "
        f"{prep['novel_classes']} novel classes held out ({prep['test_novel'] + prep.get('train_novel', 0)} images for few-shot); encoder {params.encoder.arch}; seed {params.seed}.",
        "",
        f"Few-shot: {fs['episodes']} episodes per setting, {fs['queries']} queries per class, features `{fs['feature_norm']}`; mean accuracy ± 95% CI (%).",
        "",
        "| encoder | base kNN-" + str(params.fewshot.knn_k) + " | base test (EMA) | " + " | ".join(settings) + " |",
        "|---|---|---|" + "---|" * len(settings),
    ]
    for name, scores in encoders.items():
        stage, _, method = name.partition("/")
        semi = metrics["semisup"].get(method) if stage == "semisup" else None
        test = f"{semi['test_acc_ema'] * 100:.1f}" if semi else "–"
        cells = [f"{scores[s]['acc'] * 100:.1f} ± {scores[s]['ci95'] * 100:.1f}" if s in scores else "–" for s in settings]
        lines.append(f"| {name} | {scores['base_knn_acc'] * 100:.1f} | {test} | " + " | ".join(cells) + " |")
    lines += ["", "## Pretraining", "", "| method | final loss | kNN monitor at init (5k bank) | kNN monitor final | img/s |", "|---|---|---|---|---|"]
    for method, m in metrics["pretrain"].items():
        init = f"{m['knn_acc_init'] * 100:.1f}" if m.get("knn_acc_init") is not None else "–"
        lines.append(f"| {method} | {m['loss']:.3f} | {init} | {m['knn_acc'] * 100:.1f} | {m['images_per_s']:.0f} |")
    lines += ["", "## Semi-supervised (base-class test accuracy, %)", "", "| method | init | steps | raw | EMA | mask rate | pseudo-label acc | class balance |", "|---|---|---|---|---|---|---|---|"]
    for method, m in metrics["semisup"].items():
        mask = f"{m['mask_rate'] * 100:.1f}" if "mask_rate" in m else "–"
        pseudo = f"{m['pseudo_acc'] * 100:.1f}" if "pseudo_acc" in m else "–"
        balance = f"{m['pseudo_balance']:.2f}" if "pseudo_balance" in m else "–"
        lines.append(f"| {method} | {m['init']} | {m['steps']} | {m['test_acc'] * 100:.1f} | {m['test_acc_ema'] * 100:.1f} | {mask} | {pseudo} | {balance} |")
    lines += ["", "## Margins (accuracy points; the pipeline's claims hold where positive)", ""]
    lines += [f"- {name}: {value:+.1f}" for name, value in deltas.items()]
    return "\n".join(lines) + "\n"


def plot_shots(metrics: dict, path: Path) -> None:
    """Accuracy vs shots, one line per encoder x head, one panel per way."""
    encoders = metrics["fewshot"]["encoders"]
    ways = sorted({int(k.split("/")[1].split("w")[0]) for s in encoders.values() for k in s if "/" in k})
    fig, axes = plt.subplots(1, len(ways), figsize=(6 * len(ways), 4), squeeze=False)
    for ax, n_way in zip(axes[0], ways):
        for name, scores in encoders.items():
            heads = sorted({k.split("/")[0] for k in scores if "/" in k})
            for head in heads:
                points = sorted(
                    (int(k.split("/")[1].split("w")[1].rstrip("s")), v) for k, v in scores.items() if k.startswith(f"{head}/{n_way}w")
                )
                shots = [p[0] for p in points]
                ax.errorbar(shots, [p[1]["acc"] * 100 for p in points], yerr=[p[1]["ci95"] * 100 for p in points], marker="o", capsize=3, label=f"{name} · {head}")
        ax.set(title=f"{n_way}-way", xlabel="shots per class", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def report(params: Params) -> dict:
    metrics = collect(params)
    deltas = margins(metrics, params)
    with tracked_run(params, stage="report", method="report", dvc_stage="report", sections=("seed", "data", "encoder")):
        text = markdown(metrics, params, deltas)
        atomic_write_text(REPORTS_DIR / "report.md", text)
        plot_shots(metrics, REPORTS_DIR / "fewshot_shots.png")
        write_json(METRICS_DIR / "report.json", {"margins": deltas, **metrics})
        mlflow.log_metrics({"margin/" + k.replace(":", "").replace(" ", "_").replace("/", "_"): v for k, v in deltas.items()})
        mlflow.log_artifact(str(REPORTS_DIR / "report.md"))
        mlflow.log_artifact(str(REPORTS_DIR / "fewshot_shots.png"))
    print(text, flush=True)
    return {"margins": deltas}


def main() -> None:
    stage_main(__doc__, lambda params, args: report(params))


if __name__ == "__main__":
    main()
