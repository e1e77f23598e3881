"""The wheel as a user installs it (issue 15, must-show 2).

The wheel is built from a copy of the source tree and installed with ``--no-deps`` into
a fresh virtual environment. That environment reaches this one's dependencies (MindSpore
and the rest) through a ``.pth`` path line, so nothing is downloaded: a path line only adds
a folder to ``sys.path``, it does not run the ``.pth`` files in it, so this environment's
editable install of the repository stays inactive there. Every command then runs from a
folder outside the repository, without PYTHONPATH, and checks it got the installed copy.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _not_source() -> List[str]:
    """Names a clean checkout lacks: .git and what .gitignore lists (.venv, build/, checkpoints, ...).

    The build must see the tree as a user's checkout would: a stale build/lib would even end
    up in the wheel, and a checkpoint lying in the folder would cost a 300 MB copy.
    """
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [".git"] + [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _source_version() -> str:
    """``__version__`` as written in vehiclenet/__init__.py, read as text (the one version source)."""
    match = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "vehiclenet" / "__init__.py").read_text(), re.M)
    assert match, "vehiclenet/__init__.py has no __version__ = \"...\" line"
    return match.group(1)


def _dependency_folders() -> List[str]:
    """This interpreter's site-packages folders (MindSpore, numpy, pip, ... live there)."""
    folders = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    assert folders, f"no site-packages folder on sys.path: {sys.path}"
    return folders


def _run(cmd: List[str], cwd: Path, env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, its output captured as text (asserted on by the caller)."""
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Dict[str, object]:
    """Build the wheel, install it into a fresh venv; return the paths and the environment to run it in."""
    # The build uses this environment's setuptools (no build isolation: no index needed).
    setuptools_version, pip_version = metadata.version("setuptools"), metadata.version("pip")
    if int(setuptools_version.split(".")[0]) < 77:
        pytest.fail(f"setuptools {setuptools_version} cannot build pyproject.toml's licence expression: "
                    "install the test extra (pip install -e '.[test]' brings setuptools>=77)")
    if int(pip_version.split(".")[0]) < 25:
        pytest.fail(f"pip {pip_version} does not print License-Expression in `pip show`: "
                    "scripts/_venv.sh installs pip>=25")

    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*_not_source()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", GLOG_v="3")

    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  str(source), "-w", str(base / "dist")], cwd=base, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("vehiclenet-*.whl")

    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                           text=True, env=env).strip())
    # Appended after the venv's own site-packages, so what the wheel installs comes first.
    (purelib / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in _dependency_folders()))
    # --ignore-installed: this environment's editable vehiclenet is visible through the path
    # line; pip must neither count it as installed nor try to uninstall it.
    done = _run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                cwd=base, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    env["VEHICLENET_HOME"] = str(base / "home")  # the kernels compiled here, not in the user's cache
    return {"wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "cwd": elsewhere, "env": env}


def test_wheel_holds_only_the_package_its_data_and_the_licence(installed):
    version = _source_version()
    wheel = installed["wheel"]
    assert wheel.name == f"vehiclenet-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = {name.split("/")[0] for name in names}
        assert top_level == {"vehiclenet", f"vehiclenet-{version}.dist-info"}, top_level
        record = archive.read(f"vehiclenet-{version}.dist-info/RECORD").decode()
        assert not re.search(r"^(hub_conf|mindspore_hub_conf)\.py,", record, re.M)
        # The manifest is a link in the repository; the wheel carries its content.
        assert archive.read("vehiclenet/assets.json") == (ROOT / "assets.json").read_bytes()
        for source in ("vehiclenet/csrc/cpu_kernels.cc", "vehiclenet/csrc/retrieval_kernels.c"):
            assert archive.read(source) == (ROOT / source).read_bytes()
        assert archive.read(f"vehiclenet-{version}.dist-info/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = archive.read(f"vehiclenet-{version}.dist-info/METADATA").decode()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert re.search(r"^License-Expression: Apache-2\.0$", metadata, re.M)
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.M)
    assert re.search(r"^Requires-Dist: mindspore==2\.8\.0$", metadata, re.M)


def test_installed_commands_work_from_another_folder(installed):
    """vehiclenet --version, verify --help and create_network(pretrained=False), from the installed copy."""
    venv, cwd, env = installed["venv"], installed["cwd"], installed["env"]
    version = _source_version()
    proc = _run([str(venv / "bin" / "vehiclenet"), "--version"], cwd, env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"vehiclenet {version}", proc.stdout + proc.stderr
    proc = _run([str(venv / "bin" / "vehiclenet"), "verify", "--help"], cwd, env)
    assert proc.returncode == 0 and "usage: vehiclenet verify" in proc.stdout, proc.stderr[-2000:]

    script = ("import importlib.metadata, importlib.resources, os, vehiclenet\n"
              "net = vehiclenet.create_network(pretrained=False)\n"
              "import mindspore\n"
              "print(isinstance(net, mindspore.nn.Cell))\n"
              "print(vehiclenet.__file__)\n"
              "print(importlib.metadata.version('vehiclenet'))\n"
              "manifest = importlib.resources.files('vehiclenet') / 'assets.json'\n"
              "print(manifest.is_file(), os.path.islink(str(manifest)))\n")
    proc = _run([str(installed["python"]), "-c", script], cwd, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    is_cell, package_file, dist_version, manifest = proc.stdout.splitlines()[-4:]
    assert is_cell == "True"
    assert Path(package_file) == installed["purelib"] / "vehiclenet" / "__init__.py"  # not the repository
    assert dist_version == version
    assert manifest == "True False"  # a real file, not the repository's link


def test_hub_files_are_not_installed(installed):
    for module in ("hub_conf", "mindspore_hub_conf"):
        proc = _run([str(installed["python"]), "-c", f"import {module}"], installed["cwd"], installed["env"])
        assert proc.returncode == 1 and f"No module named '{module}'" in proc.stderr, proc.stderr[-2000:]
    assert not list(installed["purelib"].glob("*hub_conf*"))


def test_pip_show_names_the_licence(installed):
    proc = _run([str(installed["python"]), "-m", "pip", "show", "vehiclenet"], installed["cwd"], installed["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert fields.get("License-Expression") == "Apache-2.0", proc.stdout
    assert fields.get("Version") == _source_version()
    assert Path(fields["Location"]) == installed["purelib"], proc.stdout  # the wheel's copy, not the editable one
