"""Semi-supervised grid: FixMatch and UDA vs supervised-only on the same labels, from random init
and from SimCLR / MoCo encoders, at several label counts, mean ± std over seeds.

    python bench/semisup_grid.py [--labels 4,25] [--seeds 0,1,2] [--inits random,simclr,moco]
        [--methods fixmatch,uda,supervised] [--steps 500] [--pretrain-epochs 10]
        [--max-train-per-class N] [--npz FILE] [--export-npz FILE] [--set key=value ...] [--out FILE.json]

Every run is the Ray Train job its stage would launch (``lowlabel.runner.jobs``), with the repo's
params.yaml plus ``--set`` overrides (``runtime.*`` picks workers/GPU). Data: ``data.source`` of
params.yaml (Fashion-MNIST by default), base classes only; ``--npz`` reads arrays written by
``--export-npz`` instead (to carry a capped copy to a machine without the Debian package).

1. Pretrains each non-random init once (``--pretrain-epochs``) on the base-class training images
   of the first seed's split (labels unused).
2. For each labels-per-class L and seed s: a fresh split (seed s draws the labeled images), then
   every init x method for ``--steps`` steps. The number reported is the EMA model's accuracy on
   the base-class test images at the last step (not the best step: that would select on test).
3. Settings are chosen on a validation split, never on the test set: the base-class test images
   are halved once, stratified by class with a fixed seed (``--val-fraction``), and each run's
   final EMA model is scored on both halves (``val_acc``, ``heldout_acc`` in OUT.jsonl). Compare
   variants on ``val_acc``; report the chosen one's ``heldout_acc``. ``acc`` (the whole test set,
   as the loop's monitor sees it) stays the column of the method tables, which use the methods'
   published settings and choose nothing.
Prints a table of mean ± std over seeds and each method's margin over supervised-only with the
same init and labels; writes every run's numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

from lowlabel.config import Params, parse_params
from lowlabel.data.prepared import PreparedData, channel_stats, write_prepared
from lowlabel.data.sources import load_source
from lowlabel.data.splits import make_split
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.models.heads import Classifier
from lowlabel.models.store import save_encoder
from lowlabel.presets import set_param
from lowlabel.runner.jobs import common_config, pretrain_job, run_job, semisup_job
from lowlabel.runner.launch import cluster_address, ensure_ray, remove_run
from lowlabel.train.pretrain import pretrain_loop
from lowlabel.train.semisup import semisup_loop, test_predictions


def load_base_arrays(params: Params, npz: str | None, cap: int | None) -> dict[str, np.ndarray]:
    """Base-class train/test arrays (novel classes dropped: no stage here may see them)."""
    if npz:
        blob = np.load(npz)
        return {k: blob[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    cfg = params.data
    raw = load_source(cfg.source, cfg.root, image_size=cfg.image_size, channels=cfg.channels, download=cfg.download, seed=params.seed)
    novel = set(cfg.novel_classes) if isinstance(cfg.novel_classes, list) else set()
    if not isinstance(cfg.novel_classes, list):
        raise SystemExit("semisup_grid.py needs data.novel_classes as an explicit list of class ids")
    rng = np.random.default_rng(params.seed)
    keep_train = []
    for c in sorted(set(np.unique(raw.train_labels).tolist()) - novel):
        members = np.flatnonzero(raw.train_labels == c)
        keep_train.append(np.sort(rng.permutation(members)[:cap]) if cap else members)
    train = np.concatenate(keep_train)
    test = np.flatnonzero(~np.isin(raw.test_labels, list(novel)))
    return {
        "train_images": raw.train_images[train], "train_labels": raw.train_labels[train],
        "test_images": raw.test_images[test], "test_labels": raw.test_labels[test],
    }


def prepare(arrays: dict[str, np.ndarray], out: Path, labels_per_class: int, seed: int) -> Path:
    split = make_split(arrays["train_labels"], arrays["test_labels"], [], labels_per_class, seed)
    mean, std = channel_stats(arrays["train_images"][split.pretrain], seed=seed)
    classes = np.unique(arrays["train_labels"]).tolist()
    info = {"source": "semisup_grid", "class_names": [str(c) for c in classes], "mean": mean, "std": std, "skipped": []}
    if not (out / "split.json").is_file():
        write_prepared(out, arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"], split, info)
    return out


def train(params: Params, loop, config: dict, name: str, data_dir: Path, storage: Path, gpus_per_worker: float = 1.0) -> dict:
    """The stage's job on this bench's data; its folder is dropped once the final state is read."""
    state = run_job(params, loop, {**common_config(params, data_dir), **config}, name, storage_path=str(storage), gpus_per_worker=gpus_per_worker)
    remove_run(str(storage), name)
    return state


# Fixed, not a label-draw seed: every run of the grid is scored on the same validation half.
VALIDATION_SEED = 20261207


def validation_mask(truth: np.ndarray, fraction: float, seed: int = VALIDATION_SEED) -> np.ndarray:
    """True for the validation part of the test images: ``fraction`` of each class, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(truth), dtype=bool)
    for c in np.unique(truth):
        members = np.flatnonzero(truth == c)
        mask[rng.permutation(members)[: round(fraction * len(members))]] = True
    return mask


