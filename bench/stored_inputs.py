"""How much memory a worker needs to read prepared data in place (``runtime.inputs: storage``).

Writes a synthetic prepared folder whose train images take ``--gb`` GiB (CIFAR-shaped rows,
written sparse, so quickly), stages it with the product's code (lowlabel.runner.stored_inputs)
to a local folder (standing for a shared mount) and to an S3-compatible server (moto's, started
here), then in a fresh process per route reads ``--rows`` rows in random order and a slice the
way the training loop does, and prints rows/s and that process's peak RSS beside the array's
size. The object-store route would hold the whole array per node.

    python bench/stored_inputs.py --gb 1 --rows 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def write_prepared(root: Path, gib: float) -> int:
    from lowlabel.data.splits import make_split

    row = 32 * 32 * 3
    n = int(gib * (1 << 30) // row) // 10 * 10
    root.mkdir(parents=True)
    images = np.lib.format.open_memmap(root / "train_images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1 << 16):  # a pattern per block: rows differ, the writing stays cheap
        images[start : start + (1 << 16)] = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    images.flush()
    del images
    labels = np.arange(n, dtype=np.int64) % 10
    test_x = np.zeros((100, 32, 32, 3), np.uint8)
    test_y = np.arange(100, dtype=np.int64) % 10
    np.save(root / "train_labels.npy", labels)
    np.save(root / "test_images.npy", test_x)
    np.save(root / "test_labels.npy", test_y)
    split = make_split(labels, test_y, novel_classes=[8, 9], labels_per_class=4, seed=0)
    split.to_json(root / "split.json")
    (root / "info.json").write_text(json.dumps({"class_names": [str(c) for c in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "skipped": []}))
    return n


def read(handle_json: str, rows: int) -> None:
    """In a fresh process: open the staged data as a worker does, read rows, print the numbers."""
    from lowlabel.runner.stored_inputs import StoredData, open_stored

    handle = StoredData(**json.loads(handle_json))
    data = open_stored(handle)
    images = data.train_images
    order = np.random.default_rng(1).choice(len(images), size=rows, replace=False)
    started = time.perf_counter()
    total = 0
    for i in order:
        total += int(np.asarray(images[int(i)])[0, 0, 0])
    random_s = time.perf_counter() - started
    started = time.perf_counter()
    chunk = np.array(images[: min(len(images), 50_000)])  # a copy: reads the rows (a memmap slice alone reads nothing)
    slice_s = time.perf_counter() - started
    del chunk
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # RSS counts the mapped file's clean pages, which the kernel drops under pressure; the
    # memory a worker really holds is its anonymous memory (the cache, Python, torch).
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    anon = int(status["RssAnon"].split()[0]) * 1024
    print(json.dumps({"random_rows_per_s": rows / random_s, "slice_rows_per_s": 50_000 / slice_s, "peak_rss": peak, "anon": anon, "checksum": total}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--cache-mb", type=int, default=256)
    # moto serves a ranged GET in time proportional to the whole object (measured: a 0.5 GiB
    # array made it minutes per few hundred rows), so the S3 route is measured at small sizes.
    parser.add_argument("--routes", default="mount,s3", help="comma-separated: mount, s3")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read(args.read, args.rows)
        return

    from lowlabel.runner.stored_inputs import stage_prepared

    # A SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops moto.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="lowlabel-stored-"))
    n = write_prepared(work / "prepared", args.gb)
    nbytes = n * 32 * 32 * 3
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        time.sleep(3)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", access_key="testing", secret_key="testing", allow_bucket_creation=True).create_dir("bench")
        rows = []
        routes = {"mount": ("shared mount (memory map)", str(work / "shared")), "s3": ("S3 (moto; ranged reads, block cache)", "s3://bench/runs")}
        for route, storage in (routes[name] for name in args.routes.split(",")):
            started = time.perf_counter()
            handle, copied = stage_prepared(storage, work / "prepared", args.cache_mb << 20)
            stage_s = time.perf_counter() - started
            out = subprocess.run(
                [sys.executable, __file__, "--rows", str(args.rows), "--read", json.dumps(handle.__dict__)], env=env, capture_output=True, text=True, check=True
            )
            numbers = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((route, copied, stage_s, numbers))
    finally:
        os.killpg(moto.pid, 15)
    print(f"train images: {n} rows of 32x32x3, {nbytes / (1 << 30):.2f} GiB; cache {args.cache_mb} MiB; {args.rows} random rows read")
    print("| route | staged GiB | stage s | random rows/s | sequential rows/s (50k slice) | reader peak RSS GiB (incl. mapped file pages) | reader anonymous GiB |")
    print("|---|---|---|---|---|---|---|")
    for route, copied, stage_s, numbers in rows:
        print(
            f"| {route} | {copied / (1 << 30):.2f} | {stage_s:.1f} | {numbers['random_rows_per_s']:.0f} | {numbers['slice_rows_per_s']:.0f} "
            f"| {numbers['peak_rss'] / (1 << 30):.2f} | {numbers['anon'] / (1 << 30):.2f} |"
        )
    print(f"| object store (for scale: one whole copy per node, held) | – | – | – | – | ≥ {nbytes / (1 << 30):.2f} | |")


if __name__ == "__main__":
    main()
