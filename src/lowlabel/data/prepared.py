"""The prepared-data folder the prepare stage writes and every later stage reads.

Layout: ``{train,test}_images.npy`` (uint8 N,H,W,C), ``{train,test}_labels.npy`` (int64),
``split.json`` and ``info.json`` (class names, per-channel mean/std of the training images).
Images are opened memory-mapped, so a Ray worker touches only the rows of its own shard.

The prepare stage writes image arrays a chunk of rows at a time (:class:`NpyRowWriter`) and reads
them back with plain reads (:class:`NpyRows`), so its memory does not grow with the dataset; the
files equal what ``np.save`` writes for the same arrays, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowlabel.atomic import atomic_dir
from lowlabel.data.splits import Split
from lowlabel.errors import UserError


class PreparedDataError(FileNotFoundError, UserError):
    pass


PREPARED_FILES = ("info.json", "split.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy")


def prepared_digest(root: str | Path) -> str:
    """sha256 (16 hex digits) over the names, sizes and bytes of the prepared files: the split
    manifest, class info and the four arrays. The same bytes give the same digest on any
    machine, and it equals lowlabel.runner.jobs.files_fingerprint of a folder holding only
    these files (the form the Ray run names use)."""
    digest = hashlib.sha256()
    for name in PREPARED_FILES:
        file = Path(root) / name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def save_arrays(folder: Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray) -> None:
    """The four arrays of a prepared folder, written into ``folder`` (an atomic_dir's temporary)."""
    np.save(folder / "train_images.npy", np.ascontiguousarray(train_images, dtype=np.uint8))
    np.save(folder / "train_labels.npy", train_labels.astype(np.int64))
    np.save(folder / "test_images.npy", np.ascontiguousarray(test_images, dtype=np.uint8))
    np.save(folder / "test_labels.npy", test_labels.astype(np.int64))


def save_split_info(folder: Path, split: Split, info: dict[str, Any]) -> None:
    split.to_json(folder / "split.json")
    (folder / "info.json").write_text(json.dumps(info, indent=1))


def write_prepared(
    out_dir: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    split: Split,
    info: dict[str, Any],
) -> None:
    with atomic_dir(out_dir) as tmp:
        save_arrays(tmp, train_images, train_labels, test_images, test_labels)
        save_split_info(tmp, split, info)


# --------------------------------------------------------------------------- streamed .npy


def npy_header(shape: tuple[int, ...], dtype: np.dtype | type = np.uint8) -> bytes:
    """The header ``np.save`` writes for a C-order array of ``shape``/``dtype`` (format 1.0, or
    2.0 when 1.0 cannot hold it, as np.save chooses). numpy pads it for 21 digits of the first
    dimension, so its length does not depend on the row count."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(int(n) for n in shape)}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header longer than format 1.0 allows
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


class NpyRowWriter:
    """Rows appended in order to a .npy preallocated (sparse) for ``capacity`` rows: only the
    rows of one ``write`` call are in memory. ``close`` truncates the file to the rows written and
    rewrites the header in place, so the file equals ``np.save`` of those rows stacked, with no
    copy, whether or not every row came (e.g. corrupt images skipped)."""

    def __init__(self, path: Path, capacity: int, row_shape: tuple[int, ...], dtype: np.dtype | type = np.uint8) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.dtype = np.dtype(dtype)
        self.capacity = int(capacity)
        self.count = 0
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        header = npy_header((self.capacity, *self.row_shape), self.dtype)
        self._offset = len(header)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        try:
            self._file.write(header)
            self._file.truncate(self._offset + self.capacity * self._row_bytes)
        except BaseException:
            self._file.close()
            raise

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        if self.count + len(rows) > self.capacity:
            raise ValueError(f"{self.path.name}: {self.count + len(rows)} rows exceed the capacity {self.capacity}")
        if rows.size:
            self._file.write(memoryview(rows.reshape(-1)).cast("B"))
        self.count += len(rows)

    def close(self) -> None:
        """Finish the file: the header for the rows written, nothing after them."""
        if self._file.closed:
            return
        try:
            header = npy_header((self.count, *self.row_shape), self.dtype)
            if len(header) != self._offset:  # numpy pads the header for this; kept honest
                raise ValueError(f"{self.path.name}: npy header changed length ({self._offset} -> {len(header)})")
            self._file.seek(0)
            self._file.write(header)
            self._file.truncate(self._offset + self.count * self._row_bytes)
        finally:
            self._file.close()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NpyRows:
    """Rows of a C-order .npy read with plain file reads, not a memory map, so what is read stays
    in the page cache rather than in this process's resident memory. ``rows[i:j]`` and
    ``rows[index_array]`` return new arrays."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            self._offset = f.tell()
        if fortran_order or not shape:
            raise ValueError(f"{self.path}: expected a C-order array of rows, got shape {shape} (fortran_order={fortran_order})")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("NpyRows: slices with a step are not supported")
            index = np.arange(start, max(start, stop))
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"NpyRows: index out of range for {len(self)} rows")
        out = np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        if not out.size:
            return out
        flat = memoryview(out.reshape(-1).view(np.uint8))
        with self.path.open("rb", buffering=0) as f:
            j = 0
            while j < idx.size:  # one read per run of consecutive rows
                k = j + 1
                while k < idx.size and idx[k] == idx[k - 1] + 1:
                    k += 1
                part = flat[j * self._row_bytes : k * self._row_bytes]
                got = os.preadv(f.fileno(), [part], self._offset + int(idx[j]) * self._row_bytes)
                if got != len(part):
                    raise OSError(f"{self.path}: short read ({got} of {len(part)} bytes); the file is truncated")
                j = k
        return out


