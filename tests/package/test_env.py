"""vehiclenet.env: every VEHICLENET_* variable declared and read in one module, the table of docs/caches.md current."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.http_server import subprocess_env
from vehiclenet.model import cpu_kernels
from vehiclenet import env, native
from vehiclenet.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vehiclenet"


def test_readme_table_is_the_declarations():
    """docs/caches.md's table is generated from the declarations: same variables, defaults and meanings."""
    readme = (REPO / "docs" / "caches.md").read_text(encoding="utf-8")
    assert env.markdown_table() in readme, "docs/caches.md's variable table is stale: paste `python -m vehiclenet.env`"
    rows = re.findall(r"^\| `(VEHICLENET_[A-Z_]+)` \| ([^|]*) \|", readme, re.MULTILINE)
    assert [name for name, _ in rows] == list(env.VARIABLES)
    for name, shown in rows:  # a default shown as a value is the one the module applies when unset
        var = env.VARIABLES[name]
        if var.default:
            assert shown.strip() == f"`{var.default}`"
            assert env.default(name) == var.parse(name, shown.strip().strip("`"))


def _package_sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "env.py")


def test_no_module_but_env_reads_a_vehiclenet_variable():
    """No os.environ / os.getenv on a line naming a VEHICLENET_ variable (literal or constant) outside env.py."""
    offenders = []
    for path in _package_sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                text = lines[node.lineno - 1]
                if re.search(r"VEHICLENET_|\bENV_[A-Z_]+\b|\benv\.[A-Z_]+\b", text):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {text.strip()}")
    assert not offenders, "read these through vehiclenet.env:\n" + "\n".join(offenders)


def test_every_variable_the_package_names_is_declared():
    named = set()
    for path in _package_sources():
        named |= set(re.findall(r"\bVEHICLENET_[A-Z][A-Z_]*[A-Z]\b", path.read_text(encoding="utf-8")))
    assert named - set(env.VARIABLES) == set()


@pytest.mark.parametrize("name, bad, message", [
    ("VEHICLENET_OFFLINE", "perhaps", "is not understood; use 1 or 0"),
    ("VEHICLENET_CPU_KERNELS", "maybe", "is not understood; use 1 or 0"),
    ("VEHICLENET_TIMEOUT", "soon", "give READ or CONNECT,READ in seconds"),
    ("VEHICLENET_TIMEOUT", "0", "give READ or CONNECT,READ in seconds"),
    ("VEHICLENET_RETRIES", "2.5", "is not a whole number"),
    ("VEHICLENET_RETRIES", "-1", "must be at least 0"),
    ("VEHICLENET_BACKOFF", "fast", "is not a number of seconds"),
    ("VEHICLENET_LOCK_TIMEOUT", "-3", "must not be negative"),
    ("VEHICLENET_MAX_PIXELS", "lots", "is not a whole number"),
    ("VEHICLENET_MAX_PIXELS", "0", "must be at least 1"),
])
def test_a_bad_value_is_a_usage_error_naming_the_variable(monkeypatch, name, bad, message):
    monkeypatch.setenv(name, bad)
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        env.value(name)
    assert str(err.value).startswith(f"{name}={bad!r}")


def test_values_are_read_at_each_call(monkeypatch, tmp_path):
    monkeypatch.delenv("VEHICLENET_TIMEOUT", raising=False)
    assert env.timeouts() == (10.0, 60.0)
    monkeypatch.setenv("VEHICLENET_TIMEOUT", "4")
    assert env.timeouts() == (4.0, 4.0)
    monkeypatch.setenv("VEHICLENET_TIMEOUT", "30")
    assert env.timeouts() == (10.0, 30.0)  # a lone READ keeps the default connect timeout
    monkeypatch.setenv("VEHICLENET_MAX_PIXELS", "40_000")
    assert env.max_pixels() == 40000
    monkeypatch.setenv("VEHICLENET_HOME", str(tmp_path / "first"))
    assert env.cache_dir() == tmp_path / "first"
    monkeypatch.setenv("VEHICLENET_HOME", "  ")  # blank is unset: the platform's folder
    import platformdirs

    assert env.cache_dir() == Path(platformdirs.user_cache_dir("vehiclenet", appauthor=False))


def test_kernel_cache_follows_vehiclenet_home(monkeypatch, tmp_path):
    monkeypatch.delenv("VEHICLENET_KERNEL_CACHE")
    monkeypatch.setenv("VEHICLENET_HOME", str(tmp_path / "home"))
    assert native.default_build_dir() == cpu_kernels.default_build_dir() == tmp_path / "home" / "kernels"
    monkeypatch.setenv("VEHICLENET_KERNEL_CACHE", str(tmp_path / "elsewhere"))
    assert native.default_build_dir() == tmp_path / "elsewhere"


def _info(environment):
    script = ("import json, sys\nfrom vehiclenet.cli import main\nrc = main(['info', '--json', '--no-device'])\n"
              "print(json.dumps({'rc': rc, 'mindspore': 'mindspore' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stdout.strip().splitlines()
    return json.loads("\n".join(lines[:-1])), json.loads(lines[-1]), proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the oneDNN kernels are built on x86-64 Linux")
def test_info_no_device_neither_compiles_nor_imports_mindspore(tmp_path):
    """The kernels live under VEHICLENET_HOME; `info --no-device` reports them without building them."""
    home = tmp_path / "home"
    environment = subprocess_env(VEHICLENET_HOME=str(home))
    environment.pop("VEHICLENET_KERNEL_CACHE", None)
    report, state, stderr = _info(environment)
    assert state == {"rc": 0, "mindspore": False}, stderr
    assert report["cpu_kernels"].startswith("oneDNN 3, not built yet"), report["cpu_kernels"]
    assert str(home / "kernels") in report["cpu_kernels"]
    assert report["bf16"] == "unknown: the oneDNN kernels are not built yet"
    assert not (home / "kernels").exists() or not any((home / "kernels").glob("*.so")), "info compiled"

    built = cpu_kernels.build_library(home / "kernels")  # what the first network in that home does
    report, state, _ = _info(environment)
    assert report["cpu_kernels"] == f"oneDNN 3 ({built})" and state["mindspore"] is False
