"""Meta-learning vs a frozen encoder + simple head, on novel classes (issue 16).

    # glyphs, every base image labeled (presets/glyphs_fulllabel.yaml, scaled down):
    python bench/meta_table.py --out DIR [--classes 150 --novel 50] [--steps 300] [--slow-steps 150]
        [--episodes 200] [--methods protonet,matchingnet,relationnet,maml,reptile] [--max-jobs N]
    # Fashion-MNIST at params.yaml's 4 labels/class: meta-training on labels / pseudo-labels / none:
    python bench/meta_table.py --out DIR --episodes-from labels,pseudo,unsupervised --seeds 0,1
    # the same on glyphs at presets/glyphs.yaml's 2 labels/class (scaled by --classes / --novel):
    python bench/meta_table.py --out DIR --data glyphs --episodes-from labels,pseudo,unsupervised --meta-queries 1

Every model is trained by the Ray Train job its pipeline stage launches (lowlabel.runner.jobs:
``meta_job`` + ``meta_loop``, ``semisup_job`` + ``semisup_loop``, ``pretrain_job`` +
``pretrain_loop``), without MLflow, on data prepared here under ``--out``. Each finished job's
state is kept in ``DIR/jobs/<name>.pt``; a rerun with the same ``--out`` reuses it, and ``--max-jobs N`` stops after N
new jobs (exit code 3: more to train), so the training can run in short pieces (a shared Ray
lock) and the evaluation, which starts no Ray, runs once everything is trained.

glyphs mode: the glyphs source with ``--classes`` characters, ``--novel`` of them held out
(all 20 images each, as Omniglot), 15 labeled training + 5 test images per base class. Every
``--methods`` meta-learner is meta-trained from random init on the labeled base images
(``meta.ways``-way ``meta.shots``-shot episodes, ``--steps``; MAML and Reptile ``--slow-steps``).
Then, on the novel classes, the same seeded episodes for every row (``--episodes`` per setting,
5/20-way x 1/5-shot, 15 queries per way):
  (a) ``<method>: own``: the method's own test-time procedure (``MetaMethod.scores``: metric
      heads on the episode, MAML/Reptile fine-tuning on the support set). MAML/Reptile's linear
      head has ``meta.ways`` outputs fixed at meta-training, so they are scored at that many
      ways only (other cells: n/a);
  (b) ``<method>: frozen ProtoNet`` / ``Baseline++``: its meta-trained encoder, frozen, under
      lowlabel.fewshot's heads (the fewshot stage's protocol: l2-normalised cached features);
  (c) the same frozen heads on a supervised encoder (``semisup@supervised`` on all labels, from
      random init), a SimCLR encoder (``pretrain@simclr``) and the random init.
Reports meta-training wall time (the Ray job, with its start-up) and episodes/s (training loop).

pseudo mode (``--episodes-from``): Fashion-MNIST with params.yaml's split (4 labels per base
class; ``--max-train-per-class`` caps the base training images to fit the budget) or, with
``--data glyphs``, the glyphs preset's low-label split (2 labels per base class, ``--classes``
characters, ``--novel`` of them held out, every image of a novel class in its pool), per seed
in ``--seeds``: a FixMatch classifier from the SimCLR encoder (one SimCLR run, seed 0), a
supervised one, then ``--methods`` (default protonet) meta-trained from ``--meta-init`` (default
params.yaml's ``meta.init``) on each episode source: ``labels`` (the labeled images),
``pseudo`` (FixMatch's confident predictions, ``meta.pseudo_threshold``), ``unsupervised``
(UMTRA). Novel 5-way 1/5-shot: every meta-trained encoder under the frozen ProtoNet head and
its own procedure, beside the frozen heads on the FixMatch, supervised, SimCLR and random
encoders. Table: per seed and mean.

Writes DIR/meta_table_<glyphs|pseudo>.md (the tables) and .json (arguments, job wall times).
Kept jobs are found by name (method, episode source, seed), not by their settings: use a new
``--out`` (or delete DIR/jobs/<name>.pt) after changing a budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.env import configure_quiet_env

configure_quiet_env()

import torch

from lowlabel.config import Params, parse_params
from lowlabel.data.augment import eval_view
from lowlabel.data.prepared import PreparedData, channel_stats, write_prepared
from lowlabel.data.sources import load_source
from lowlabel.data.splits import make_split
from lowlabel.fewshot.evaluate import confidence_interval95
from lowlabel.fewshot.protocol import (
    FewShotProtocol,
    embed_novel_pool,
    evaluate_head,
    plan_episodes,
    random_encoder,
    setting_name,
)
from lowlabel.fewshot.sampler import Episode
from lowlabel.meta.base import MetaMethod
from lowlabel.meta.episodes import load_episode
from lowlabel.meta.registry import META_METHODS
from lowlabel.models.encoders import build_encoder, feature_dim
from lowlabel.models.heads import Classifier
from lowlabel.models.store import save_encoder
from lowlabel.presets import PRESETS_DIR, merge, set_param
from lowlabel.runner.jobs import common_config, meta_job, pretrain_job, run_job, semisup_job
from lowlabel.runner.launch import remove_run
from lowlabel.stages.meta import classifier_probabilities, episode_pool, pseudo_label_pool

ALL_METHODS = ["protonet", "matchingnet", "relationnet", "maml", "reptile"]
ADAPTING = ("maml", "reptile")  # a ways-output head fixed at meta-training; they fine-tune at test time
FROZEN_HEADS = {"protonet": "frozen ProtoNet", "cosine": "frozen Baseline++"}
MORE_TO_TRAIN = 3  # exit code: --max-jobs reached with jobs left
# Published numbers (their data, their backbones and budgets: not comparable to ours).
LITERATURE = [
    ("Omniglot, ProtoNet (Snell et al. 2017)", "20w1s 96.0"),
    ("Omniglot, MAML (Finn et al. 2017)", "5w1s 98.7"),
    ("miniImageNet, ProtoNet (Snell et al. 2017)", "5w1s 49.4, 5w5s 68.2"),
    ("miniImageNet, MAML (Finn et al. 2017)", "5w1s 48.7, 5w5s 63.1"),
]


# --------------------------------------------------------------------------- params and data


def glyphs_params(args: argparse.Namespace) -> Params:
    """presets/glyphs_fulllabel.yaml over the defaults, scaled down by the arguments."""
    raw = merge(Params().model_dump(mode="json"), yaml.safe_load((PRESETS_DIR / "glyphs_fulllabel.yaml").read_text()))
    raw["data"]["glyphs"]["num_classes"] = args.classes
    raw["data"]["novel_classes"] = args.novel
    return finish_params(raw, args, "presets/glyphs_fulllabel.yaml + bench/meta_table.py")


def fashion_params(args: argparse.Namespace) -> Params:
    """params.yaml (Fashion-MNIST, 4 labels per base class), its meta section set for this bench."""
    raw = yaml.safe_load(Path(args.params).read_text())
    raw["data"]["max_train_per_class"] = args.max_train_per_class
    if args.meta_init:
        raw["meta"]["init"] = args.meta_init
    return finish_params(raw, args, f"{args.params} + bench/meta_table.py")


def glyphs_lowlabel_params(args: argparse.Namespace) -> Params:
    """presets/glyphs.yaml (2 labels per base class) over the defaults, scaled down by the
    arguments; its meta section as params.yaml's (the pipeline's semisup and meta stages)."""
    raw = merge(Params().model_dump(mode="json"), yaml.safe_load((PRESETS_DIR / "glyphs.yaml").read_text()))
    raw["data"]["glyphs"]["num_classes"] = args.classes
    raw["data"]["novel_classes"] = args.novel
    raw["meta"] = merge(raw["meta"], yaml.safe_load(Path(args.params).read_text())["meta"])
    if args.meta_init:
        raw["meta"]["init"] = args.meta_init
    return finish_params(raw, args, "presets/glyphs.yaml + bench/meta_table.py")


# pseudo mode's data: (its params, the tag in job and folder names, its name in the report)
LOW_LABEL_DATA: dict[str, tuple[Callable[[argparse.Namespace], Params], str, str]] = {
    "fashion": (fashion_params, "fmnist", "Fashion-MNIST"),
    "glyphs": (glyphs_lowlabel_params, "glyphs-low", "glyphs"),
}


def finish_params(raw: dict[str, Any], args: argparse.Namespace, source: str) -> Params:
    """The budget and runtime of this bench, then ``--set`` overrides; validated like params.yaml."""
    raw["runtime"] |= {"workers": args.workers}
    raw["meta"] |= {"methods": args.methods, "steps": args.steps, "eval_every": args.steps, "eval_episodes": 50,
                    "meta_batch": args.meta_batch, "ways": args.meta_ways, "shots": args.meta_shots, "queries": args.meta_queries}
    raw["semisup"] |= {"steps": args.semisup_steps, "eval_every": args.semisup_steps}
    raw["pretrain"] |= {"epochs": 1, "min_steps": args.simclr_steps, "eval_every": 1}
    raw["fewshot"] |= {"ways": [5, 20], "shots": [1, 5], "episodes": args.episodes, "heads": list(FROZEN_HEADS)}
    for item in args.set:
        set_param(raw, *item.split("=", 1))
    return parse_params(raw, source=source)


def with_section(params: Params, section: str, **values: Any) -> Params:
    raw = params.model_dump(mode="json")
    if section == "seed":
        raw["seed"] = values["value"]
    else:
        raw[section] = {**raw[section], **values}
    return parse_params(raw, source="bench/meta_table.py")


def prepare(params: Params, out: Path) -> PreparedData:
    """The prepare stage's split of ``params`` written to ``out`` (once), loaded."""
    if not (out / "split.json").is_file():
        cfg = params.data
        raw = load_source(cfg.source, cfg.root, image_size=cfg.image_size, channels=cfg.channels, download=cfg.download,
                          test_fraction=cfg.test_fraction, seed=params.seed, glyph_classes=cfg.glyphs.num_classes,
                          glyph_instances=cfg.glyphs.instances_per_class)
        split = make_split(raw.train_labels, raw.test_labels, cfg.novel_classes, cfg.labels_per_class, params.seed,
                           max_train_per_class=cfg.max_train_per_class, max_test_per_class=cfg.max_test_per_class, novel_pool=cfg.novel_pool)
        mean, std = channel_stats(raw.train_images[split.pretrain], seed=params.seed)
        info = {"source": cfg.source, "class_names": raw.class_names, "mean": mean, "std": std, "skipped": []}
        write_prepared(out, raw.train_images, raw.train_labels, raw.test_images, raw.test_labels, split, info)
    return PreparedData.load(out)


