"""Outputs written whole or not at all, and durable once renamed into place.

Every file a stage hands on (prepared data, encoders, metrics, reports) is written under a
temporary name in its target folder, flushed to disk (fsync), renamed over the target, and the
folder's entry fsynced, so neither a killed process nor a power cut leaves half a file under
the real name. A failed write removes its temporary file or folder: nothing is left behind,
and a full disk is reported as one :class:`OutputWriteError` that names the output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lowlabel.errors import UserError


class OutputWriteError(OSError, UserError):
    """An output could not be written (full disk, read-only or missing permission)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(target: Path) -> None:
    """Remove the temporaries a killed writer of ``target`` left (SIGKILL, power cut): they carry
    their writer's pid, and only those of dead processes go."""
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        pid = leftover.name.removeprefix(f".{target.name}.tmp-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _write_error(path: Path, error: OSError) -> OutputWriteError:
    # A file written inside an atomic folder failed: name the folder (the output), with the cause.
    if isinstance(error, OutputWriteError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    reason = error.strerror or str(error)
    return OutputWriteError(error.errno, f"cannot write {path}: {reason}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the content to ``tmp``; it appears at ``path`` only when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _sweep_stale(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A folder written under a temporary name and swapped in only when complete."""
    target = Path(target)
    _sweep_stale(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as error:
        raise _write_error(target, error) from error
    try:
        yield tmp
        _fsync_tree(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)  # the previous output stays rather than none
            raise
        _fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise _write_error(target, error) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