# --------------------------------------------------------------------------- normalisation


def channel_stats(
    images: np.ndarray | NpyRows,
    max_images: int = 20000,
    seed: int = 0,
    *,
    rows: list[int] | np.ndarray | None = None,
    chunk_bytes: int = 16 << 20,
) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0,1] units, from a fixed random sample (normalisation constants)
    of ``images[rows]`` (of every image when ``rows`` is None).

    The float64 sample is made and reduced about ``chunk_bytes`` at a time, so memory does not
    grow with ``max_images`` or the image size, and the result equals, bit for bit, numpy's
    ``mean``/``std`` over the whole sample at once (this function's earlier, one-shot form, kept
    for samples under ``chunk_bytes``): numpy sums an (M, C>1) array along axis 0 row after row,
    which a carried sum replays, and an (M, 1) one pairwise over the whole column, whose recursion
    is replayed down to chunk-sized leaves. tests/test_prepare_stream.py checks the equality, so a
    numpy that sums differently fails there.
    """
    n = len(images) if rows is None else len(rows)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(n)[:max_images])
    if rows is not None:
        pick = np.asarray(rows, dtype=np.int64)[pick]
    h, w, c = (int(d) for d in images.shape[1:])
    per_image = h * w * c * 8
    if pick.size * per_image <= chunk_bytes:
        flat = (images[pick].astype(np.float64) / 255.0).reshape(-1, c)
        return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()

    count = pick.size * h * w  # rows of the (M, C) matrix the one-shot form reduces

    def floats(first: int, last: int) -> np.ndarray:
        return (images[pick[first:last]].astype(np.float64) / 255.0).reshape(-1, c)

    if c > 1:
        step = max(1, chunk_bytes // per_image)

        def total(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
            acc: np.ndarray | None = None
            for first in range(0, pick.size, step):
                block = transform(floats(first, first + step))
                acc = np.add.reduce(block, axis=0) if acc is None else np.add.reduce(np.concatenate([acc[None], block]), axis=0)
            assert acc is not None
            return acc

    else:
        leaf = max(8, chunk_bytes // 8)
        pixels = h * w

        def pairwise(transform: Callable[[np.ndarray], np.ndarray], start: int, size: int) -> np.float64:
            if size <= leaf:  # one inner loop of numpy's: its pairwise sum of exactly this run
                first, last = start // pixels, (start + size - 1) // pixels + 1
                run = floats(first, last).reshape(-1)[start - first * pixels : start - first * pixels + size]
                return np.add.reduce(transform(run), initial=0.0)
            half = size // 2
            half -= half % 8  # numpy's split point (pairwise_sum in loops_utils.h.src)
            return pairwise(transform, start, half) + pairwise(transform, start + half, size - half)

        def total(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
            return np.array([pairwise(transform, 0, count)])

    mean = total(lambda block: block) / count
    # In place: the same values as numpy's (x - mean) ** 2 temporaries, without two more blocks.
    std = np.sqrt(total(lambda block: np.square(np.subtract(block, mean, out=block), out=block)) / count)
    return mean.tolist(), np.maximum(std, 1e-3).tolist()


@dataclass
class PreparedData:
    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    split: Split
    info: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        absent = [name for name in PREPARED_FILES if not (root / name).is_file()]
        if absent:
            raise PreparedDataError(f"{root}: prepared data incomplete, missing {absent}; run the prepare stage (dvc repro prepare)")
        return cls(
            root=root,
            train_images=np.load(root / "train_images.npy", mmap_mode="r"),
            train_labels=np.load(root / "train_labels.npy"),
            test_images=np.load(root / "test_images.npy", mmap_mode="r"),
            test_labels=np.load(root / "test_labels.npy"),
            split=Split.from_json(root / "split.json"),
            info=json.loads((root / "info.json").read_text()),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"train_images": self.train_images, "train_labels": self.train_labels, "test_images": self.test_images, "test_labels": self.test_labels}

    @property
    def in_chans(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def mean(self) -> list[float]:
        return self.info["mean"]

    @property
    def std(self) -> list[float]:
        return self.info["std"]

    def novel_pool_labels(self) -> np.ndarray:
        """Labels of the few-shot pool: novel test images, then novel training images
        (``data.novel_pool: all``), the order the fewshot stage embeds them in."""
        test = self.test_labels[np.asarray(self.split.test_novel, dtype=np.int64)]
        return np.concatenate([test, self.train_labels[np.asarray(self.split.train_novel, dtype=np.int64)]])

    def base_label(self, labels: np.ndarray) -> np.ndarray:
        """Original class ids -> 0..B-1 in ``split.base_classes`` order (for classifiers)."""
        lookup = {c: i for i, c in enumerate(self.split.base_classes)}
        return np.array([lookup[int(c)] for c in labels], dtype=np.int64)