# --------------------------------------------------------------------------- training jobs


@dataclass
class Jobs:
    """Ray jobs, each run at most once: its final state is kept in ``root/<name>.pt``."""

    root: Path
    max_new: int | None
    slow_steps: int | None = None  # MAML/Reptile meta-training steps (None: meta.steps)
    started: int = 0
    wall: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, params: Params, loop: Callable[[dict[str, Any]], None], config: dict[str, Any], data_dir: Path, run_name: str) -> dict[str, Any] | None:
        """The state of job ``name`` (trained now if not kept), or None once ``max_new`` jobs ran."""
        path = self.root / f"{name}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.wall[name] = state["bench_wall_s"]
            return state
        if self.max_new is not None and self.started >= self.max_new:
            return None
        self.started += 1
        print(f"[meta_table] training {name} ...", flush=True)
        storage = self.root.parent / "ray"
        began = time.perf_counter()
        state = run_job(params, loop, {**common_config(params, data_dir), **config}, run_name, storage_path=str(storage))
        state["bench_wall_s"] = self.wall[name] = time.perf_counter() - began
        remove_run(str(storage), run_name)
        self.root.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        print(f"[meta_table] {name}: {state['bench_wall_s']:.0f} s", flush=True)
        return state

    def encoder_file(self, name: str, state: dict[str, Any], params: Params, data: PreparedData) -> str:
        """An encoder file of ``state`` (a job's start point), absolute: Ray workers read it."""
        path = self.root / f"{name}.encoder.pt"
        if not path.is_file():
            save_encoder(path, encoder_state(state), arch=params.encoder.arch, width=params.encoder.width, in_chans=data.in_chans, source=f"bench {name}")
        return str(path.resolve())


