"""runtime.storage_path: local paths and an S3-compatible object store (moto's server), through one interface."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from conftest import make_bucket

from lowlabel.runner.launch import latest_checkpoint
from lowlabel.runner.storage import Storage, StorageError


def test_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage.parse(".ray/results")
    assert storage.is_local and storage.uri == str(tmp_path / ".ray" / "results") == storage.root
    assert storage.run_config() == {"storage_path": storage.uri}


def test_unwritable_local_path_names_the_setting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a directory cannot be made under a file, even by root
    with pytest.raises(StorageError, match=rf"runtime.storage_path='{blocker}/ckpt' cannot be written"):
        Storage.parse(str(blocker / "ckpt")).check_writable()


def test_s3_uri_round_trip_list_and_remove(s3_env):
    make_bucket("store-basic")
    storage = Storage.parse("s3://store-basic/prefix")
    assert not storage.is_local and storage.root == "store-basic/prefix"
    # Ray wants (path without scheme, filesystem) for a URI.
    assert storage.run_config()["storage_path"] == "store-basic/prefix"
    storage.check_writable()
    for name in ("checkpoint_2026-01-02_00-00-00.000000", "checkpoint_2026-01-01_00-00-00.000000"):
        storage.write_bytes(storage.path("run", name, "state.pt"), b"x")
    storage.write_bytes(storage.path("run", "other.json"), b"{}")
    assert [p.rsplit("/", 1)[1] for p in storage.checkpoints("run")] == [
        "checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"]
    assert storage.checkpoints("absent") == []
    storage.remove_run("run")
    assert storage.checkpoints("run") == []
    storage.remove_run("run")  # nothing there: no error


def test_missing_bucket_fails_before_training(s3_env):
    with pytest.raises(StorageError, match=r"runtime.storage_path='s3://no-such-bucket/x' cannot be written: .*"):
        Storage.parse("s3://no-such-bucket/x").check_writable()


def test_bad_uri_names_the_setting():
    with pytest.raises(StorageError, match=r"runtime.storage_path='nosuchscheme://b/x' is not a usable storage URI"):
        Storage.parse("nosuchscheme://b/x")


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_checkpoint_skips_cut_off_files_and_refuses_code_carrying_ones(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_env")
        make_bucket("store-latest")
        storage = Storage.parse("s3://store-latest/p")
    else:
        storage = Storage.parse(str(tmp_path / "ray"))

    def put(folder: str, blob: bytes) -> None:
        storage.write_bytes(storage.path("job", folder, "state.pt"), blob)

    good = io.BytesIO()
    torch.save({"epoch": 1, "w": torch.ones(2)}, good)
    put("checkpoint_2026-01-01_00-00-00.000000", good.getvalue())
    put("checkpoint_2026-01-03_00-00-00.000000", good.getvalue()[:20])  # cut off mid-write
    found = latest_checkpoint(storage, "job")
    assert found is not None and found.path.endswith("checkpoint_2026-01-01_00-00-00.000000")
    assert latest_checkpoint(storage, "nothing-here") is None
    # A file no training wrote (it carries code): the stage stops naming it, nothing is run.
    put("checkpoint_2026-01-02_00-00-00.000000", pickle.dumps(_RunsCode()))
    with pytest.raises(StorageError, match=r"checkpoint_2026-01-02_00-00-00\.000000/state\.pt cannot be loaded: it holds code"):
        latest_checkpoint(storage, "job")
