"""Raw image sources: Fashion-MNIST (IDX files), an image folder, CIFAR-10 and STL-10.

Every loader returns a :class:`RawDataset` of uint8 NHWC arrays plus int64 labels, so the
rest of the pipeline never sees a source-specific format. Every problem a user can cause
(missing files, corrupt images, bad settings) is raised as :class:`DataSourceError` whose
message names the file or setting, the value, and how to fix it.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import urllib.request
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lowlabel.data.prepared import NpyRows, NpyRowWriter
from lowlabel.errors import UserError

__all__ = [
    "ALLOWED_SOURCES",
    "FASHION_MNIST_CLASSES",
    "DataSourceError",
    "ImageFolderWritten",
    "RawDataset",
    "load_cifar10",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_source",
    "load_stl10",
    "read_idx",
    "resolve_decode_workers",
    "write_imagefolder",
]

logger = logging.getLogger(__name__)

ALLOWED_SOURCES: tuple[str, ...] = ("fashion_mnist", "imagefolder", "cifar10", "stl10", "glyphs")

# Where Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Parent of per-source download folders when the user gives no data.root.
DEFAULT_CACHE_DIR = "~/.cache/lowlabel"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# PIL modes that carry no colour; 'F' and the I;16 variants are included so 16-bit/float
# grayscale TIFFs are not mistaken for colour images.
GRAY_MODES: frozenset[str] = frozenset(
    {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
)
ON_CORRUPT_CHOICES: tuple[str, ...] = ("skip", "error")
_MAX_LISTED = 10  # how many offending paths an error/warning message spells out


class DataSourceError(UserError, ValueError):
    """A user-fixable problem with a data source; the message names file/setting and value."""


@dataclass(frozen=True)
class RawDataset:
    """Decoded images and labels of one source, split into train and test."""

    train_images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, H, W, C)
    test_labels: np.ndarray  # int64 (M,)
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, reason); only imagefolder skips anything


# --------------------------------------------------------------------------- entry point


def load_source(
    source: str,
    root: str | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    on_corrupt: str = "skip",
    download: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    glyph_classes: int = 1200,
    glyph_instances: int = 20,
) -> RawDataset:
    """Load ``source`` as uint8 NHWC arrays, resized to ``image_size`` and ``channels`` if given."""
    _check_image_size(image_size)
    _check_channels(channels)
    if source == "fashion_mnist":
        ds = load_fashion_mnist(root, download=download)
    elif source == "imagefolder":
        # imagefolder resizes/converts while decoding (sizes may differ per file).
        return load_imagefolder(
            root, image_size=image_size, channels=channels, on_corrupt=on_corrupt,
            test_fraction=test_fraction, seed=seed,
        )
    elif source == "cifar10":
        ds = load_cifar10(root, download=download)
    elif source == "stl10":
        ds = load_stl10(root, download=download)
    elif source == "glyphs":
        # Rendered at the requested size directly (no resize of 28 px renders).
        ds = load_glyphs(glyph_classes, glyph_instances, image_size or 28, test_fraction=test_fraction, seed=seed)
        return _adapt(ds, image_size=None, channels=channels)
    else:
        raise DataSourceError(
            f"unknown data.source={source!r}; allowed sources: {', '.join(ALLOWED_SOURCES)}"
        )
    return _adapt(ds, image_size=image_size, channels=channels)


# --------------------------------------------------------------------------- validation


def _check_image_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataSourceError(
            f"data.image_size={image_size!r} is invalid; expected a positive integer or null"
        )


def _check_channels(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataSourceError(f"data.channels={channels!r} is invalid; expected 1, 3 or null")


# --------------------------------------------------------------------------- array helpers


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize NHWC uint8 images to size x size with PIL bilinear (same filter as imagefolder)."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)).reshape(size, size, c)
    return out


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert NHWC uint8 images between 1 and 3 channels."""
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    out = np.empty(images.shape[:-1] + (1,), dtype=np.uint8)
    # ITU-R 601-2 luma in PIL's fixed-point form, so results equal Image.convert('L');
    # chunked because the uint32 intermediates of a whole dataset would be large.
    step = 4096
    for s in range(0, images.shape[0], step):
        rgb = images[s : s + step].astype(np.uint32)
        y = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        out[s : s + step, ..., 0] = y.astype(np.uint8)
    return out