def encoder_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder of a pretrain / meta job's state, or of a semisup job's EMA classifier."""
    return state["encoder"] if "encoder" in state else Classifier.encoder_state(state["ema"])


def train_simclr(jobs: Jobs, params: Params, data: PreparedData, name: str = "simclr") -> dict[str, Any] | None:
    from lowlabel.train.pretrain import pretrain_loop

    config, run_name = pretrain_job(params, "simclr")
    return jobs.run(f"{name}-s{params.seed}", params, pretrain_loop, config, data.root, run_name)


def train_semisup(jobs: Jobs, params: Params, data: PreparedData, method: str, init: str | None, tag: str) -> dict[str, Any] | None:
    from lowlabel.train.semisup import semisup_loop

    config, run_name = semisup_job(params, method, init)
    return jobs.run(f"{method}-{tag}-s{params.seed}", params, semisup_loop, config, data.root, f"{run_name}-{tag}")


def train_meta(jobs: Jobs, params: Params, data: PreparedData, method: str, init: str | None, pool: tuple[np.ndarray, np.ndarray | None], tag: str) -> dict[str, Any] | None:
    from lowlabel.train.meta import meta_loop

    steps = jobs.slow_steps if adapts(method) and jobs.slow_steps else params.meta.steps
    params = with_section(params, "meta", steps=steps, eval_every=steps)
    config, run_name = meta_job(params, method, init, pool[0], pool[1])
    return jobs.run(f"meta-{method}-{tag}-s{params.seed}", params, meta_loop, config, data.root, run_name)


def pseudo_pool(params: Params, data: PreparedData, fixmatch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The meta stage's pseudo-label pool, from this bench's FixMatch EMA classifier (the stage
    reads it from models/semisup/<pseudo_model>; the pooling is the stage's own function)."""
    unlabeled = np.asarray(data.split.unlabeled, dtype=np.int64)
    probabilities = classifier_probabilities(fixmatch["ema"], params.encoder.arch, params.encoder.width, data, unlabeled)
    cfg = params.meta
    indices, labels, stats = pseudo_label_pool(probabilities, unlabeled, cfg.pseudo_threshold, cfg.shots + cfg.queries, cfg.pseudo_per_class)
    if len(np.unique(labels)) < cfg.ways:
        raise SystemExit(f"pseudo pool: only {len(np.unique(labels))} classes have {cfg.shots + cfg.queries} images at "
                         f"meta.pseudo_threshold={cfg.pseudo_threshold} ({stats}); lower it with --set meta.pseudo_threshold=...")
    truth = data.base_label(data.train_labels[indices])
    stats["pseudo_label_acc"] = float((truth == labels).mean()) if len(labels) else float("nan")  # reported only, never used
    return indices, labels, stats


