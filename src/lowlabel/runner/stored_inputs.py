"""Prepared data read from the job's storage, row by row, instead of from Ray's object store
(``runtime.inputs: storage``): for data larger than a node's memory.

Through the object store (the default, :mod:`lowlabel.runner.inputs`) every node holds one
whole copy of the arrays in memory (or Ray's disk-backed fallback). Here the driver copies the
prepared folder once to ``<runtime.storage_path>/inputs/<prepared digest>/`` (content-addressed:
a later job on the same data copies nothing; a ``COMPLETE`` marker written last, so a copy cut
off half-way is never read), and each worker opens the image arrays in place:

* a path (a shared mount, NFS/EFS): ``np.load(mmap_mode="r")`` — pages come and go with the
  kernel's page cache, so a worker's memory does not grow with the data;
* a URI (S3, GCS): :class:`StoredRows`, ranged reads through pyarrow's filesystem into a
  bounded LRU cache of blocks (``runtime.input_cache_mb`` per array and worker).

Labels, the split and the class info are small and read whole. Only the image arrays stream.
"""

from __future__ import annotations

import io
import json
import posixpath
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowlabel.data.prepared import PREPARED_FILES, PreparedData, prepared_digest
from lowlabel.data.splits import Split
from lowlabel.runner.storage import Storage

INPUTS_DIR = "inputs"
COMPLETE = "COMPLETE"
IMAGE_FILES = ("train_images.npy", "test_images.npy")
# Rows per ranged read: one block of about this many bytes (random access reads one block per
# row it misses; a smaller block wastes less of each read, a larger one makes fewer requests).
BLOCK_BYTES = 256 * 1024


@dataclass(frozen=True)
class StoredData:
    """A job's handle on prepared data staged on its storage (what the loop config carries)."""

    uri: str  # the staged folder: a path, or a URI of runtime.storage_path's scheme
    cache_bytes: int


def stage_prepared(storage_path: str, data_dir: str | Path, cache_bytes: int) -> tuple[StoredData, int]:
    """Copy ``data_dir``'s prepared files to the storage once; (the handle, bytes copied now)."""
    storage = Storage.parse(storage_path)
    digest = prepared_digest(data_dir)
    folder = storage.path(INPUTS_DIR, digest)
    uri = folder if storage.is_local else f"{storage.uri.rstrip('/')}/{INPUTS_DIR}/{digest}"
    handle = StoredData(uri, cache_bytes)
    if storage.exists(posixpath.join(folder, COMPLETE)):
        return handle, 0
    storage.filesystem.create_dir(folder, recursive=True)
    copied = 0
    for name in PREPARED_FILES:
        source = Path(data_dir) / name
        with source.open("rb") as reader, storage.filesystem.open_output_stream(posixpath.join(folder, name)) as writer:
            while chunk := reader.read(1 << 24):
                writer.write(chunk)
        copied += source.stat().st_size
    storage.write_bytes(posixpath.join(folder, COMPLETE), digest.encode())  # last: the copy is whole
    return handle, copied


def open_stored(handle: StoredData) -> PreparedData:
    """In a worker: the staged data, images in place (memory map or :class:`StoredRows`)."""
    storage = Storage.parse(handle.uri)
    local = Path(tempfile.mkdtemp(prefix="lowlabel-inputs-"))
    for name in PREPARED_FILES:
        if name not in IMAGE_FILES:
            (local / name).write_bytes(storage.read_bytes(storage.path(name)))

    def images(name: str) -> np.ndarray | StoredRows:
        if storage.is_local:
            return np.load(storage.path(name), mmap_mode="r")
        return StoredRows(handle.uri, name, handle.cache_bytes)

    return PreparedData(
        root=local,
        train_images=images("train_images.npy"),  # type: ignore[arg-type]
        train_labels=np.load(local / "train_labels.npy"),
        test_images=images("test_images.npy"),  # type: ignore[arg-type]
        test_labels=np.load(local / "test_labels.npy"),
        split=Split.from_json(local / "split.json"),
        info=json.loads((local / "info.json").read_text()),
    )


class StoredRows:
    """A read-only ``.npy`` array on a remote filesystem, indexed along its first axis like a
    memory map (an int, a slice or an index array), read in blocks of rows into an LRU cache of
    at most ``cache_bytes``. Picklable (the open file is not carried; it is reopened)."""

    def __init__(self, folder_uri: str, name: str, cache_bytes: int) -> None:
        self.folder_uri, self.name, self.cache_bytes = folder_uri, name, cache_bytes
        with self._open() as file:
            # The header (format 1.0 or 2.0) is at most 64 KiB + a few bytes: parse it from the head.
            stream = io.BytesIO(file.read_at(min(file.size(), (1 << 16) + 16), 0))
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read_header(stream)
        self.offset = stream.tell()
        if fortran:
            raise ValueError(f"{folder_uri}/{name}: Fortran-ordered arrays are not supported")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.rows_per_block = max(1, BLOCK_BYTES // max(1, self.row_bytes))
        self.max_blocks = max(1, cache_bytes // (self.rows_per_block * self.row_bytes))
        self._file: Any = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _open(self) -> Any:
        storage = Storage.parse(self.folder_uri)
        return storage.filesystem.open_input_file(storage.path(self.name))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_cache": OrderedDict()}

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def cached_bytes(self) -> int:
        return sum(block.nbytes for block in self._cache.values())

    def _block(self, number: int) -> np.ndarray:
        block = self._cache.get(number)
        if block is not None:
            self._cache.move_to_end(number)
            return block
        if self._file is None:
            self._file = self._open()
        first = number * self.rows_per_block
        rows = min(self.rows_per_block, self.shape[0] - first)
        raw = self._file.read_at(rows * self.row_bytes, self.offset + first * self.row_bytes)
        block = np.frombuffer(raw, dtype=self.dtype).reshape(rows, *self.shape[1:])
        self._cache[number] = block
        while len(self._cache) > self.max_blocks:
            self._cache.popitem(last=False)
        return block

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            row = int(index) + (self.shape[0] if index < 0 else 0)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"index {index} is out of bounds for {self.shape[0]} rows")
            return self._block(row // self.rows_per_block)[row % self.rows_per_block]
        rows = np.arange(self.shape[0])[index]
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for i, row in enumerate(rows):
            out[i] = self._block(int(row) // self.rows_per_block)[int(row) % self.rows_per_block]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