def _adapt_images(images: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    # Reduce channels before resizing (3x less work) but expand after (same result).
    if channels == 1:
        images = _to_channels(images, 1)
    if image_size is not None:
        images = _resize(images, image_size)
    if channels == 3:
        images = _to_channels(images, 3)
    return images


def _adapt(ds: RawDataset, image_size: int | None, channels: int | None) -> RawDataset:
    if image_size is None and channels is None:
        return ds
    return RawDataset(
        train_images=_adapt_images(ds.train_images, image_size, channels),
        train_labels=ds.train_labels,
        test_images=_adapt_images(ds.test_images, image_size, channels),
        test_labels=ds.test_labels,
        class_names=ds.class_names,
        skipped=ds.skipped,
    )


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Parse one unsigned-byte IDX file (optionally gzipped) into a uint8 array."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # truncated gzip raises EOFError
        raise DataSourceError(f"cannot read IDX file {path}: {type(e).__name__}: {e}") from e
    if len(data) < 4:
        raise DataSourceError(f"IDX file {path} is truncated: {len(data)} bytes, no header")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataSourceError(
            f"IDX file {path} has magic number {magic}, expected {expected_magic}; "
            "it is not the right IDX file or it is corrupt"
        )
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise DataSourceError(
            f"IDX file {path} has magic number {magic}: only unsigned-byte IDX data "
            "with at least one dimension is supported"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataSourceError(
            f"IDX file {path} is truncated: header needs {header} bytes, file has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataSourceError(
            f"IDX file {path} is {what}: dims {dims} need {expected} bytes, file has {len(data)}"
        )
    # Copy so callers get a writable array rather than a view on immutable bytes.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_fashion_mnist(target: Path) -> None:
    """Fetch the four gzipped IDX files that ``target`` lacks from the official location."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataSourceError(f"cannot create download directory data.root={str(target)!r}: {e}") from e
    for name in FASHION_MNIST_FILES.values():
        if _find_idx(target, name) is not None:
            continue
        url = f"{FASHION_MNIST_URL}{name}.gz"
        dest = target / f"{name}.gz"
        part = target / f"{name}.gz.part"  # renamed only when complete: no half files later
        logger.info("downloading %s -> %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as f:
                shutil.copyfileobj(resp, f)
            os.replace(part, dest)
        except (OSError, http.client.HTTPException, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DataSourceError(
                f"could not download Fashion-MNIST file {url} into {target}: "
                f"{type(e).__name__}: {e}. Check the network, or install the files with "
                "`apt-get install dataset-fashion-mnist` or put them in data.root"
            ) from e


def _fashion_files(directory: Path) -> dict[str, Path] | None:
    found = {key: _find_idx(directory, name) for key, name in FASHION_MNIST_FILES.items()}
    if any(p is None for p in found.values()):
        return None
    return found  # type: ignore[return-value]


def load_fashion_mnist(root: str | None = None, *, download: bool = False) -> RawDataset:
    """Load Fashion-MNIST from ``root``, the Debian directory, or the cache (downloading if allowed)."""
    cache = Path(DEFAULT_CACHE_DIR).expanduser() / "fashion-mnist"
    root_dir = Path(root).expanduser() if root else None
    searched = ([root_dir] if root_dir else []) + [Path(DEBIAN_FASHION_MNIST_DIR)]
    if root_dir is None:
        searched.append(cache)
    files = None
    for directory in searched:
        files = _fashion_files(directory)
        if files is not None:
            break
    if files is None:
        if not download:
            names = ", ".join(f"{n}(.gz)" for n in FASHION_MNIST_FILES.values())
            raise DataSourceError(
                f"Fashion-MNIST not found: searched {', '.join(str(d) for d in searched)} "
                f"for {names}. Fix: `apt-get install dataset-fashion-mnist`, set data.root to "
                "a directory holding the four IDX files, or set data.download: true (needs network)"
            )
        target = root_dir or cache
        _download_fashion_mnist(target)
        files = _fashion_files(target)
        assert files is not None  # the download either fetched all four or raised
    logger.info("loading Fashion-MNIST from %s", files["train_images"].parent)

    def split(images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(files[images_key], IDX_IMAGES_MAGIC)
        labels = read_idx(files[labels_key], IDX_LABELS_MAGIC).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise DataSourceError(
                f"{files[images_key]} holds {images.shape[0]} images but "
                f"{files[labels_key]} holds {labels.shape[0]} labels"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataSourceError(
                f"{files[labels_key]} has label {int(labels.max())}; Fashion-MNIST labels are 0..9"
            )
        return images[..., None], labels

    train_x, train_y = split("train_images", "train_labels")
    test_x, test_y = split("test_images", "test_labels")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataSourceError(
            f"{files['train_images']} has images of shape {train_x.shape[1:3]} but "
            f"{files['test_images']} has {test_x.shape[1:3]}"
        )
    return RawDataset(train_x, train_y, test_x, test_y, list(FASHION_MNIST_CLASSES), [])


# --------------------------------------------------------------------------- image folder


def _class_dirs(base: Path) -> list[Path]:
    return sorted(
        (p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _decode(path: Path, channels: int | None, image_size: int | None) -> np.ndarray:
    """Decode one image to (H, W, C) uint8: 'L' or 'RGB' (by ``channels`` or its own mode)."""
    with Image.open(path) as im:
        im.load()  # Image.open is lazy; corrupt/truncated data only fails here
        if channels is not None:
            target = "L" if channels == 1 else "RGB"
        else:
            target = "L" if im.mode in GRAY_MODES else "RGB"
        out = im if im.mode == target else im.convert(target)
        if image_size is not None and out.size != (image_size, image_size):
            out = out.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arr = np.array(out, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random test split; >= 1 test and >= 1 train image for classes of >= 2."""
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = idx.size
        n_test = 0 if n < 2 else min(n - 1, max(1, int(n * test_fraction + 0.5)))
        # One generator per class: adding a class does not reshuffle the others.
        perm = np.random.default_rng([seed, int(c)]).permutation(idx)
        test_idx.append(np.sort(perm[:n_test]))
        train_idx.append(np.sort(perm[n_test:]))
    return np.concatenate(train_idx), np.concatenate(test_idx)


@dataclass(frozen=True)
class _FolderLayout:
    base: Path
    class_names: list[str]
    parts: dict[str, Path]  # "train"/"test" (given split) or "all" (stratified split later)


def _imagefolder_layout(
    root: str | None, *, image_size: int | None, channels: int | None, on_corrupt: str, test_fraction: float, seed: int
) -> _FolderLayout:
    """Every check that needs no decoding: settings, root, layout and class folders."""
    _check_image_size(image_size)
    _check_channels(channels)
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise DataSourceError(
            f"data.on_corrupt={on_corrupt!r} is invalid; expected one of {', '.join(ON_CORRUPT_CHOICES)}"
        )
    if root is None or str(root) == "":
        raise DataSourceError(
            "source 'imagefolder' needs data.root: a directory of root/<class>/<images> "
            "or root/train/<class>/... + root/test/<class>/...; data.root is not set"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataSourceError(f"data.root={str(root)!r} is not a directory (source 'imagefolder')")

    # Layout detection: train/ + test/ -> given split; otherwise every subfolder is a class.
    train_dir, test_dir = base / "train", base / "test"
    split_layout = train_dir.is_dir() and test_dir.is_dir()
    if not split_layout:
        for d, other in ((train_dir, test_dir), (test_dir, train_dir)):
            if d.is_dir() and _class_dirs(d):
                raise DataSourceError(
                    f"data.root={str(root)!r} has {d.name}/ with class folders but no {other.name}/; "
                    f"add {other} or use the flat root/<class>/ layout"
                )

    if split_layout:
        train_classes = [p.name for p in _class_dirs(train_dir)]
        test_classes = [p.name for p in _class_dirs(test_dir)]
        if set(train_classes) != set(test_classes):
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DataSourceError(
                f"data.root={str(root)!r}: train/ and test/ class folders differ: "
                f"only in train: {only_train}, only in test: {only_test}"
            )
        class_names = train_classes
        parts = {"train": train_dir, "test": test_dir}
    else:
        class_names = [p.name for p in _class_dirs(base)]
        parts = {"all": base}
    if not class_names:
        raise DataSourceError(
            f"data.root={str(root)!r} contains no class folders; expected root/<class>/<images> "
            "or root/train/<class>/... + root/test/<class>/..."
        )
    if len(class_names) < 2:
        # Checked before decoding: no split can hold both base classes and novel classes.
        raise DataSourceError(
            f"data.root={str(root)!r} has one class folder ({class_names[0]!r}); the pipeline needs at least 2 classes: "
            "base classes to train on and data.novel_classes held out for few-shot"
        )
    if not split_layout:
        # Checked before decoding too: the split is made once every image is decoded.
        if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
            raise DataSourceError(
                f"data.test_fraction={test_fraction!r} is invalid; expected 0 < test_fraction < 1"
            )
        try:
            np.random.default_rng([seed, 0])
        except (ValueError, TypeError) as e:  # e.g. a negative seed
            raise DataSourceError(f"seed={seed!r} is invalid: {e}") from e
    return _FolderLayout(base, class_names, parts)


# ----------------------------------------------------------------- image folder: streamed decode

DECODE_CHUNK = 128  # images per decode task: data.decode_chunk's default
_COPY_BYTES = 32 << 20  # rows moved per read when the decoded rows are split / reduced to 1 channel


def resolve_decode_workers(workers: int | str) -> int:
    """``data.decode_workers``: a count, or ``"auto"``: the CPUs this process may run on."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # no sched_getaffinity (macOS)
            return max(1, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise DataSourceError(
            f"data.decode_workers={workers!r} is invalid; expected a positive integer or 'auto' (the CPUs this process may use)"
        )
    return int(workers)


_DecodeTask = tuple[list[str], "int | None", "int | None", int]
_Decoded = tuple["np.ndarray | None", "str | None", bool]  # (stored pixels, None, is colour) or (None, reason, False)


def _decode_task(task: _DecodeTask) -> list[_Decoded]:
    """Decode one chunk of files (in a pool worker or in-process). Gray images are repeated to
    ``store_channels`` (3 while the channel count is not yet known: repeating equals converting)."""
    paths, channels, image_size, store_channels = task
    out: list[_Decoded] = []
    for path in paths:
        try:
            arr = _decode(Path(path), channels, image_size)
        except Exception as e:  # any decoder failure marks the file unreadable
            out.append((None, f"{type(e).__name__}: {e}", False))
            continue
        colour = arr.shape[2] == 3
        if arr.shape[2] != store_channels:
            arr = np.repeat(arr, store_channels, axis=2)
        out.append((arr, None, colour))
    return out


def _in_order(pool: ProcessPoolExecutor, tasks: Iterator[_DecodeTask], window: int) -> Iterator[_Decoded]:
    """Results in task order with at most ``window`` tasks submitted and not yet consumed: the
    memory held is window x decode_chunk decoded images, whatever the number of files."""
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_decode_task, task))
            if len(pending) >= window:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool as e:
        raise DataSourceError(
            f"an image decode worker died ({e}); if the machine ran out of memory, lower "
            "data.decode_workers or data.decode_chunk"
        ) from e


@contextmanager
def _decoded(
    paths: Iterator[str], n_files: int, *, channels: int | None, image_size: int | None, store_channels: int, workers: int, chunk: int
) -> Iterator[Iterator[_Decoded]]:
    """Per-file decode results for the ``n_files`` paths, in order, whatever the number of workers."""
    tasks = (
        ([next(paths) for _ in range(min(chunk, n_files - start))], channels, image_size, store_channels)
        for start in range(0, n_files, chunk)
    )
    if workers <= 1 or n_files <= chunk:
        yield (item for task in tasks for item in _decode_task(task))
        return
    # fork where there is one: the workers start with the modules already loaded (spawn and
    # forkserver would import the calling stage again, MLflow included, in every worker).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield _in_order(pool, tasks, window=2 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class ImageFolderWritten:
    """What :func:`write_imagefolder` wrote: the arrays are in its folder, not here."""

    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, reason), in file order
    train_count: int
    test_count: int
    image_shape: tuple[int, int, int]  # (H, W, C)


def _copy_rows(src: NpyRows, routes: list[tuple[NpyRowWriter, np.ndarray | None]], channels: int) -> None:
    """Move ``src``'s rows, a bounded block at a time, to each writer whose mask selects them
    (None: every row), keeping the first ``channels`` channels (gray stored as 3 repeats)."""
    step = max(1, _COPY_BYTES // max(1, src._row_bytes))
    for start in range(0, len(src), step):
        block = src[start : start + step]
        if block.shape[-1] != channels:
            block = block[..., :channels]
        for writer, mask in routes:
            writer.write(block if mask is None else block[mask[start : start + step]])


def write_imagefolder(
    root: str | None,
    folder: Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    on_corrupt: str = "skip",
    test_fraction: float = 0.2,
    seed: int = 0,
    decode_workers: int | str = 1,
    decode_chunk: int = DECODE_CHUNK,
    progress: Callable[[int, int, int], None] | None = None,
) -> ImageFolderWritten:
    """Decode ``root/<class>/*`` (stratified split) or ``root/{train,test}/<class>/*`` into
    ``folder``/{train,test}_{images,labels}.npy, the same bytes ``np.save`` writes for the arrays
    :func:`load_imagefolder` returns.

    Streamed: ``decode_workers`` processes decode ``decode_chunk`` files per task, in file order,
    and each image is written to a preallocated .npy on disk as it comes, so memory holds at most
    2 x decode_workers x decode_chunk decoded images, never the dataset. Unreadable files leave no
    row (the file is truncated at the end). The flat layout's split needs every label first, so
    its images go to a temporary file in ``folder`` and are then moved, a bounded block at a time,
    into the train and test files; so are gray images stored as 3 channels until the end shows
    that no image has colour. ``progress(done, total, skipped)`` is called after every chunk.
    """
    layout = _imagefolder_layout(
        root, image_size=image_size, channels=channels, on_corrupt=on_corrupt, test_fraction=test_fraction, seed=seed
    )
    workers = resolve_decode_workers(decode_workers)
    if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, (int, np.integer)) or decode_chunk < 1:
        raise DataSourceError(f"data.decode_chunk={decode_chunk!r} is invalid; expected a positive integer (images per decode task)")
    folder = Path(folder)
    base, class_names = layout.base, layout.class_names
    # File names only (short strings): a Path per file of a large folder would be the largest
    # thing prepare holds in memory, and each forked decode worker would count it again.
    classes = [
        (part, label, part_dir / name, [path.name for path in _image_files(part_dir / name)])
        for part, part_dir in layout.parts.items()
        for label, name in enumerate(class_names)
    ]
    n_files = sum(len(files) for *_, files in classes)
    paths = (str(class_dir / name) for _, _, class_dir, files in classes for name in files)
    capacity = {part: sum(len(files) for p, _, _, files in classes if p == part) for part in layout.parts}
    store_channels = channels or 3
    decoded = {part: folder / f".decoded-{part}.npy" for part in layout.parts}
    writers: dict[str, NpyRowWriter] = {}
    labels: dict[str, list[int]] = {part: [] for part in layout.parts}
    corrupt: list[tuple[str, str]] = []
    sizes: dict[tuple[int, int], str] = {}  # first file of each decoded size (image_size unset)
    hw = (image_size, image_size) if image_size is not None else None
    any_colour = False
    done = 0
    try:
        with _decoded(
            paths, n_files, channels=channels, image_size=image_size, store_channels=store_channels,
            workers=min(workers, -(-n_files // decode_chunk)), chunk=int(decode_chunk),
        ) as results:
            for part, label, class_dir, files in classes:
                n_ok = 0
                for file_name in files:
                    path = class_dir / file_name
                    arr, reason, colour = next(results)
                    done += 1
                    if progress is not None and (done % decode_chunk == 0 or done == n_files):
                        progress(done, n_files, len(corrupt) + (arr is None))
                    if arr is None:
                        corrupt.append((str(path), str(reason)))
                        continue
                    n_ok += 1
                    any_colour |= colour
                    if image_size is None:
                        sizes.setdefault(arr.shape[:2], str(path))
                    if hw is None:
                        hw = arr.shape[:2]
                    if arr.shape[:2] != hw:
                        continue  # mixed sizes: reported below, after the unreadable files
                    if not writers:
                        writers = {p: NpyRowWriter(decoded[p], capacity[p], (*hw, store_channels)) for p in layout.parts}
                    writers[part].write(arr[None])
                    labels[part].append(label)
                if n_ok == 0 and (on_corrupt == "skip" or not files):
                    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                    raise DataSourceError(
                        f"class folder {class_dir} has no readable images "
                        f"({len(files)} file(s) with extensions {exts}, all unreadable)"
                        if files else
                        f"class folder {class_dir} has no images (extensions {exts})"
                    )
        for writer in writers.values():
            writer.close()

        if corrupt:
            listed = "; ".join(f"{p} ({r})" for p, r in corrupt[:_MAX_LISTED])
            more = f"; ... and {len(corrupt) - _MAX_LISTED} more" if len(corrupt) > _MAX_LISTED else ""
            if on_corrupt == "error":
                raise DataSourceError(
                    f"{len(corrupt)} corrupt/unreadable image(s) under data.root={str(root)!r} "
                    f"(data.on_corrupt='error'): {listed}{more}. "
                    "Remove them or set data.on_corrupt: skip"
                )
            msg = (
                f"skipped {len(corrupt)} corrupt/unreadable image(s) under {base}: "
                + ", ".join(p for p, _ in corrupt[:_MAX_LISTED]) + (" ..." if more else "")
            )
            logger.warning(msg)
            warnings.warn(msg, stacklevel=3)
        if len(sizes) > 1:
            examples = ", ".join(f"{p}: {h}x{w}" for (h, w), p in list(sizes.items())[:3])
            raise DataSourceError(
                f"images under data.root={str(root)!r} have {len(sizes)} different sizes "
                f"(e.g. {examples}) and data.image_size is not set; set data.image_size"
            )
        assert hw is not None and writers  # every class has a readable image, or an error was raised
        n_channels = channels or (3 if any_colour else 1)
        shape = (int(hw[0]), int(hw[1]), n_channels)

        def finish(name: str, count: int) -> NpyRowWriter:
            return NpyRowWriter(folder / f"{name}_images.npy", count, shape)

        if "all" in layout.parts:
            all_labels = np.array(labels["all"], dtype=np.int64)
            tr, te = _stratified_split(all_labels, float(test_fraction), seed)
            if te.size == 0:
                # Nothing to evaluate on: every later stage would fail on the empty test split.
                counts = {name: int((all_labels == label).sum()) for label, name in enumerate(class_names)}
                raise DataSourceError(
                    f"data.root={str(root)!r}: every class folder has fewer than 2 readable images {counts}, so the test split "
                    "is empty; each class needs at least 2 (one to train on, one to test on)"
                )
            # Labels come class after class, so each split's indices rise: one pass routes every row.
            assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
            is_test = np.zeros(all_labels.size, dtype=bool)
            is_test[te] = True
            with finish("train", tr.size) as train_out, finish("test", te.size) as test_out:
                _copy_rows(NpyRows(decoded["all"]), [(train_out, ~is_test), (test_out, is_test)], n_channels)
            split_labels = {"train": all_labels[tr], "test": all_labels[te]}
        else:
            for part in ("train", "test"):
                if n_channels == store_channels:
                    os.replace(decoded[part], folder / f"{part}_images.npy")
                else:
                    with finish(part, writers[part].count) as out:
                        _copy_rows(NpyRows(decoded[part]), [(out, None)], n_channels)
            split_labels = {part: np.array(labels[part], dtype=np.int64) for part in ("train", "test")}
        for part, part_labels in split_labels.items():
            np.save(folder / f"{part}_labels.npy", part_labels.astype(np.int64))
    finally:
        for writer in writers.values():
            writer.close()
        for path in decoded.values():
            path.unlink(missing_ok=True)
    counts = {part: int(part_labels.size) for part, part_labels in split_labels.items()}
    logger.info(
        "imagefolder %s: %d classes, %d train / %d test images of %dx%dx%d, %d skipped",
        base, len(class_names), counts["train"], counts["test"], *shape, len(corrupt),
    )
    return ImageFolderWritten(class_names, list(corrupt), counts["train"], counts["test"], shape)


def load_imagefolder(
    root: str | None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    on_corrupt: str = "skip",
    test_fraction: float = 0.2,
    seed: int = 0,
    decode_workers: int | str = 1,
    decode_chunk: int = DECODE_CHUNK,
) -> RawDataset:
    """Load ``root/<class>/*`` (stratified split) or ``root/{train,test}/<class>/*`` into memory:
    :func:`write_imagefolder` into a temporary folder, read back. The prepare stage streams
    instead (it calls write_imagefolder on its output folder)."""
    with tempfile.TemporaryDirectory(prefix="lowlabel-imagefolder-") as tmp:
        written = write_imagefolder(
            root, Path(tmp), image_size=image_size, channels=channels, on_corrupt=on_corrupt,
            test_fraction=test_fraction, seed=seed, decode_workers=decode_workers, decode_chunk=decode_chunk,
        )
        arrays = {name: np.load(Path(tmp) / f"{name}.npy") for name in ("train_images", "train_labels", "test_images", "test_labels")}
    return RawDataset(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
        written.class_names, written.skipped,
    )



# --------------------------------------------------------------------------- torchvision


_TORCHVISION_LAYOUT = {"cifar10": "cifar-10-batches-py/", "stl10": "stl10_binary/"}


def _torchvision_root(source: str, root: str | None) -> Path:
    return Path(root).expanduser() if root else Path(DEFAULT_CACHE_DIR).expanduser() / source


def _torchvision_error(source: str, root_dir: Path, download: bool, e: Exception) -> DataSourceError:
    if download:
        return DataSourceError(
            f"could not download/prepare {source} into data.root={str(root_dir)!r}: "
            f"{type(e).__name__}: {e}. data.download: true needs network access; otherwise put "
            f"the extracted {_TORCHVISION_LAYOUT[source]} folder in data.root"
        )
    return DataSourceError(
        f"{source} not found (or incomplete) in data.root={str(root_dir)!r}: {e}. "
        f"Set data.download: true (needs network) or put the extracted "
        f"{_TORCHVISION_LAYOUT[source]} folder in data.root"
    )


def load_cifar10(root: str | None = None, *, download: bool = False) -> RawDataset:
    """Load CIFAR-10 through torchvision as (N, 32, 32, 3) uint8."""
    from torchvision import datasets  # imported lazily: slow, and unused by other sources

    root_dir = _torchvision_root("cifar10", root)
    try:
        train = datasets.CIFAR10(str(root_dir), train=True, download=download)
        test = datasets.CIFAR10(str(root_dir), train=False, download=download)
    except Exception as e:
        raise _torchvision_error("cifar10", root_dir, download, e) from e
    return RawDataset(
        train_images=np.ascontiguousarray(train.data, dtype=np.uint8),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=np.ascontiguousarray(test.data, dtype=np.uint8),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        class_names=list(train.classes),
        skipped=[],
    )


def load_stl10(root: str | None = None, *, download: bool = False) -> RawDataset:
    """Load the labelled STL-10 train/test splits through torchvision as (N, 96, 96, 3) uint8."""
    from torchvision import datasets  # imported lazily: slow, and unused by other sources

    root_dir = _torchvision_root("stl10", root)
    try:
        train = datasets.STL10(str(root_dir), split="train", download=download)
        test = datasets.STL10(str(root_dir), split="test", download=download)
    except Exception as e:
        raise _torchvision_error("stl10", root_dir, download, e) from e
    # torchvision keeps STL-10 as NCHW.
    return RawDataset(
        train_images=np.ascontiguousarray(np.asarray(train.data, dtype=np.uint8).transpose(0, 2, 3, 1)),
        train_labels=np.asarray(train.labels, dtype=np.int64),
        test_images=np.ascontiguousarray(np.asarray(test.data, dtype=np.uint8).transpose(0, 2, 3, 1)),
        test_labels=np.asarray(test.labels, dtype=np.int64),
        class_names=list(train.classes),
        skipped=[],
    )


# --------------------------------------------------------------------------- glyphs


def load_glyphs(num_classes: int, instances_per_class: int, size: int, *, test_fraction: float, seed: int) -> RawDataset:
    """The offline Omniglot-like set (``lowlabel.data.glyphs``): one class per character, one
    writer per font; each class's instances split into train/test by ``test_fraction``."""
    from lowlabel.data.glyphs import GlyphsError, render_glyphs

    try:
        glyphs = render_glyphs(num_classes, instances_per_class, size=size, seed=seed)
    except GlyphsError as error:
        raise DataSourceError(f"data.source=glyphs: {error}") from None
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    is_test = np.zeros(len(glyphs.labels), dtype=bool)
    n_test = max(1, round(instances_per_class * test_fraction))
    for c in range(glyphs.num_classes):
        members = np.flatnonzero(glyphs.labels == c)
        is_test[rng.permutation(members)[:n_test]] = True
    logger.info("glyphs: %d classes x %d instances from %d fonts", glyphs.num_classes, instances_per_class, len(glyphs.fonts))
    return RawDataset(
        glyphs.images[~is_test], glyphs.labels[~is_test], glyphs.images[is_test], glyphs.labels[is_test], glyphs.class_names, []
    )