# --------------------------------------------------------------------------- evaluation


@dataclass
class Cell:
    acc: float
    ci95: float

    def text(self) -> str:
        return f"{100 * self.acc:.1f} ± {100 * self.ci95:.1f}"


@dataclass
class Evaluator:
    """The novel pool, its seeded episodes per setting (shared by every row) and its images."""

    params: Params
    data: PreparedData
    protocol: FewShotProtocol = field(init=False)
    labels: np.ndarray = field(init=False)
    plans: dict[tuple[int, int], list[Episode]] = field(init=False)
    images: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.protocol = FewShotProtocol.from_params(self.params)
        self.labels = self.data.novel_pool_labels()
        self.plans = plan_episodes(self.protocol, self.labels)
        view = eval_view(self.data.mean, self.data.std)
        rows = [(self.data.test_images, i) for i in self.data.split.test_novel] + [(self.data.train_images, i) for i in self.data.split.train_novel]
        self.images = torch.stack([view(np.asarray(images[i]), 0) for images, i in rows])  # novel_pool_labels order

    def settings(self) -> list[str]:
        return [setting_name(w, k) for w, k in self.plans]

    def frozen(self, encoder: torch.nn.Module) -> dict[str, dict[str, Cell]]:
        """Frozen-encoder heads: {head: {setting: cell}} (the fewshot stage's code path)."""
        pool = embed_novel_pool(self.protocol, encoder.eval(), self.data)
        out: dict[str, dict[str, Cell]] = {}
        for head in FROZEN_HEADS:
            for (w, k), episodes in self.plans.items():
                result = evaluate_head(self.protocol, pool, self.labels, episodes, head)
                out.setdefault(head, {})[setting_name(w, k)] = Cell(result.accuracy, result.ci95)
        return out

    def own(self, method: MetaMethod, trained_ways: int, adapting: bool, adapt_episodes: int) -> dict[str, Cell]:
        """The method's own test-time procedure on the same episodes. Metric methods score in
        eval mode (running statistics), where an image's features do not depend on its batch:
        their head runs on the pool embedded once by their encoder (the same numbers as
        ``scores(episode)``, much faster). Adapting methods (MAML, Reptile) run ``scores`` on the
        first ``adapt_episodes`` episodes in train mode, as the meta loop's validation does,
        and only at the ways their head was trained with."""
        out: dict[str, Cell] = {}
        features = None if adapting else self.embed(method)
        for (w, k), episodes in self.plans.items():
            if adapting and w != trained_ways:
                continue
            if adapting:
                method.train()
                accs = [episode_accuracy(method.scores(load_episode(e, self.images)), e) for e in episodes[:adapt_episodes]]
            else:
                with torch.no_grad():
                    accs = [episode_accuracy(metric_scores(method, features, e), e) for e in episodes]
            out[setting_name(w, k)] = Cell(float(np.mean(accs)), confidence_interval95(np.asarray(accs)))
        return out

    @torch.no_grad()
    def embed(self, method: MetaMethod) -> torch.Tensor:
        """The novel pool through the metric learner's encoder, eval mode, unnormalised."""
        method.eval()
        encoder = method.learner.encoder  # type: ignore[attr-defined]
        return torch.cat([encoder(batch) for batch in self.images.split(512)])


