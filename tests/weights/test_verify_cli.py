"""`vehiclenet verify` / `download` / `info` as real subprocesses: exit codes, output, no mindspore."""
import json
import subprocess
import sys

import pytest

from support.http_server import (
    Route,
    asset_entry,
    make_payload,
    sha256_hex,
    subprocess_env,
    write_manifest,
)

FILE = "cli_model.ckpt"
DATA = make_payload(200_000, seed=1)


@pytest.fixture
def setup(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = write_manifest(tmp_path, [asset_entry("cli", FILE, DATA, ["https://example.invalid/" + FILE])])
    env = subprocess_env(VEHICLENET_HOME=str(cache), VEHICLENET_ASSETS=str(manifest))
    env.pop("VEHICLENET_OFFLINE", None)
    env.pop("VEHICLENET_MIRROR", None)
    return tmp_path, cache, env


def run(env, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vehiclenet", *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_verify_good_file(setup):
    tmp, cache, env = setup
    good = tmp / FILE
    good.write_bytes(DATA)
    r = run(env, "verify", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{good}: OK\n"
    q = run(env, "verify", "--quiet", str(good))
    assert q.returncode == 0 and q.stdout == ""


def test_verify_tampered_file(setup):
    tmp, cache, env = setup
    bad = tmp / FILE
    tampered = bytearray(DATA)
    tampered[100] ^= 0x40
    bad.write_bytes(bytes(tampered))
    r = run(env, "verify", str(bad))
    assert r.returncode == 1
    assert r.stdout == f"{bad}: FAILED\n"
    assert f"expected: {sha256_hex(DATA)}" in r.stderr
    assert f"got:      {sha256_hex(bytes(tampered))}" in r.stderr
    assert "vehiclenet download cli" in r.stderr  # what to do


def test_verify_missing_file(setup):
    tmp, cache, env = setup
    r = run(env, "verify", str(tmp / FILE))
    assert r.returncode == 1
    assert r.stdout == f"{tmp / FILE}: FAILED open or read\n"
    assert "No such file" in r.stderr


def test_verify_mixed_reports_each(setup):
    tmp, cache, env = setup
    (cache / FILE).write_bytes(DATA)
    other = tmp / "other.bin"
    other.write_bytes(b"hello")
    r = run(env, "verify", "--sha256", sha256_hex(b"hello"), str(other), str(tmp / "nope.bin"))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"{other}: OK", f"{tmp / 'nope.bin'}: FAILED open or read"]


def test_verify_cache_default(setup):
    tmp, cache, env = setup
    r = run(env, "verify")
    assert r.returncode == 1 and "no cached assets" in r.stderr
    (cache / FILE).write_bytes(DATA)
    r = run(env, "verify")
    assert r.returncode == 0 and r.stdout == f"{cache / FILE}: OK\n"
    (cache / FILE).write_bytes(DATA[:-1])
    r = run(env, "verify")
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert "--force" in r.stderr  # cached file: re-download advice


def test_verify_json(setup):
    tmp, cache, env = setup
    good = tmp / FILE
    good.write_bytes(DATA)
    r = run(env, "verify", "--json", str(good), str(tmp / "missing" / FILE))
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    first, second = report["results"]
    assert first["status"] == "OK" and first["got"] == sha256_hex(DATA) and first["asset"] == "cli"
    assert second["status"] == "MISSING" and second["ok"] is False
    r = run(env, "verify", "--json", str(good))
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_verify_usage_errors_exit_2(setup):
    tmp, cache, env = setup
    stray = tmp / "unknown.bin"
    stray.write_bytes(b"x")
    r = run(env, "verify", str(stray))
    assert r.returncode == 2 and "--sha256" in r.stderr
    r = run(env, "verify", "--sha256", "abc", str(stray))
    assert r.returncode == 2 and "64 hexadecimal" in r.stderr
    r = run(env, "verify", "--sha256", "0" * 64)
    assert r.returncode == 2


def test_verify_manifest_error_exit_2(setup):
    tmp, cache, env = setup
    bad = tmp / "bad.json"
    bad.write_text('{"assets": [{"name": "x", "file": "a/b.ckpt", "sha256": "' + "0" * 64 + '", "urls": []}]}')
    env = dict(env, VEHICLENET_ASSETS=str(bad))
    r = run(env, "verify")
    assert r.returncode == 2
    assert str(bad) in r.stderr and "'file'" in r.stderr


def test_info_with_non_utf8_manifest_exit_2(setup):
    tmp, cache, env = setup
    bad = tmp / "utf16.json"
    bad.write_bytes(b"\xff\xfe{")
    r = run(dict(env, VEHICLENET_ASSETS=str(bad)), "info", "--no-device")
    assert r.returncode == 2
    assert str(bad) in r.stderr and "UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_directory_at_cache_path(setup, http_server):
    tmp, cache, env = setup
    url = http_server.add("/" + FILE, Route(body=DATA))
    env = dict(env, VEHICLENET_ASSETS=str(write_manifest(tmp, [asset_entry("cli", FILE, DATA, [url])])))
    (cache / FILE).mkdir()
    (cache / FILE / "notes.txt").write_text("the user's")
    r = run(env, "verify")
    assert r.returncode == 1 and "directory" in r.stderr and "remove or rename" in r.stderr
    assert "--force" not in r.stderr  # `download --force` cannot replace a folder either
    for args in (["download", "cli"], ["download", "cli", "--force"]):
        r = run(env, *args)
        assert r.returncode == 1, r.stderr
        assert str(cache / FILE) in r.stderr and "remove or rename" in r.stderr and "Traceback" not in r.stderr
    assert http_server.requests == []  # refused before any byte was fetched
    assert sorted(p.name for p in cache.iterdir() if p.name != ".locks") == [FILE]  # no .part
    assert (cache / FILE / "notes.txt").read_text() == "the user's"  # the folder is left alone
    r = run(env, "info", "--no-device")
    assert r.returncode == 0 and "cli (default): FAILED:" in r.stdout and "None bytes" not in r.stdout, r.stdout


def test_verify_does_not_import_mindspore_or_requests(setup):
    tmp, cache, env = setup
    good = tmp / FILE
    good.write_bytes(DATA)
    script = (
        "import sys\n"
        "from vehiclenet.cli import main\n"
        f"rc = main(['verify', {str(good)!r}])\n"
        "heavy = sorted(m for m in ('mindspore', 'numpy', 'requests', 'tqdm') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY [] 0" in r.stdout


def test_download_cli_prints_path_last(setup, http_server):
    tmp, cache, env = setup
    url = http_server.add("/" + FILE, Route(body=DATA))
    manifest = write_manifest(tmp, [asset_entry("cli", FILE, DATA, [url])])
    env = dict(env, VEHICLENET_ASSETS=str(manifest))
    r = run(env, "download")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(cache / FILE)
    assert (cache / FILE).read_bytes() == DATA
    r = run(env, "download", "cli", "--force", "--quiet")
    assert r.returncode == 0 and r.stdout == f"{cache / FILE}\n" and r.stderr == ""
    r = run(env, "download", "nope")
    assert r.returncode == 2 and "known assets: cli" in r.stderr


def test_download_cli_offline_and_failure_exit_1(setup, http_server):
    tmp, cache, env = setup
    r = run(dict(env, VEHICLENET_OFFLINE="1"), "download")
    assert r.returncode == 1 and "VEHICLENET_OFFLINE" in r.stderr and str(cache / FILE) in r.stderr
    url = http_server.add("/gone", Route(status=404))
    manifest = write_manifest(tmp, [asset_entry("cli", FILE, DATA, [url])])
    r = run(dict(env, VEHICLENET_ASSETS=str(manifest)), "download")
    assert r.returncode == 1 and url in r.stderr and "404" in r.stderr
    assert r.stdout == ""


def test_info_reports_cache_and_assets(setup):
    from vehiclenet.model.cpu_kernels import build_library

    tmp, cache, env = setup
    (cache / FILE).write_bytes(DATA)
    build_library()  # in the session's kernel cache: `info --no-device` reports it, never builds it
    r = run(env, "info", "--json", "--no-device")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["cache"] == str(cache)
    assert report["assets"][0]["cached"] is True and report["assets"][0]["verified"] is True
    assert report["versions"]["vehiclenet"]
    assert report["cpu_kernels"].startswith("oneDNN 3 (") and report["cpu_kernels"].endswith(".so)")
    r = run(env, "info", "--no-device")
    assert r.returncode == 0 and "verified OK" in r.stdout and str(cache) in r.stdout
    assert "cpu convolutions: oneDNN 3 (" in r.stdout
    r = run(dict(env, VEHICLENET_CPU_KERNELS="0"), "info", "--no-device")
    assert "cpu convolutions: MindSpore's Conv2D (VEHICLENET_CPU_KERNELS=0)" in r.stdout, r.stdout


def test_info_names_the_evaluation_blas_and_its_kernel(setup):
    _, _, env = setup
    env = {k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}
    report = json.loads(run(dict(env, OPENBLAS_CORETYPE="Haswell"), "info", "--json", "--no-device").stdout)
    blas = report["blas"]["evaluation"]
    assert blas["internal_api"] == "openblas" and "scipy" in blas["filepath"]
    assert blas["architecture"] == "Haswell"  # the kernel OpenBLAS runs, as threadpoolctl reads it
    assert any("numpy" in lib["filepath"] for lib in report["blas"]["loaded"])
    text = run(env, "info", "--no-device").stdout
    line = next(line for line in text.splitlines() if line.startswith("evaluation BLAS: OpenBLAS "))
    assert "(libscipy_openblas)" in line and " kernel; also loaded: OpenBLAS " in line
