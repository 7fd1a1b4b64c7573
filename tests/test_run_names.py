"""A Ray run's name decides what a killed stage resumes: the same params, code and inputs give
the same name; a change to any of them gives another (never a resume of mixed state)."""

from __future__ import annotations

import shutil

import numpy as np

from lowlabel.config import Params
from lowlabel.runner import jobs


def names(params: Params, prepared, init=None) -> tuple[str, str]:
    _, pretrain = jobs.pretrain_job(params, "simclr", inputs=(prepared,))
    _, semisup = jobs.semisup_job(params, "fixmatch", init, inputs=(prepared,))
    return pretrain, semisup


def test_run_names_follow_params_code_and_inputs(tmp_path, tiny_prepared, monkeypatch):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    params = Params()
    before = names(params, prepared)
    assert names(params, prepared) == before
    assert before[0].startswith("pretrain-simclr-") and before[1].startswith("semisup-fixmatch-")

    # params
    assert names(params.model_copy(update={"seed": params.seed + 1}), prepared) != before
    # the prepared data: one pixel of one image
    images = np.load(prepared / "train_images.npy")
    images[3, 2, 2, 0] ^= 1
    np.save(prepared / "train_images.npy", images)
    changed = names(params, prepared)
    assert changed[0] != before[0] and changed[1] != before[1]
    # the starting encoder of semisup
    encoder = tmp_path / "encoder.pt"
    encoder.write_bytes(b"one")
    with_init = names(params, prepared, str(encoder))
    encoder.write_bytes(b"two")
    assert names(params, prepared, str(encoder))[1] != with_init[1]
    # the code
    monkeypatch.setattr(jobs, "code_fingerprint", lambda: "edited")
    assert names(params, prepared) != changed


def test_the_code_fingerprint_covers_the_package_sources(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    (package / "sub" / "b.cpython-311.pyc").write_bytes(b"compiled")
    first = jobs.files_fingerprint(package, suffix=".py")
    (package / "sub" / "b.cpython-311.pyc").write_bytes(b"recompiled")  # caches do not count
    assert jobs.files_fingerprint(package, suffix=".py") == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert jobs.files_fingerprint(package, suffix=".py") != first