def metric_scores(method: MetaMethod, features: torch.Tensor, episode: Episode) -> torch.Tensor:
    """A metric learner's episode head on cached features (== ``method.scores`` in eval mode)."""
    support_y = torch.as_tensor(episode.support_labels())
    return method.learner.episode_logits(features[episode.support], support_y, features[episode.query], episode.n_way)  # type: ignore[attr-defined]


def episode_accuracy(scores: torch.Tensor, episode: Episode) -> float:
    truth = torch.as_tensor(episode.query_labels())
    return float((scores.argmax(1) == truth).float().mean())


def adapts(method: str) -> bool:
    """Whether a method fine-tunes a ``ways``-output head at test time (the class attribute
    ``MetaMethod.adapts`` where the installed code has it)."""
    return bool(getattr(META_METHODS[method], "adapts", method in ADAPTING))


def rebuild_meta(params: Params, data: PreparedData, method: str, state: dict[str, Any]) -> MetaMethod:
    encoder = build_encoder(params.encoder.arch, data.in_chans, params.encoder.width)
    section = getattr(params.meta, method, None)
    model = META_METHODS[method](encoder, feature_dim(encoder, data.in_chans, data.image_size), params.meta.ways, **(section.model_dump() if section else {}))
    model.load_state_dict(state["model"])
    return model


def encoder_of(params: Params, data: PreparedData, state: dict[str, Any] | None) -> torch.nn.Module:
    if state is None:
        return random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed)
    encoder = build_encoder(params.encoder.arch, data.in_chans, params.encoder.width)
    encoder.load_state_dict(encoder_state(state))
    return encoder


def meta_speed(state: dict[str, Any], wall: float) -> dict[str, float]:
    """Training-loop episodes/s (mean over periods), the whole Ray job's wall seconds and the
    meta loop's last validation accuracy (its own procedure on base-class test episodes, %)."""
    rates = [h["episodes_per_s"] for h in state["history"] if "episodes_per_s" in h]
    last = state["history"][-1]
    return {"wall_s": wall, "episodes_per_s": float(np.mean(rates)), "steps": last["step"], "base_val_acc_%": 100 * last.get("val_acc", float("nan"))}


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    settings: list[str]
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> wall/episodes per s

    def add(self, name: str, cells: dict[str, Cell], **extra: Any) -> None:
        self.rows[name] = cells
        if extra:
            self.extra[name] = extra

    def markdown(self, extra_columns: tuple[str, ...] = ()) -> str:
        head = ["row", *self.settings, *extra_columns]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, cells in self.rows.items():
            shown = [cells[s].text() if s in cells else "n/a" for s in self.settings]
            shown += [fmt(self.extra.get(name, {}).get(c)) for c in extra_columns]
            lines.append("| " + " | ".join([name, *shown]) + " |")
        return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- modes


