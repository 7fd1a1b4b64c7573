"""Few-shot table: every encoder of pipeline work directories x every head x every setting.

    .venv/bin/python bench/fewshot_table.py WORKDIR [WORKDIR ...] [--finetune] [--episodes 600] [--out PATH]

A work directory is one where `dvc repro` ran (`bench/pipeline_e2e.py --workdir DIR` leaves one):
its params.yaml, data/prepared/ and models/**/encoder.pt. Every encoder found there, plus the
random init the training stages started from, is evaluated the way the fewshot stage does it
(the same code: pool embedded once per encoder, the same seeded episodes for every encoder) with
every head — protonet, linear (Baseline), cosine (Baseline++), knn, matchingnet, and with --finetune the
slow head that fine-tunes the last encoder block — in 5-way and 20-way (when the dataset has
>= 20 novel classes), 1- and 5-shot, 600 episodes each. Prints one table per dataset (rows:
encoders; columns: head x setting; cells: accuracy ± 95% CI in percent), the feature
normalisation used and the episodes' wall time per head; writes PATH.json and PATH.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.config import FEWSHOT_HEADS, Params, load_params, parse_params
from lowlabel.data.prepared import PreparedData
from lowlabel.fewshot.protocol import (
    FINETUNE,
    RANDOM,
    FewShotProtocol,
    embed_novel_pool,
    evaluate_head,
    plan_episodes,
    random_encoder,
    setting_name,
)
from lowlabel.models.store import ENCODER_FILE, load_encoder
from lowlabel.stages.common import MODELS_DIR, PREPARED_DIR

CACHED_HEADS = [h for h in FEWSHOT_HEADS if h != FINETUNE]  # the heads that run on cached embeddings
PROTOCOL_EPISODES = 600


@dataclass
class DatasetTable:
    """One dataset's rows (encoders) x columns (head/setting), plus how they were obtained."""

    name: str
    heads: list[str]
    settings: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # encoder -> column -> acc/ci95 (%)
    episode_seconds: dict[str, float] = field(default_factory=dict)  # head -> wall s of its episodes
    episodes_run: dict[str, int] = field(default_factory=dict)
    workdirs: dict[str, dict] = field(default_factory=dict)  # workdir -> the protocol used there

    def columns(self) -> list[str]:
        return [f"{head}/{setting}" for head in self.heads for setting in self.settings]

    def markdown(self) -> str:
        columns = self.columns()
        lines = [
            "| encoder | " + " | ".join(c.replace("/", " ") for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for encoder, cells in self.rows.items():
            shown = [f"{cells[c]['acc']:.1f} ± {cells[c]['ci95']:.1f}" if c in cells else "–" for c in columns]
            lines.append(f"| {encoder} | " + " | ".join(shown) + " |")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {
            "dataset": self.name,
            "workdirs": self.workdirs,
            "columns": self.columns(),
            "rows": self.rows,
            "episode_seconds": self.episode_seconds,
            "episodes_run": self.episodes_run,
        }


def bench_params(workdir: Path, args: argparse.Namespace) -> Params:
    """The work directory's params, with the few-shot protocol of this benchmark (validated like params.yaml)."""
    params = load_params(workdir / "params.yaml")
    raw = params.model_dump(mode="json")
    fewshot = raw["fewshot"] | {"heads": heads_of(args), "ways": args.ways, "shots": args.shots, "episodes": args.episodes}
    if args.queries is not None:
        fewshot["queries"] = args.queries
    if args.feature_norm is not None:
        fewshot["feature_norm"] = args.feature_norm
    return parse_params(raw | {"fewshot": fewshot}, source=f"{workdir / 'params.yaml'} + bench overrides")


def heads_of(args: argparse.Namespace) -> list[str]:
    return list(args.heads) + ([FINETUNE] if args.finetune else [])


def find_encoders(workdir: Path, params: Params) -> dict[str, Path | None]:
    """Random init, then every models/**/encoder.pt: the pipeline's methods in params order first."""
    models = workdir / MODELS_DIR
    found = {path.parent.relative_to(models).as_posix(): path for path in sorted(models.glob(f"**/{ENCODER_FILE}"))}
    known = [f"pretrain/{m}" for m in params.pretrain.methods] + [f"semisup/{m}" for m in params.semisup.methods]
    names = [n for n in known if n in found] + [n for n in found if n not in known]
    return {RANDOM: None, **{name: found[name] for name in names}}


def dataset_name(params: Params) -> str:
    source = params.data.source
    return f"{source}:{Path(params.data.root).name}" if source == "imagefolder" and params.data.root else source


def evaluate_workdir(workdir: Path, args: argparse.Namespace, tables: dict[str, DatasetTable]) -> None:
    params = bench_params(workdir, args)
    data = PreparedData.load(workdir / PREPARED_DIR)
    labels = data.novel_pool_labels()
    name = dataset_name(params)
    table = tables.setdefault(name, DatasetTable(name, heads=heads_of(args)))
    protocol = FewShotProtocol.from_params(params)
    plans = plan_episodes(protocol, labels)  # prints the ways it skips
    table.settings += [s for s in (setting_name(w, k) for w, k in plans) if s not in table.settings]
    table.workdirs[str(workdir)] = {
        "feature_norm": params.fewshot.feature_norm,
        "episodes": params.fewshot.episodes,
        "queries": params.fewshot.queries,
        "seed": params.seed,
        "novel_classes": len(set(labels.tolist())),
        "pool_images": len(labels),
        "encoder_arch": params.encoder.arch,
        "finetune": params.fewshot.finetune.model_dump() if FINETUNE in params.fewshot.heads else None,
    }
    print(
        f"\n== {workdir} ({name}: {table.workdirs[str(workdir)]['novel_classes']} novel classes, "
        f"{len(labels)} pool images, {params.encoder.arch})",
        flush=True,
    )
    origin = "--feature-norm" if args.feature_norm else "fewshot.feature_norm of params.yaml"
    tuned = "l2 of" if params.fewshot.feature_norm in ("l2", "center_l2") else "raw"
    print(f"feature normalisation: {params.fewshot.feature_norm} ({origin})"
          + (f"; finetune: {tuned} the tuned block's output" if args.finetune else ""))
    for encoder_name, path in find_encoders(workdir, params).items():
        if path is None:
            encoder = random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed)
        else:
            encoder = load_encoder(path)[0]
        started = time.perf_counter()
        pool = embed_novel_pool(protocol, encoder, data)
        embed_s = time.perf_counter() - started
        row = f"{workdir.name}/{encoder_name}" if len(args.workdirs) > 1 else encoder_name
        cells = table.rows.setdefault(row, {})
        for (n_way, k_shot), episodes in plans.items():
            for head in params.fewshot.heads:
                started = time.perf_counter()
                result = evaluate_head(protocol, pool, labels, episodes, head)
                table.episode_seconds[head] = table.episode_seconds.get(head, 0.0) + time.perf_counter() - started
                table.episodes_run[head] = table.episodes_run.get(head, 0) + len(episodes)
                cells[f"{head}/{setting_name(n_way, k_shot)}"] = {"acc": 100 * result.accuracy, "ci95": 100 * result.ci95}
        print(f"  {encoder_name}: pool embedded in {embed_s:.1f} s, {len(plans) * len(params.fewshot.heads)} head x setting runs done", flush=True)


def write_outputs(tables: dict[str, DatasetTable], out: Path, args: argparse.Namespace) -> None:
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": {"heads": heads_of(args), "ways": args.ways, "shots": args.shots, "episodes": args.episodes}, "datasets": [t.as_json() for t in tables.values()]}
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=1))
    md = [f"## {t.name}\n\n{t.markdown()}\n" for t in tables.values()]
    Path(f"{stem}.md").write_text("\n".join(md))
    print(f"\nwrote {stem}.json and {stem}.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="pipeline work directories (params.yaml, data/prepared, models/)")
    parser.add_argument("--heads", nargs="+", default=CACHED_HEADS, choices=CACHED_HEADS, help="heads on cached embeddings (default: all)")
    parser.add_argument("--finetune", action="store_true", help="also the head that fine-tunes the last encoder block per episode (slow on CPU)")
    parser.add_argument("--ways", nargs="+", type=int, default=[5, 20], help="ways larger than the novel class count are skipped")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--episodes", type=int, default=PROTOCOL_EPISODES)
    parser.add_argument("--queries", type=int, default=None, help="queries per way (default: fewshot.queries of each workdir)")
    parser.add_argument("--feature-norm", choices=["none", "l2", "center", "center_l2"], default=None, help="default: fewshot.feature_norm of each workdir")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md (default: <first workdir>/fewshot_table)")
    args = parser.parse_args()
    for workdir in args.workdirs:
        if not (workdir / "params.yaml").is_file() or not (workdir / PREPARED_DIR).is_dir():
            parser.error(f"{workdir}: not a pipeline work directory (needs params.yaml and {PREPARED_DIR}/; run dvc repro there)")
    if args.episodes < PROTOCOL_EPISODES:
        print(f"note: {args.episodes} episodes per setting, fewer than the protocol's {PROTOCOL_EPISODES}: wider CIs", flush=True)
    print(f"torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else f'cpu, {torch.get_num_threads()} threads'}", flush=True)

    tables: dict[str, DatasetTable] = {}
    for workdir in args.workdirs:
        evaluate_workdir(workdir, args, tables)

    for table in tables.values():
        norms = sorted({w["feature_norm"] for w in table.workdirs.values()})
        episodes = sorted({w["episodes"] for w in table.workdirs.values()})
        queries = sorted({w["queries"] for w in table.workdirs.values()})
        print(f"\n### {table.name}: accuracy ± 95% CI (%), {'/'.join(map(str, episodes))} episodes per cell, "
              f"{'/'.join(map(str, queries))} queries per way, feature normalisation {'/'.join(norms)}\n")
        print(table.markdown())
        print("\nepisode wall time per head (all encoders and settings, features cached):")
        for head in table.heads:
            seconds, runs = table.episode_seconds.get(head, 0.0), table.episodes_run.get(head, 0)
            print(f"  {head:<11} {seconds:8.2f} s for {runs:6d} episodes = {1000 * seconds / max(runs, 1):7.2f} s per 1000")
    write_outputs(tables, args.out or args.workdirs[0] / "fewshot_table", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
