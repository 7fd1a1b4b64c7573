"""`./pipeline`'s system packages: only setup calls apt, the glyph fonts only when in use.

Each test runs the real script in a copy of the repository's entry files (the venv linked in,
so the stack counts as installed) with fake ``apt-get``, ``sudo`` and ``dpkg-query`` first on
PATH: dpkg reports nothing installed, and every apt call is recorded instead of run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lowlabel.data.glyphs import GLYPH_FONT_PACKAGES

REPO = Path(__file__).resolve().parents[1]
FAKE = {
    "apt-get": 'echo "apt-get $*" >> "$FAKE_APT_LOG"',
    "sudo": 'echo "sudo $*" >> "$FAKE_APT_LOG"; exec "$@"',
    "dpkg-query": "exit 1",  # nothing is installed
}


@pytest.fixture()
def sandbox(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("pipeline", "pyproject.toml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    stamp = REPO / ".venv" / ".lowlabel-installed"
    if not stamp.is_file():
        pytest.skip("needs the set-up .venv (./pipeline setup)")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    log = tmp_path / "apt.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "LOWLABEL_SKIP_APT")}
    env |= {"PATH": f"{fake}{os.pathsep}{env['PATH']}", "FAKE_APT_LOG": str(log)}

    def run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["./pipeline", *args], cwd=root, env=env | (extra_env or {}), capture_output=True, text=True, timeout=300)

    def installed() -> list[set[str]]:
        """The package sets of the recorded `apt-get install` calls."""
        lines = log.read_text().splitlines() if log.exists() else []
        return [{w for w in line.split() if not w.startswith("-")} - {"apt-get", "install"} for line in lines if line.startswith("apt-get install")]

    # The copy's pyproject.toml is the repository's: setup must find the stack current, or it
    # would reinstall into the shared venv.
    assert run("setup", "--help").returncode == 0
    return root, run, installed, log


def test_the_font_list_has_one_source():
    script = (REPO / "pipeline").read_text()
    assert "fonts-" not in script, "./pipeline lists font packages: read them from lowlabel.data.glyphs.GLYPH_FONT_PACKAGES"
    assert "GLYPH_FONT_PACKAGES" in script


def test_setup_installs_fashion_mnist_and_no_fonts(sandbox):
    _, run, installed, _ = sandbox
    proc = run("setup")
    assert proc.returncode == 0, proc.stderr
    assert installed() == [{"dataset-fashion-mnist"}]


def test_setup_installs_the_fonts_with_glyphs_or_when_params_use_them(sandbox):
    root, run, installed, log = sandbox
    assert run("setup", "--glyphs").returncode == 0
    assert installed() == [{"dataset-fashion-mnist", *GLYPH_FONT_PACKAGES}]
    log.unlink()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["source"] = "glyphs"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run("setup").returncode == 0
    assert installed() == [{"dataset-fashion-mnist", *GLYPH_FONT_PACKAGES}]


def test_other_commands_never_call_apt(sandbox):
    root, run, _, log = sandbox
    assert run("preset").returncode == 0
    assert run("preset", "glyphs").returncode == 0  # writes the copy's params.yaml
    assert yaml.safe_load((root / "params.yaml").read_text())["data"]["source"] == "glyphs"
    run("repro", "--dry")  # not a DVC repository: dvc fails, after the setup check
    run("fetch", str(root / "no-results"))
    assert run("test", "--version").returncode == 0
    assert not log.exists(), log.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the CI branch installs as root only")
def test_ci_test_run_installs_the_glyph_fonts(sandbox):
    _, run, installed, _ = sandbox
    proc = run("test", "--version", extra_env={"CI": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {*GLYPH_FONT_PACKAGES} in installed()