def glyphs_mode(args: argparse.Namespace, jobs: Jobs) -> str | None:
    params = glyphs_params(args)
    data = prepare(params, args.out / "prepared-glyphs")
    print(f"glyphs: {len(data.split.base_classes)} base classes x {len(data.split.labeled) // len(data.split.base_classes)} labeled, "
          f"{len(data.split.novel_classes)} novel classes, {len(data.novel_pool_labels())} novel pool images", flush=True)
    pool = episode_pool(params, data)
    states: dict[str, dict[str, Any] | None] = {}
    # semisup_loop fails on a split without unlabeled images (np.asarray([]) is float64: an
    # IndexError at train/semisup.py's `data.train_labels[unlabeled]`), so the supervised
    # encoder trains on a split with one base training image per class left unlabeled.
    sup_params = with_section(params, "data", labels_per_class=params.data.labels_per_class - 1)
    states["supervised"] = train_semisup(jobs, sup_params, prepare(sup_params, args.out / "prepared-glyphs-sup"), "supervised", None, "glyphs")
    states["simclr"] = train_simclr(jobs, params, data)
    for method in args.methods:
        states[method] = train_meta(jobs, params, data, method, None, pool[:2], "glyphs")
    if any(s is None for s in states.values()) or args.train_only:
        return None

    evaluator = Evaluator(params, data)
    table = Table(evaluator.settings())
    for method in args.methods:
        state = states[method]
        assert state is not None
        name = f"meta-{method}-glyphs-s{params.seed}"
        speed = meta_speed(state, jobs.wall[name])
        own = evaluator.own(rebuild_meta(params, data, method, state), params.meta.ways, adapts(method), args.adapt_episodes)
        table.add(f"{method}: own procedure", own, **speed)
        for head, cells in evaluator.frozen(encoder_of(params, data, state)).items():
            table.add(f"{method} encoder: {FROZEN_HEADS[head]}", cells)
        print(f"  evaluated {method}", flush=True)
    for name, state in (("supervised", states["supervised"]), ("SimCLR", states["simclr"]), ("random init", None)):
        for head, cells in evaluator.frozen(encoder_of(params, data, state)).items():
            table.add(f"{name} encoder: {FROZEN_HEADS[head]}", cells)
    table.extra["supervised encoder: frozen ProtoNet"] = {"wall_s": jobs.wall[f"supervised-glyphs-s{params.seed}"]}
    table.extra["SimCLR encoder: frozen ProtoNet"] = {"wall_s": jobs.wall[f"simclr-s{params.seed}"]}
    heading = (f"### glyphs, every base image labeled: {len(data.split.base_classes)} base / {len(data.split.novel_classes)} novel classes, "
               f"novel-class accuracy ± 95% CI (%), {args.episodes} episodes per cell, 15 queries per way\n\n"
               f"Meta-training: {params.meta.ways}-way {params.meta.shots}-shot {params.meta.queries}-query episodes, meta_batch "
               f"{params.meta.meta_batch}, {params.meta.steps} steps ({args.slow_steps or params.meta.steps} for MAML/Reptile), "
               f"from random init, {params.runtime.workers} Ray worker(s); supervised (from random init): {params.semisup.steps} steps x batch "
               f"{params.semisup.batch_size} on {params.data.labels_per_class - 1} of the {params.data.labels_per_class} images per base class "
               f"(semisup_loop cannot run without an unlabeled image); SimCLR: {params.pretrain.min_steps} steps x batch {params.pretrain.batch_size}. "
               f"wall_s = the whole Ray job incl. start-up; episodes_per_s = the training loop's. MAML/Reptile own "
               f"procedure only at the {params.meta.ways} ways of their head (n/a elsewhere), on the first {args.adapt_episodes} episodes.\n")
    literature = "\n".join(f"| {name} | {numbers} |" for name, numbers in LITERATURE)
    return (heading + "\n" + table.markdown(("wall_s", "episodes_per_s", "steps", "base_val_acc_%")) + "\n\n"
            "Literature (their data, backbones and budgets; NOT our data — for orientation only):\n\n"
            "| published | accuracy (%) |\n|---|---|\n" + literature + "\n")


