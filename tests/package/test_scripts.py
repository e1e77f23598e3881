"""The set-up scripts: scripts/_venv.sh installs only when what pip reads has changed (issue 24),
saying so in one line, with pip's whole output only when the install fails.

Run on a copy of the script beside a one-module project of its own (no dependencies), so
that what it installs, and when, can be watched without touching the repository's .venv.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "venvprobe"
version = "1.0"

[project.optional-dependencies]
extra = []
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", project / "scripts" / "_venv.sh")
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "setup.py").write_text("from setuptools import setup\n\nsetup()\n")
    (project / "venvprobe").mkdir()
    (project / "venvprobe" / "__init__.py").write_text("")
    return project


def _source(project: Path, extras: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["VEHICLENET_EXTRAS"] = extras
    return subprocess.run(["bash", "-c", f"source {project / 'scripts' / '_venv.sh'}"], env=env,
                          capture_output=True, text=True, timeout=600)


def _installed(project: Path) -> float:
    """When the project's editable install was last written (its dist-info's mtime)."""
    (info,) = (project / ".venv").glob("lib/python*/site-packages/venvprobe-1.0.dist-info")
    return (info / "RECORD").stat().st_mtime_ns


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="the set-up scripts are bash")
def test_the_package_is_installed_only_when_what_pip_reads_changed(tmp_path):
    project = _project(tmp_path)
    first = _source(project)
    assert first.returncode == 0, first.stderr
    # One line, not pip's or setuptools' warnings (those stay in the log).
    assert first.stdout == "" and first.stderr.splitlines() == [
        "setting up .venv: installing the package and its dependencies (log: .venv/install.log)"], first.stderr
    installed = _installed(project)

    again = _source(project)  # nothing changed: nothing installed, nothing printed
    assert again.returncode == 0 and again.stdout == again.stderr == "", again.stderr
    assert _installed(project) == installed

    with_extra = _source(project, "[extra]")  # extras not installed yet: installed
    assert with_extra.returncode == 0, with_extra.stderr
    assert _installed(project) != installed
    installed = _installed(project)
    plain = _source(project)  # an install with extras holds everything a plain one needs
    assert plain.returncode == 0 and plain.stdout == plain.stderr == "", plain.stderr
    assert _installed(project) == installed

    (project / "pyproject.toml").write_text(PYPROJECT.replace('version = "1.0"', 'version = "1.0"\n# changed'))
    changed = _source(project)
    assert changed.returncode == 0, changed.stderr
    assert _installed(project) != installed


@pytest.mark.skipif(shutil.which("bash") is None, reason="the set-up scripts are bash")
def test_a_failed_install_shows_pips_output_and_installs_nothing_next_time(tmp_path):
    project = _project(tmp_path)
    (project / "pyproject.toml").write_text(PYPROJECT.replace('version = "1.0"', 'version = "not a version"'))
    failed = _source(project)
    assert failed.returncode == 1
    assert "not a version" in failed.stderr and "setting up .venv failed" in failed.stderr, failed.stderr
    assert not list((project / ".venv").glob(".vehiclenet-installed*"))  # the next run tries again
