"""End-to-end pipeline benchmark: wall time per stage, peak memory, no-op repro time.

    .venv/bin/python bench/pipeline_e2e.py [--workdir DIR] [--preset NAME] [--set key=value ...] [--ray-per-stage]

Clones this checkout into a scratch directory (so your own outputs stay untouched), runs
`dvc repro` there as ./pipeline repro does (under one local Ray for every stage,
lowlabel.runner.session; --ray-per-stage: plain `dvc repro`, each stage starting its own) with
the repo's params.yaml (plus any --set overrides), samples the summed
PSS of the whole process tree (dvc, stage processes, Ray's daemons and workers) every second,
then runs `dvc repro` again with nothing changed. Prints a table; writes bench_e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.presets import set_param


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of the whole tree: shared pages (torch's libraries, mapped by every
    process) are split between their users instead of counted once per process as RSS would."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_repro(workdir: Path, env: dict, session: bool) -> tuple[float, int, list[tuple[str, float]], int]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "lowlabel.runner.session", "dvc", "repro"] if session else ["dvc", "repro"]
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss(root))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks: list[tuple[str, float]] = []
    log = open(workdir / "bench_repro.log", "a")  # noqa: SIM115 - closed after the process ends
    for line in proc.stdout:
        # Each line stamped with the seconds since the repro began: where a stage's time goes
        # (Ray start-up, the first worker line, training, writing outputs) reads off the log.
        log.write(f"[{time.perf_counter() - started:7.1f}s] {line}")
        log.flush()
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            marks.append((found.group(1), time.perf_counter() - started))
    proc.wait()
    done.set()
    sampler.join()
    return time.perf_counter() - started, peak, marks, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--preset", default=None, help="start from presets/NAME.yaml instead of the repo's params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param, e.g. pretrain.epochs=2")
    parser.add_argument("--ray-per-stage", action="store_true", help="plain `dvc repro`: every training stage starts and stops its own local Ray")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lowlabel-bench-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(workdir)], check=True)
    if args.preset:
        sys.path.insert(0, str(workdir / "src"))
        from lowlabel.presets import build

        params = build(args.preset).model_dump(mode="json")
    else:
        params = yaml.safe_load((workdir / "params.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        set_param(params, key, value)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(workdir / "src"),
        "PYTHONUNBUFFERED": "1",  # stage lines arrive as they happen, so the per-stage times are right
    }

    total, peak, marks, rc = run_repro(workdir, env, session=not args.ray_per_stage)
    if rc != 0:
        print(f"dvc repro failed (rc {rc}); see {workdir / 'bench_repro.log'}")
        return rc
    noop, _noop_peak, noop_marks, rc2 = run_repro(workdir, env, session=not args.ray_per_stage)

    rows = []
    for i, (stage, at) in enumerate(marks):
        end = marks[i + 1][1] if i + 1 < len(marks) else total
        rows.append((stage, end - at))
    report = json.loads((workdir / "metrics" / "report.json").read_text())
    print(f"\n{'stage':<22}{'wall s':>8}")
    for stage, seconds in rows:
        print(f"{stage:<22}{seconds:>8.1f}")
    print(f"{'total dvc repro':<22}{total:>8.1f}")
    print(f"{'no-op dvc repro':<22}{noop:>8.1f}   (stages re-run: {len(noop_marks)})")
    print(f"{'peak PSS, process tree':<22}{peak / 2**30:>8.2f} GiB")
    print("\nmargins (accuracy points):")
    for name, value in report["margins"].items():
        print(f"  {name:<45}{value:+6.1f}")
    out = {"ray": "per stage" if args.ray_per_stage else "one for the repro", "stages": dict(rows), "total_s": total, "noop_s": noop, "noop_reran": [m[0] for m in noop_marks], "peak_pss_gib": peak / 2**30, "margins": report["margins"]}
    (workdir / "bench_e2e.json").write_text(json.dumps(out, indent=2))
    print(f"\nworkdir: {workdir}")
    return rc2


if __name__ == "__main__":
    sys.exit(main())
