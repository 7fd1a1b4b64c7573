"""Outputs appear whole or not at all; a failed write leaves the previous output and no temporary."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from lowlabel.atomic import OutputWriteError, atomic_dir, atomic_write, atomic_write_text
from lowlabel.models.store import atomic_torch_save


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    atomic_write_text(target, "old\n")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError) as raised:
        atomic_write(target, fail)
    assert str(raised.value) == f"cannot write {target}: No space left on device"
    assert raised.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert names(target.parent) == ["metrics.json"]


def test_a_failed_folder_write_keeps_the_old_folder_and_names_it(tmp_path):
    target = tmp_path / "models" / "simclr"
    with atomic_dir(target) as folder:
        atomic_torch_save({"w": torch.ones(2)}, folder / "encoder.pt")
    with pytest.raises(OutputWriteError) as raised, atomic_dir(target) as folder:
        (folder / "encoder.pt").write_bytes(b"partial")
        atomic_write(folder / "classifier.pt", lambda tmp: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    # The folder is the output: the message names it, with the root cause.
    assert str(raised.value) == f"cannot write {target}: Disk quota exceeded"
    assert torch.equal(torch.load(target / "encoder.pt", weights_only=True)["w"], torch.ones(2))
    assert names(target.parent) == ["simclr"]


def test_any_error_in_a_folder_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "prepared"
    with pytest.raises(KeyError), atomic_dir(target) as folder:
        (folder / "a.npy").write_bytes(b"x")
        raise KeyError("boom")
    assert names(tmp_path) == []


def test_a_folder_replaces_the_previous_one_whole(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as folder:
        (folder / "a").write_text("1")
        (folder / "b").write_text("1")
    with atomic_dir(target) as folder:
        (folder / "a").write_text("2")
    assert names(target) == ["a"] and (target / "a").read_text() == "2"
    assert names(tmp_path) == ["prepared"]


def test_temporaries_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / f".prepared.tmp-{pid}-abc").mkdir()
    (tmp_path / f".prepared.tmp-{pid}-abc" / "train_images.npy").write_bytes(b"half")
    (tmp_path / f".metrics.json.tmp-{pid}").write_text("half")
    alive = tmp_path / f".prepared.tmp-{os.getppid()}-xyz"  # a live writer's: kept
    alive.mkdir()
    with atomic_dir(tmp_path / "prepared") as folder:
        (folder / "a").write_text("1")
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert names(tmp_path) == sorted([alive.name, "metrics.json", "prepared"])
