"""Prepare's throughput and peak memory on a growing image folder: memory must stay flat.

Writes a synthetic ImageFolder once to --root and reuses it: 10 classes of mixed-size JPEGs,
64-512 px a side, one in ten gray, smooth colour fields (--unique distinct images per class,
written round-robin as separate files). Each dataset size is a folder of symlinks to the first
N/10 files of every class. Each size runs the real prepare
stage code (lowlabel.stages.prepare._prepare: decode, split, channel stats, atomic write; no
MLflow run) in a fresh subprocess, while this process polls the memory of that subprocess and
its decode workers.

    nice -n 10 python bench/prepare_stream.py                       # 10k, 50k and 200k images
    nice -n 10 python bench/prepare_stream.py --sizes 10000 50000 --image-size 32

Reported per size: images/s (images over the wall time of _prepare, imports excluded), peak RSS
summed over the process tree (an upper bound: forked workers share pages with the parent, each
counted again), peak PSS summed (shared pages split between sharers: the memory really used), and
the largest single-process ru_maxrss (getrusage of the children). Generation is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CLASSES = 10
GIB = 1 << 30
QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
}


# --------------------------------------------------------------------------- synthetic folder


def _write_images(job: tuple[str, int, int, int, int]) -> int:
    """Files ``first..last-1`` of one class. ``unique`` distinct JPEGs per class (smooth random
    colour fields, 64-512 px a side, one in ten gray) are encoded and written round-robin as
    separate files: prepare decodes every file, and writing copies is ~50x faster than encoding."""
    import io

    import numpy as np
    from PIL import Image

    folder, label, first, last, unique = job
    blobs = []
    for k in range(min(unique, last)):
        rng = np.random.default_rng([label, k])
        w, h = (int(v) for v in rng.integers(64, 513, 2))
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        small[..., label % 3] //= 2  # a faint per-class tint
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        if k % 10 == 9:
            img = img.convert("L")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        blobs.append(buf.getvalue())
    for i in range(first, last):
        (Path(folder) / f"{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    return last - first


def ensure_folder(root: Path, per_class: int, workers: int, unique: int) -> None:
    """Write class_k/000000.jpg ... up to ``per_class`` per class; images already there are kept."""
    marker = root / ".complete.json"
    have = json.loads(marker.read_text())["per_class"] if marker.is_file() else 0
    if have >= per_class:
        return
    start = time.monotonic()
    jobs = []
    for label in range(CLASSES):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder), label, have, per_class, unique))
    done = 0
    total = CLASSES * (per_class - have)
    with ProcessPoolExecutor(workers) as pool:
        for n in pool.map(_write_images, jobs):
            done += n
            print(f"[bench] generating JPEGs: {done}/{total}", flush=True)
    print(f"[bench] wrote {total} JPEGs to {root} in {time.monotonic() - start:.0f} s", flush=True)
    marker.write_text(json.dumps({"per_class": per_class}))


def make_view(root: Path, views: Path, n: int) -> Path:
    """A folder of symlinks: the first n / 10 images of every class."""
    view = views / f"n{n}"
    per_class = n // CLASSES
    for label in range(CLASSES):
        folder = view / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{i:06d}.jpg").symlink_to(root / f"class_{label:02d}" / f"{i:06d}.jpg")
    return view


# --------------------------------------------------------------------------- one measured run


def child(view: str, workdir: str, image_size: int, workers: str, chunk: int, result: str) -> None:
    """Runs in the measured subprocess: the prepare stage's own function on ``view``."""
    from lowlabel.config import parse_params
    from lowlabel.stages import prepare

    params = parse_params(
        {
            "seed": 0,
            "data": {
                "source": "imagefolder",
                "root": view,
                "image_size": image_size,
                "channels": 3,
                "decode_workers": int(workers) if workers != "auto" else "auto",
                "decode_chunk": chunk,
            },
        }
    )
    os.chdir(workdir)
    start = time.monotonic()
    summary = prepare._prepare(params)
    seconds = time.monotonic() - start
    Path(result).write_text(json.dumps({"seconds": seconds, "summary": summary}))


def _tree_memory(proc) -> tuple[int, int]:
    """(RSS, PSS) summed over ``proc`` and its descendants, in bytes."""
    import psutil

    rss = pss = 0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:  # the run just ended
        return 0, 0
    for p in tree:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def measure(view: Path, n: int, args: argparse.Namespace, scratch: Path) -> dict:
    import psutil

    workdir = Path(tempfile.mkdtemp(prefix=f"run{n}-", dir=scratch))
    result = workdir / "result.json"
    cmd = [sys.executable, __file__, "--child", str(view), str(workdir), str(args.image_size), str(args.workers), str(args.chunk), str(result)]
    env = {**os.environ, **QUIET_ENV}
    peak = {"rss": 0, "pss": 0}
    proc = subprocess.Popen(cmd, env=env)
    watched = psutil.Process(proc.pid)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            rss, pss = _tree_memory(watched)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            stop.wait(args.poll)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rc = proc.wait()
    stop.set()
    poller.join()
    if rc != 0:
        raise SystemExit(f"[bench] prepare on {n} images failed (exit {rc})")
    out = json.loads(result.read_text())
    prepared = workdir / "data" / "prepared"
    size = sum(f.stat().st_size for f in prepared.iterdir())
    row = {
        "images": n,
        "seconds": out["seconds"],
        "images_per_s": n / out["seconds"],
        "peak_rss_tree_gib": peak["rss"] / GIB,
        "peak_pss_tree_gib": peak["pss"] / GIB,
        # Linux: kilobytes; the largest single descendant of this process so far (runs only grow)
        "max_process_maxrss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB,
        "prepared_gib": size / GIB,
        "image_shape": out["summary"]["image_shape"],
    }
    if not args.keep:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000], help="dataset sizes (images) to prepare")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lowlabel-bench-imagefolder", help="where the synthetic folder is written once and reused")
    parser.add_argument("--image-size", type=int, default=32, help="data.image_size of the prepared arrays")
    parser.add_argument("--workers", default="auto", help="data.decode_workers")
    parser.add_argument("--chunk", type=int, default=128, help="data.decode_chunk")
    parser.add_argument("--unique", type=int, default=500, help="distinct JPEGs encoded per class (files repeat them)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="processes writing the JPEGs")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between two memory samples")
    parser.add_argument("--keep", action="store_true", help="keep each run's prepared folder")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    sizes = sorted(args.sizes)
    ensure_folder(args.root, -(-max(sizes) // CLASSES), args.gen_workers, args.unique)
    scratch = Path(tempfile.mkdtemp(prefix="lowlabel-bench-prepare-"))
    rows = []
    try:
        for n in sizes:
            view = make_view(args.root, scratch / "views", n)
            print(f"[bench] prepare on {n} images ...", flush=True)
            rows.append(measure(view, n, args, scratch))
            print(f"[bench] {json.dumps(rows[-1])}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    print(f"\nprepare, image_size {args.image_size}, decode_workers {args.workers}, decode_chunk {args.chunk}, {os.cpu_count()} CPUs")
    print("| images | seconds | images/s | peak RSS, tree sum (GiB) | peak PSS, tree sum (GiB) | max process ru_maxrss (GiB) | prepared (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['seconds']:.0f} | {r['images_per_s']:.0f} | {r['peak_rss_tree_gib']:.2f} | {r['peak_pss_tree_gib']:.2f} | {r['max_process_maxrss_gib']:.2f} | {r['prepared_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7])
    else:
        main()