def final_model_scores(params: Params, ema_state: dict, data_dir: Path, val_fraction: float) -> dict:
    """The final EMA model on the base test images: each class's accuracy (where the errors are),
    and the accuracy on the validation and held-out halves."""
    data = PreparedData.load(data_dir)
    encoder = build_encoder(params.encoder.arch, data.in_chans, params.encoder.width)
    model = Classifier(encoder, feature_dim(encoder, data.in_chans, data.image_size), len(data.split.base_classes))
    model.load_state_dict(ema_state)
    predicted, truth = test_predictions(model, data)
    right = predicted == truth
    val = validation_mask(truth, val_fraction)
    return {
        "per_class_acc": [round(float(right[truth == c].mean()), 4) for c in range(len(data.split.base_classes))],
        "val_acc": round(float(right[val].mean()), 4),
        "heldout_acc": round(float(right[~val].mean()), 4),
    }


def with_updates(params: Params, **sections: dict) -> Params:
    raw = params.model_dump(mode="json")
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return parse_params(raw, source="bench/semisup_grid.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="4,25")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--inits", default="random,simclr,moco")
    parser.add_argument("--methods", default="fixmatch,uda,supervised")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=None, help="test the EMA model every N steps (default: at the end only); "
                        "the curve is kept in OUT.jsonl, the table still reports the last step")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--max-train-per-class", type=int, default=None)
    parser.add_argument("--npz", default=None)
    parser.add_argument("--export-npz", default=None, help="write the (capped) base-class arrays here and exit")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="JSON of every run (also appended run by run to OUT.jsonl; "
                        "cells already in OUT.jsonl under the same run name are taken from it, not re-run)")
    parser.add_argument("--encoders-dir", default=None, help="reuse <init>.pt found here; pretrain and save the others here")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--parallel", type=int, default=1, help="grid jobs at a time (each gets 1/N of a GPU when there is one)")
    parser.add_argument("--val-fraction", type=float, default=0.5, help="share of each class's base test images that is "
                        "the validation split settings are chosen on (val_acc); the rest is heldout_acc")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val-fraction {args.val_fraction}: expected a share in (0, 1)")

    raw = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        set_param(raw, *item.split("=", 1))
    params = parse_params(raw, source=args.params)
    arrays = load_base_arrays(params, args.npz, args.max_train_per_class)
    if args.export_npz:
        np.savez_compressed(args.export_npz, **arrays)
        print(f"wrote {args.export_npz}: {len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images")
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lowlabel-semisup-grid-"))
    storage = workdir / "ray"
    labels, seeds = [int(x) for x in args.labels.split(",")], [int(x) for x in args.seeds.split(",")]
    inits, methods = args.inits.split(","), args.methods.split(",")
    print(f"data: {len(arrays['train_labels'])} base train, {len(arrays['test_labels'])} base test images; "
          f"runtime workers={params.runtime.workers} use_gpu={params.runtime.use_gpu}", flush=True)

    # 1. Pretrained encoders, once (labels never read).
    encoders: dict[str, str | None] = {"random": None}
    pretrain_acc: dict[str, float] = {}
    data0 = prepare(arrays, workdir / f"prepared-L{labels[0]}-s{seeds[0]}", labels[0], seeds[0])
    encoders_dir = Path(args.encoders_dir) if args.encoders_dir else workdir / "encoders"
    for init in [i for i in inits if i != "random"]:
        path = encoders_dir / f"{init}.pt"
        if path.is_file():
            encoders[init] = str(path.resolve())  # workers run elsewhere: absolute paths only
            print(f"pretrain {init}: reusing {path}", flush=True)
            continue
        p = with_updates(params, pretrain={"epochs": args.pretrain_epochs, "min_steps": 0, "eval_every": args.pretrain_epochs})
        config, name = pretrain_job(p, init)
        started = time.perf_counter()
        state = train(p, pretrain_loop, config, name, data0, storage)
        save_encoder(path, state["encoder"], arch=p.encoder.arch, width=p.encoder.width, in_chans=arrays["train_images"].shape[-1], source=f"bench pretrain {init}")
        encoders[init] = str(path.resolve())
        knn = [h["knn_acc"] for h in state["history"] if "knn_acc" in h]
        pretrain_acc[init] = knn[-1]
        print(f"pretrain {init}: {args.pretrain_epochs} epochs in {time.perf_counter() - started:.0f} s, kNN {knn[0]:.3f} -> {knn[-1]:.3f}", flush=True)

    if args.pretrain_only:
        return
    # 2. The grid; with --parallel N, N jobs share the machine (and its GPU) at once.
    ensure_ray(cluster_address(params.runtime.ray_address), params.runtime.local_num_cpus)
    runs: list[dict] = []
    log = Path(args.out).with_suffix(".jsonl") if args.out else None
    # The run name holds a hash of every param of the job (seed, data, encoder, runtime, semisup),
    # so a finished cell is reused only for the very same job (and the same --encoders-dir).
    done = {}
    if log and log.is_file():
        done = {row["run"]: row for row in map(json.loads, log.read_text().splitlines()) if "run" in row}
    lock = threading.Lock()
    data_dirs = {(n, s): prepare(arrays, workdir / f"prepared-L{n}-s{s}", n, s) for n in labels for s in seeds}

    def grid_job(n_labels: int, seed: int, init: str, method: str) -> None:
        p = with_updates(params, semisup={"steps": args.steps, "eval_every": args.eval_every or args.steps, "init": "random"})
        p = p.model_copy(update={"seed": seed})
        config, name = semisup_job(p, method, encoders[init])
        name = f"{name}-{init}-L{n_labels}"
        if name in done:
            row = done[name]
            if row.get("val_fraction") != args.val_fraction:  # its halves are another split's (or it has none)
                row = {k: v for k, v in row.items() if k not in ("val_acc", "heldout_acc")}
            with lock:
                runs.append(row)
                print(f"L{n_labels} seed {seed} {init:<7} {method:<11} EMA test acc {done[name]['acc']:.4f}  (reused from {log})", flush=True)
            return
        started = time.perf_counter()
        state = train(p, semisup_loop, config, name, data_dirs[n_labels, seed], storage, 1.0 / args.parallel)
        last = state["history"][-1]
        run = {"labels": n_labels, "seed": seed, "init": init, "method": method, "acc": last["test_acc_ema"],
               "mask_rate": last.get("mask_rate"), "pseudo_acc": last.get("pseudo_acc"), "seconds": time.perf_counter() - started, "run": name, "val_fraction": args.val_fraction,
               "curve": [{k: h.get(k) for k in ("step", "test_acc_ema", "mask_rate", "pseudo_acc", "pseudo_balance")} for h in state["history"]],
               **final_model_scores(p, state["ema"], data_dirs[n_labels, seed], args.val_fraction)}
        with lock:
            runs.append(run)
            if log:
                with log.open("a") as f:
                    f.write(json.dumps(run) + "\n")
            print(f"L{n_labels} seed {seed} {init:<7} {method:<11} EMA test acc {run['acc']:.4f} "
                  f"(validation half {run['val_acc']:.4f}, held-out half {run['heldout_acc']:.4f}; {run['seconds']:.0f} s)", flush=True)

    grid = [(n, s, i, m) for n in labels for s in seeds for i in inits for m in methods]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(grid_job, *cell) for cell in grid]:
            future.result()

    # 3. Table.
    def accs(n, init, method, key="acc"):
        return np.array([r[key] for r in runs if (r["labels"], r["init"], r["method"]) == (n, init, method) and key in r])

    print(f"\nEMA test accuracy (%) on base classes, {args.steps} steps, mean ± std over seeds {seeds}; "
          f"margin = method − supervised (same init, labels, seed)")
    print(f"{'labels/class':>12} {'init':<8}" + "".join(f"{m:>16}" for m in methods) + "".join(f"{'Δ ' + m:>14}" for m in methods if m != "supervised"))
    summary = []
    for n_labels in labels:
        for init in inits:
            cells, deltas = [], []
            for method in methods:
                a = accs(n_labels, init, method) * 100
                cells.append(f"{a.mean():>9.1f} ± {a.std(ddof=1) if len(a) > 1 else 0:>4.1f}")
                summary.append({"labels": n_labels, "init": init, "method": method, "mean": a.mean(), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0})
                if method != "supervised" and "supervised" in methods:
                    d = a - accs(n_labels, init, "supervised") * 100
                    deltas.append(f"{d.mean():>+9.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:>3.1f}")
            print(f"{n_labels:>12} {init:<8}" + "".join(f"{c:>16}" for c in cells) + "".join(f"{d:>14}" for d in deltas))
    print("\nvalidation half (choose settings on this), mean over the seeds that have it:")
    for n_labels in labels:
        for init in inits:
            for method in methods:
                v = accs(n_labels, init, method, "val_acc")
                if len(v):
                    print(f"{n_labels:>12} {init:<8} {method:<12} {v.mean() * 100:.1f} ({len(v)} seeds)")
    if pretrain_acc:
        print("pretrain kNN (base test, 5k bank): " + ", ".join(f"{k} {v:.3f}" for k, v in pretrain_acc.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "pretrain_knn": pretrain_acc, "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
