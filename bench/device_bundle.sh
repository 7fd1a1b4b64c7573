#!/usr/bin/env bash
# Build .whl/: what the lent GPU machine (nvidia-h200; Python 3.12, torch 2.11, no network) lacks
# to run bench/gpu_train.py through the real Ray Train jobs, small enough to travel (< 64 MiB).
#
#   bash bench/device_bundle.sh            # -> .whl/*.whl + .whl/ray.tar.xz (26 MiB in all)
#   PYVER=3.11 OUT=/tmp/whl311 bash bench/device_bundle.sh   # the same bundle for a local dry run
#
# What the device lacks (its image has numpy, scipy, pandas, pyarrow, pyyaml, opencv-python-headless,
# timm, msgpack, protobuf, click, filelock, requests, fsspec, psutil, aiohttp, grpcio, attrs, ...):
# ray (ray[train] without the dashboard extras: Ray then runs "minimal", no dashboard web UI),
# pydantic (+ pydantic-core, annotated-types, typing-inspection, typing_extensions >= 4.16),
# albumentations (+ albucore, stringzilla, simsimd), kornia (+ kornia_rs: the training loops import
# lowlabel.data.device_augment; ~7 MB more, not yet run on the device), jsonschema (+ referencing,
# rpds-py, jsonschema-specifications). MLflow is not needed: gpu_train.py runs the jobs untracked.
# Versions are the ones the project's venv resolved.
#
# Ray's cp312 wheel is 79 MB; unpacked, pruned (jars, rllib, serve, llm, the dashboard's built web
# client, tests) and with its ELF binaries stripped (_raylet.so, gcs_server, raylet) it packs as
# an xz tarball of 18 MB. Checked: the same bundle built for 3.11 ran gpu_train.py --cpu-smoke
# (simclr, moco, fixmatch) in an env holding only the device's package list, and on the H200 the
# cp312 bundle ran gpu_train.py plus a semisup job started from an encoder (2026-12-04).
#
# On the device (name .whl in `carry`):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && tar -xJf .whl/ray.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
OUT=${OUT:-.whl}
RAY_VERSION=${RAY_VERSION:-2.60.0}
tag=cp${PYVER/./}

if [ "$OUT" = .whl ]; then
  mkdir -p .git/info
  grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
fi
rm -rf "$OUT"
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"
}

download "$OUT" \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 \
  kornia==0.9.0 kornia_rs==0.2.0 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1

download "$work" "ray==$RAY_VERSION"
mkdir "$work/ray"
unzip -q "$work"/ray-"$RAY_VERSION"-"$tag"-*.whl -d "$work/ray"
cd "$work/ray"
rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client
find ray -type d -name tests -prune -exec rm -rf {} +
mkdir -p ray/dashboard/client/build/static   # the (minimal) dashboard looks for the folder only
find ray -type f \( -name '*.so' -o -name '*.so.*' -o -path 'ray/core/src/ray/*' \) -exec sh -c \
  'file -b "$1" | grep -q "^ELF" && strip --strip-unneeded "$1"' _ {} \;
cd - >/dev/null
XZ_OPT='-9 -T0' tar -cJf "$OUT/ray.tar.xz" -C "$work/ray" ray "ray-$RAY_VERSION.dist-info"

ls -la "$OUT"
du -sh "$OUT"
