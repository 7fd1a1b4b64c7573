"""DVC stage ``report``: one comparison of every encoder x head x setting, from the stages' metrics.

Writes ``reports/report.md`` (+ a PNG of accuracy vs shots), ``metrics/report.json``, and
logs all of it to an MLflow run. The headline margins the project promises are computed
here from the measured numbers, never typed in.

In MLflow it also completes the pipeline run of this ``dvc repro`` (lowlabel.tracking): a
``lowlabel.stage_run.*`` tag per stage run reported on (the runs of stages DVC skipped as
cached too) and the margins as ``report/...`` metrics. Each trained encoder reported on
becomes a version of the registered model ``lowlabel-<stage>-<method>``; the one with the best
novel-class ProtoNet accuracy (5-way 5-shot, else the best setting measured) gets the alias
``best-fewshot``: ``mlflow.pytorch.load_model("models:/lowlabel-pretrain-simclr@best-fewshot")``.
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
from lowlabel.stages.common import (
    METRICS_DIR,
    REPORTS_DIR,
    StageError,
    log,
    stage_main,
    tracked_run,
    write_json,
)
from lowlabel.tracking import (
    TAG_INIT_RUN,
    TAG_PARENT,
    register_encoders,
    registered_model_name,
    update_pipeline_run,
)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path} is missing; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def collect(params: Params) -> dict:
    return {
        "prepare": _load(METRICS_DIR / "prepare.json"),
        "pretrain": {m: _load(METRICS_DIR / "pretrain" / f"{m}.json") for m in params.pretrain.methods},
        "semisup": {m: _load(METRICS_DIR / "semisup" / f"{m}.json") for m in params.semisup.methods},
        "meta": {m: _load(METRICS_DIR / "meta" / f"{m}.json") for m in params.meta.methods},
        "fewshot": _load(METRICS_DIR / "fewshot.json"),
    }


def margins(metrics: dict, params: Params) -> dict[str, float]:
    """The comparisons the pipeline exists to show, in accuracy points (positive = claim holds)."""
    encoders = metrics["fewshot"]["encoders"]
    out: dict[str, float] = {}
    for method in params.pretrain.methods:
        out[f"knn: pretrain/{method} - random"] = 100 * (encoders[f"pretrain/{method}"]["base_knn_acc"] - encoders["random"]["base_knn_acc"])
        if "base_linear_acc" in encoders[f"pretrain/{method}"] and "base_linear_acc" in encoders["random"]:  # fewshot.json before the probe: none
            out[f"linear probe: pretrain/{method} - random"] = 100 * (
                encoders[f"pretrain/{method}"]["base_linear_acc"] - encoders["random"]["base_linear_acc"]
            )
        for key, value in encoders[f"pretrain/{method}"].items():
            if key.startswith("protonet/") and key in encoders["random"]:
                out[f"{key}: pretrain/{method} - random"] = 100 * (value["acc"] - encoders["random"][key]["acc"])
    # Meta-training against the encoder it started from, on the novel classes.
    start = "random" if params.meta.init == "random" else f"{'pretrain' if params.meta.init in params.pretrain.methods else 'semisup'}/{params.meta.init}"
    for method in metrics.get("meta", {}):
        for key, value in encoders.get(f"meta/{method}", {}).items():
            if key.startswith("protonet/") and key in encoders.get(start, {}):
                out[f"{key}: meta/{method} - {start}"] = 100 * (value["acc"] - encoders[start][key]["acc"])
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
        "| encoder | base kNN-" + str(params.fewshot.knn_k) + " | base linear probe | base test (EMA) | " + " | ".join(settings) + " |",
        "|---|---|---|---|" + "---|" * len(settings),
    ]
    for name, scores in encoders.items():
        stage, _, method = name.partition("/")
        semi = metrics["semisup"].get(method) if stage == "semisup" else None
        test = f"{semi['test_acc_ema'] * 100:.1f}" if semi else "–"
        cells = [f"{scores[s]['acc'] * 100:.1f} ± {scores[s]['ci95'] * 100:.1f}" if s in scores else "–" for s in settings]
        linear = f"{scores['base_linear_acc'] * 100:.1f}" if "base_linear_acc" in scores else "–"
        lines.append(f"| {name} | {scores['base_knn_acc'] * 100:.1f} | {linear} | {test} | " + " | ".join(cells) + " |")
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
    if metrics.get("meta"):
        lines += ["", "## Meta-training (episodes of the base classes)", "",
                  "| method | init | episodes from | steps | val acc (base test episodes) | best | episodes/s |", "|---|---|---|---|---|---|---|"]
        for method, m in metrics["meta"].items():
            lines.append(
                f"| {method} | {m['init']} | {m['episodes_from']} | {m['steps']} | {m['val_acc'] * 100:.1f} | {m['best_val_acc'] * 100:.1f} | {m['episodes_per_s']:.1f} |"
            )
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


def metric_name(margin: str) -> str:
    return margin.replace(":", "").replace(" ", "_").replace("/", "_")


def best_setting(encoders: dict[str, dict]) -> str | None:
    """The few-shot setting that picks the best encoder: ProtoNet 5-way 5-shot, else the
    ProtoNet setting with the most ways then shots, else any head's; measured for every encoder."""
    common = set.intersection(*({k for k in scores if "/" in k} for scores in encoders.values())) if encoders else set()

    def rank(key: str) -> tuple:
        head, setting = key.split("/")
        n_way, k_shot = setting.removesuffix("s").split("w")
        return (key == "protonet/5w5s", head == "protonet", int(n_way), int(k_shot), key)

    return max(common, key=rank, default=None)