def lowlabel_mode(args: argparse.Namespace, jobs: Jobs) -> str | None:
    make_params, tag, _ = LOW_LABEL_DATA[args.data]
    base = make_params(args)
    simclr_params = with_section(base, "seed", value=args.seeds[0])
    # Fashion-MNIST's SimCLR job keeps the name it had before --data (its kept jobs stay valid).
    simclr_name = "simclr" if args.data == "fashion" else f"simclr-{tag}"
    simclr = train_simclr(jobs, simclr_params, prepare(simclr_params, args.out / f"prepared-{tag}-s{args.seeds[0]}"), simclr_name)
    if simclr is None:
        return None
    trained: dict[int, tuple[Params, PreparedData, dict[tuple[str, str], dict[str, Any]], dict[str, dict[str, Any]]]] = {}
    pool_stats: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        params = with_section(base, "seed", value=seed)
        data = prepare(params, args.out / f"prepared-{tag}-s{seed}")
        simclr_file = jobs.encoder_file(f"{simclr_name}-s{args.seeds[0]}", simclr, params, data)
        fix = train_semisup(jobs, params, data, "fixmatch", simclr_file, tag)
        sup = train_semisup(jobs, params, data, "supervised", simclr_file, tag)
        if fix is None or sup is None:
            return None
        init_file = {"fixmatch": jobs.encoder_file(f"fixmatch-{tag}-s{seed}", fix, params, data), "simclr": simclr_file,
                     "random": None}.get(params.meta.init)
        if params.meta.init not in ("fixmatch", "simclr", "random"):
            raise SystemExit(f"--meta-init {params.meta.init}: this bench trains fixmatch / simclr / random starts only")
        metas: dict[tuple[str, str], dict[str, Any]] = {}
        for source in args.episodes_from:
            p = with_section(params, "meta", episodes_from=source)
            if source == "pseudo":
                indices, labels, stats = pseudo_pool(p, data, fix)
                pool_stats[seed] = stats
                pool: tuple[np.ndarray, np.ndarray | None] = (indices, labels)
            else:
                pool = episode_pool(p, data)[:2]
            for method in args.methods:
                state = train_meta(jobs, p, data, method, init_file, pool, f"{tag}-{source}")
                if state is None:
                    return None
                metas[source, method] = state
        trained[seed] = (params, data, metas, {"fixmatch": fix, "supervised": sup, "simclr": simclr})
    if args.train_only:
        return None
    per_seed = {seed: lowlabel_seed_table(args, *parts, jobs) for seed, parts in trained.items()}
    return lowlabel_report(args, base, per_seed, pool_stats)


def lowlabel_seed_table(args: argparse.Namespace, params: Params, data: PreparedData, metas: dict[tuple[str, str], dict[str, Any]],
                        encoders: dict[str, dict[str, Any]], jobs: Jobs) -> Table:
    tag = LOW_LABEL_DATA[args.data][1]
    evaluator = Evaluator(params, data)
    table = Table(evaluator.settings())
    for (source, method), state in metas.items():
        speed = meta_speed(state, jobs.wall[f"meta-{method}-{tag}-{source}-s{params.seed}"])
        table.add(f"meta {method} on {source}: own procedure", evaluator.own(rebuild_meta(params, data, method, state), params.meta.ways, adapts(method), args.adapt_episodes), **speed)
        table.add(f"meta {method} on {source}: frozen ProtoNet", evaluator.frozen(encoder_of(params, data, state))["protonet"])
    for name, state in (*encoders.items(), ("random", None)):
        for head, cells in evaluator.frozen(encoder_of(params, data, state)).items():
            table.add(f"{name} encoder: {FROZEN_HEADS[head]}", cells)
    print(f"  evaluated seed {params.seed}", flush=True)
    return table


