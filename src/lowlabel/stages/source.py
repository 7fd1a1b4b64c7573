"""DVC stage ``source``: a fingerprint of the files ``data.source`` reads, which ``prepare`` depends on.

DVC re-runs a stage when a path its ``deps`` name changes, but the source data lives outside
the repository at a place the params decide: ``data.root``, or, when it is null, the source's
default (Debian's Fashion-MNIST files, the download cache, the glyph fonts). dvc.yaml cannot
name that place: ``${data.root}`` fails in DVC when the value is null, and presets leave it null.
So this stage is ``always_changed``: every ``dvc repro`` runs it (well under a second once the
files' hashes are cached) and it writes ``data/source.json``: for each location the source
reads, its file count, bytes and one MD5 over the files' relative paths and contents. That
file changes exactly when the source's files do, and ``prepare`` then re-runs.

Being the stage every repro runs first, it also opens the repro's MLflow pipeline run, the
parent of every stage run of that ``dvc repro`` / ``dvc exp run`` (lowlabel.tracking): not an
output, so it never re-runs ``prepare``; it costs the stage 1-2 s (MLflow's import), and only
under DVC (run by hand, the stage opens no run).

The fingerprint holds no absolute paths or times, so the same data gives the same file on
every machine. MD5s are cached in ``data/.source-hashes.json`` by path, size, mtime and inode
(as DVC caches its own), so unchanged files are not read again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from lowlabel.atomic import atomic_write_text
from lowlabel.config import ConfigError, DataConfig, Params, flatten, load_params
from lowlabel.data.glyphs import GLYPH_FONT_FILES
from lowlabel.data.sources import DEBIAN_FASHION_MNIST_DIR, DEFAULT_CACHE_DIR

FINGERPRINT = Path("data/source.json")
HASH_CACHE = Path("data/.source-hashes.json")
FONTS_DIR = Path("/usr/share/fonts")  # where lowlabel.data.glyphs.find_fonts looks by default


def source_locations(data: DataConfig) -> dict[str, Path | list[Path]]:
    """What ``lowlabel.data.sources.load_source`` may read for ``data``, by a machine-independent
    label: a folder (every file under it counts) or a list of files. The same search order as
    the loaders; a location that does not exist is fingerprinted as missing."""
    root = Path(data.root).expanduser() if data.root else None
    cache = Path(DEFAULT_CACHE_DIR).expanduser()
    if data.source == "fashion_mnist":
        # load_fashion_mnist: data.root, then Debian's folder, then (root unset) the download cache.
        if root:
            return {"data.root": root, "debian": Path(DEBIAN_FASHION_MNIST_DIR)}
        return {"debian": Path(DEBIAN_FASHION_MNIST_DIR), "cache": cache / "fashion-mnist"}
    if data.source in ("cifar10", "stl10"):
        return {"data.root": root} if root else {"cache": cache / data.source}
    if data.source == "glyphs":
        # Rendered from the pinned font files only (find_fonts' known_only), wherever Debian puts them.
        known = {name for files in GLYPH_FONT_FILES.values() for name in files}
        fonts = sorted({p.resolve() for p in FONTS_DIR.rglob("*") if p.name in known and p.is_file()}) if FONTS_DIR.is_dir() else []
        return {"fonts": fonts}
    return {"data.root": root} if root else {}  # imagefolder: prepare itself says root is missing


def _files(location: Path | list[Path]) -> list[tuple[str, Path]]:
    """(relative name, path) of each file, sorted; hidden files and folders are left out."""
    if isinstance(location, list):
        return sorted((p.name, p) for p in location)
    if location.is_file():
        return [(location.name, location)]
    out = []
    for folder, dirs, names in os.walk(location, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(folder) / name
                out.append((path.relative_to(location).as_posix(), path))
    return sorted(out)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(locations: dict[str, Path | list[Path]], cache: dict[str, list[Any]]) -> dict[str, Any]:
    """Per location: files, bytes and the MD5 of its (name, file MD5) list. ``cache`` (path ->
    [size, mtime_ns, inode, md5]) is used and refreshed in place."""
    seen: dict[str, list[Any]] = {}
    out: dict[str, Any] = {}
    for label, location in locations.items():
        if isinstance(location, Path) and not location.exists():
            out[label] = "missing"
            continue
        listing = hashlib.md5()
        count = size = 0
        for name, path in _files(location):
            st = path.stat()
            key = str(path.resolve())
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            hit = cache.get(key)
            md5 = hit[3] if hit and hit[:3] == stamp else _md5(path)
            seen[key] = [*stamp, md5]
            listing.update(f"{name}\0{md5}\n".encode())
            count += 1
            size += st.st_size
        out[label] = {"files": count, "bytes": size, "md5": listing.hexdigest()}
    cache.clear()
    cache.update(seen)
    return out


def open_pipeline_run(params: Params, root: Path) -> str | None:
    """Under DVC, the pipeline run of this invocation (its id, recorded for the later stages);
    None when run by hand. A store that cannot take it only warns here: the stages that must
    log to it stop with their own clear error."""
    from lowlabel.tracking import dvc_invocation, resolve_tracking_uri, start_pipeline_run

    invocation = dvc_invocation()
    if invocation is None:
        return None
    uri = resolve_tracking_uri(params.tracking.uri, root)
    try:
        return start_pipeline_run(
            tracking_uri=uri, artifact_root=params.tracking.artifact_root, experiment=params.tracking.experiment,
            params=flatten(params), root=root, invocation=invocation,
        )
    except Exception as error:
        print(f"[source] warning: no MLflow pipeline run in {uri}: {str(error).splitlines()[0] if str(error) else type(error).__name__}", flush=True)
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        data = params.data
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    result = {"source": data.source, "locations": fingerprint(source_locations(data), cache)}
    atomic_write_text(FINGERPRINT, json.dumps(result, indent=2, sort_keys=True) + "\n")
    atomic_write_text(HASH_CACHE, json.dumps(cache) + "\n")
    summary = ", ".join(f"{k} {v if isinstance(v, str) else str(v['files']) + ' files'}" for k, v in result["locations"].items())
    print(f"[source] {data.source}: {summary or 'no location (data.root not set)'}", flush=True)
    run_id = open_pipeline_run(params, Path.cwd())
    if run_id:
        print(f"[source] MLflow pipeline run {run_id}", flush=True)


if __name__ == "__main__":
    main()
