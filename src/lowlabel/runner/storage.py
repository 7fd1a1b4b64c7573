"""Where Ray Train keeps a job's checkpoints: ``runtime.storage_path``.

Three kinds, one interface (pyarrow filesystems do the I/O):
- a local path — fine while every worker runs on this machine;
- a path mounted at the same place on every node (NFS, EFS, a cluster filesystem);
- an object-store URI (``s3://bucket/prefix``, ``gs://...``): S3-compatible stores through the
  standard ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` variables or an ``?endpoint_override=``
  query, credentials through the standard AWS chain.

On a multi-host cluster the driver proves, before any training, that every node reaches the
storage: it writes a marker there and a task on each node must read it back.
"""

from __future__ import annotations

import posixpath
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray

from lowlabel.errors import UserError, first_line

MARKER_DIR = ".lowlabel-storage-check"


class StorageError(UserError, RuntimeError):
    """``runtime.storage_path`` cannot hold this job's checkpoints; the message says why."""


@dataclass(frozen=True)
class Storage:
    """``runtime.storage_path`` resolved: ``uri`` as the user means it (local paths made
    absolute), ``filesystem`` + ``root`` (a path within it) for the I/O."""

    uri: str
    filesystem: pafs.FileSystem
    root: str

    @classmethod
    def parse(cls, storage_path: str) -> Storage:
        if "://" not in storage_path:
            absolute = str(Path(storage_path).expanduser().resolve())
            return cls(absolute, pafs.LocalFileSystem(), absolute)
        try:
            filesystem, root = pafs.FileSystem.from_uri(storage_path)
        except Exception as error:  # ArrowInvalid / OSError: unknown scheme, bad query, no SDK
            raise StorageError(f"runtime.storage_path={storage_path!r} is not a usable storage URI: {error}") from None
        return cls(storage_path, filesystem, root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run_config(self) -> dict[str, object]:
        """``RunConfig`` keyword arguments. A URI goes in as (path, filesystem): Ray refuses a
        scheme beside an explicit filesystem, and the filesystem carries the endpoint."""
        if self.is_local:
            return {"storage_path": self.root}
        return {"storage_path": self.root, "storage_filesystem": self.filesystem}

    def write_bytes(self, path: str, data: bytes) -> None:
        self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read()

    def checkpoints(self, run: str) -> list[str]:
        """The run's ``checkpoint_*`` folders, oldest first (Ray names them by timestamp)."""
        info = self.filesystem.get_file_info(pafs.FileSelector(self.path(run), allow_not_found=True))
        folders = [f.path for f in info if f.type == pafs.FileType.Directory and posixpath.basename(f.path).startswith("checkpoint_")]
        return sorted(folders, key=posixpath.basename)

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def remove_run(self, run: str) -> None:
        target = self.path(run)
        if self.exists(target):
            self.filesystem.delete_dir(target)

    def check_writable(self) -> None:
        """Write and read back a marker: a missing bucket, refused credentials or a read-only
        path fail here, before any worker starts, naming the setting."""
        marker = self.path(MARKER_DIR, secrets.token_hex(8))
        try:
            self.write_bytes(marker, b"ok")
            self.read_bytes(marker)
            self.filesystem.delete_file(marker)
        except Exception as error:  # pyarrow raises OSError/ArrowException subclasses per backend
            raise StorageError(f"runtime.storage_path={self.uri!r} cannot be written: {first_line(error)}") from None

    def check_visible_from_nodes(self, timeout_s: float = 120.0) -> None:
        """On a cluster of several hosts, every alive node must see what the driver writes.

        Each node re-parses ``uri`` in its own environment, as its Ray Train workers will: a
        path only this host has, or credentials only this host holds, fail here."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len({n.get("NodeManagerAddress") for n in nodes}) <= 1:
            return
        token = secrets.token_hex(8)
        marker = self.path(MARKER_DIR, token)
        try:
            self.write_bytes(marker, token.encode())
        except Exception as error:
            raise StorageError(f"runtime.storage_path={self.uri!r} cannot be written: {first_line(error)}") from None
        try:
            probes = {
                n["NodeManagerAddress"]: _read_marker.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(self.uri, marker)
                for n in nodes
            }
            seen = dict(zip(probes, ray.get(list(probes.values()), timeout=timeout_s)))
        finally:
            try:
                self.filesystem.delete_file(marker)
            except Exception:
                pass
        blind = {ip: answer for ip, answer in seen.items() if answer != token}
        if blind:
            detail = "; ".join(f"node {ip}: {answer}" for ip, answer in sorted(blind.items()))
            raise StorageError(
                f"runtime.storage_path={self.uri!r} is not shared by every node of the cluster ({detail}). "
                "Checkpoints must be reachable from all nodes: use an object store URI (s3://bucket/prefix) "
                "or a filesystem mounted at the same path on every node (NFS/EFS)"
            )


@ray.remote(num_cpus=0, max_retries=0)
def _read_marker(uri: str, marker: str) -> str:
    try:
        return Storage.parse(uri).read_bytes(marker).decode()
    except Exception as error:
        return f"cannot read {marker}: {first_line(error)}"