def lowlabel_report(args: argparse.Namespace, params: Params, per_seed: dict[int, Table], pool_stats: dict[int, dict[str, float]]) -> str:
    first = next(iter(per_seed.values()))
    settings, rows = first.settings, list(first.rows)
    head = ["row", *[f"{s} seed {seed}" for s in settings for seed in per_seed], *[f"{s} mean" for s in settings]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [per_seed[seed].rows[row][s].text() for s in settings for seed in per_seed]
        means = [f"{100 * np.mean([per_seed[seed].rows[row][s].acc for seed in per_seed]):.1f}" for s in settings]
        lines.append("| " + " | ".join([row, *cells, *means]) + " |")
    speed = ["| meta run | seed | wall_s | episodes_per_s | base_val_acc_% |", "|---|---|---|---|---|"]
    for seed, table in per_seed.items():
        speed += [f"| {row} | {seed} | {fmt(x['wall_s'])} | {fmt(x['episodes_per_s'])} | {fmt(x['base_val_acc_%'])} |" for row, x in table.extra.items()]
    pools = "\n".join(f"- seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()) for seed, stats in pool_stats.items())
    cfg = params.meta
    cap = f" (base training images capped at {params.data.max_train_per_class} per class)" if params.data.max_train_per_class else ""
    return (f"### {LOW_LABEL_DATA[args.data][2]}, {params.data.labels_per_class} labels per base class{cap}: "
            f"meta-training episode source, novel-class accuracy ± 95% CI (%), "
            f"{args.episodes} episodes per cell, seeds {args.seeds}\n\n"
            f"Meta: {', '.join(args.methods)} from {cfg.init}, {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query, meta_batch "
            f"{cfg.meta_batch}, {cfg.steps} steps; FixMatch and supervised from SimCLR ({params.pretrain.min_steps} steps), "
            f"{params.semisup.steps} steps each.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(speed)
            + ("\n\nPseudo-label pools (pseudo_label_acc uses the true labels, for this report only):\n" + pools if pools else "") + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="jobs, data and tables (outside the repo)")
    parser.add_argument("--episodes-from", type=lambda s: s.split(","), default=None, help="pseudo mode: labels,pseudo,unsupervised")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None, help="meta methods (glyphs: all five; pseudo mode: protonet)")
    parser.add_argument("--classes", type=int, default=150, help="glyphs: characters rendered")
    parser.add_argument("--novel", type=int, default=50, help="glyphs: novel classes among them (>= 20 for 20-way)")
    parser.add_argument("--steps", type=int, default=300, help="meta-training steps")
    parser.add_argument("--slow-steps", type=int, default=None, help="MAML/Reptile steps (default: --steps)")
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--meta-ways", type=int, default=5)
    parser.add_argument("--meta-shots", type=int, default=1)
    parser.add_argument("--meta-queries", type=int, default=None, help="default: 4 (glyphs: 5 test images per base class), 3 (pseudo mode: 4 labels)")
    parser.add_argument("--meta-init", default=None, help="pseudo mode: fixmatch | simclr | random (default: params.yaml's meta.init)")
    parser.add_argument("--semisup-steps", type=int, default=300)
    parser.add_argument("--simclr-steps", type=int, default=150)
    parser.add_argument("--episodes", type=int, default=200, help="test episodes per setting")
    parser.add_argument("--adapt-episodes", type=int, default=100, help="test episodes per setting for MAML/Reptile's own procedure (slow)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--max-train-per-class", type=int, default=2000, help="pseudo mode, Fashion-MNIST: base training images per class")
    parser.add_argument("--data", choices=sorted(LOW_LABEL_DATA), default="fashion", help="pseudo mode: params.yaml's Fashion-MNIST "
                        "or presets/glyphs.yaml's low-label glyphs (scaled by --classes / --novel)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per job")
    parser.add_argument("--max-jobs", type=int, default=None, help="train at most N new jobs, then exit 3 if more are left")
    parser.add_argument("--train-only", action="store_true", help="train what is missing, skip the evaluation (which starts no Ray)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.methods = args.methods or (["protonet"] if args.episodes_from else ALL_METHODS)
    args.meta_queries = args.meta_queries or (3 if args.episodes_from else 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    mode = ("pseudo" if args.data == "fashion" else f"pseudo_{args.data}") if args.episodes_from else "glyphs"
    jobs = Jobs(args.out / "jobs", args.max_jobs, args.slow_steps)
    report = lowlabel_mode(args, jobs) if args.episodes_from else glyphs_mode(args, jobs)
    if report is None:
        left = jobs.max_new is not None and jobs.started >= jobs.max_new
        print(f"[meta_table] {jobs.started} job(s) trained" + ("; more may be left: run again" if left else "; all trained"), flush=True)
        return MORE_TO_TRAIN if left else 0
    print("\n" + report)
    (args.out / f"meta_table_{mode}.md").write_text(report)
    (args.out / f"meta_table_{mode}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": jobs.wall}, indent=1))
    print(f"wrote {args.out / f'meta_table_{mode}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