def matching_fewshot_runs(runs_by_encoder: dict[str, list], encoders: dict[str, dict]) -> dict[str, object]:
    """Per encoder of metrics/fewshot.json, the newest FINISHED fewshot run that logged exactly
    its numbers: the run that wrote them, even when DVC took the stage from its cache."""
    found = {}
    for name, scores in encoders.items():
        for run in runs_by_encoder.get(name, []):
            logged = run.data.metrics
            if all(abs(logged.get(f"fewshot/{k}/acc", float("nan")) - v["acc"]) < 1e-9 for k, v in scores.items() if "/" in k):
                found[name] = run
                break
    return found


def link_and_register(metrics: dict, deltas: dict[str, float], run) -> None:
    """The MLflow side of the report: pipeline-run links and metrics, registered encoders."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.get_tracking_uri())
    encoders = metrics["fewshot"]["encoders"]
    fewshot_runs = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`lowlabel.stage` = 'fewshot' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1000,
    )
    by_encoder: dict[str, list] = {}
    for candidate in fewshot_runs:
        by_encoder.setdefault(candidate.data.tags.get("lowlabel.method", ""), []).append(candidate)
    matched = matching_fewshot_runs(by_encoder, encoders)
    stage_runs = {f"fewshot.{name}": r.info.run_id for name, r in matched.items()}
    trained = {name: r.data.tags.get(TAG_INIT_RUN, "") for name, r in matched.items() if name != "random" and r.data.tags.get(TAG_INIT_RUN)}
    stage_runs |= {name.replace("/", "@", 1): run_id for name, run_id in trained.items()}
    numbers = {k: float(v) for k, v in metrics["prepare"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    prepares = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`lowlabel.stage` = 'prepare' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=100,
    )
    prepare = next((r for r in prepares if all(r.data.metrics.get(k) == v for k, v in numbers.items())), None)
    if prepare is not None:
        stage_runs["prepare"] = prepare.info.run_id
    setting = best_setting({name: encoders[name] for name in trained})
    best = max(trained, key=lambda name: encoders[name][setting]["acc"]) if setting else None
    tags = {name: {"fewshot_setting": setting or "", "fewshot_acc": f"{encoders[name][setting]['acc']:.4f}" if setting else "",
                   "report_run_id": run.info.run_id} for name in trained}
    versions = register_encoders(client, trained, best, tags)
    if best:
        print(f"[report] registered {len(versions)} encoders; best-fewshot: {registered_model_name(best)} v{versions[best]} "
              f"({setting} {encoders[best][setting]['acc'] * 100:.1f})", flush=True)
    parent = run.data.tags.get(TAG_PARENT)
    if parent:
        update_pipeline_run(client, parent, stage_runs=stage_runs | {"report": run.info.run_id},
                            metrics={"report/" + metric_name(k): v for k, v in deltas.items()})


def report(params: Params) -> dict:
    metrics = collect(params)
    deltas = margins(metrics, params)
    with tracked_run(params, stage="report", method="report", dvc_stage="report", sections=("seed", "data", "encoder")) as run:
        text = markdown(metrics, params, deltas)
        atomic_write_text(REPORTS_DIR / "report.md", text)
        plot_shots(metrics, REPORTS_DIR / "fewshot_shots.png")
        write_json(METRICS_DIR / "report.json", {"margins": deltas, **metrics})
        mlflow.log_metrics({"margin/" + metric_name(k): v for k, v in deltas.items()})
        mlflow.log_artifact(str(REPORTS_DIR / "report.md"))
        mlflow.log_artifact(str(REPORTS_DIR / "fewshot_shots.png"))
        try:
            link_and_register(metrics, deltas, run)
        except Exception as error:  # the report itself is written; MLflow's extras must not undo it
            log.warning("report: MLflow pipeline links / model registry not updated: %s", error)
    print(text, flush=True)
    return {"margins": deltas}


def main() -> None:
    stage_main(__doc__, lambda params, args: report(params))


if __name__ == "__main__":
    main()
