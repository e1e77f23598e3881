"""Hostile caches, output paths and credentials, through the real CLI in subprocesses (issue 14).

Every case plants the real thing (symbolic links, hard links, FIFOs made with os.mkfifo,
/dev/null and /dev/full, a Unix socket file) and runs ``python -m vehiclenet``
against a real loopback HTTP server. Each asserts the exit code, the message naming the
path, that the victim is exactly what it was, and that nothing is left behind. FIFO cases
run under a subprocess timeout, so a regression hangs nothing but fails.
"""
import base64
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Set

import pytest
from PIL import Image

from http_fixture import (  # noqa: F401 - http_server is a fixture
    Route,
    asset_entry,
    http_server,
    make_payload,
    subprocess_env,
    write_manifest,
)

FILE = "w.ckpt"
PAYLOAD = make_payload(512 * 1024 + 7)
PRECIOUS = b"precious bytes that are not a checkpoint\n" * 8
TIMEOUT = 120  # seconds; a FIFO that blocked the CLI would otherwise hang the test run


def cli(*args, env: Dict[str, str], timeout: float = TIMEOUT, importtime: bool = False):
    """``python -m vehiclenet ARGS`` (with ``-X importtime`` to see what it imported)."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "vehiclenet", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def imported_mindspore(stderr: str) -> bool:
    """Whether ``-X importtime`` output lists mindspore (or any of its modules)."""
    return re.search(r"^import time:.*\|\s*mindspore(\.|\s*$)", stderr, re.MULTILINE) is not None


def snapshot(path: Path):
    """Identity and content of a victim: entry type, inode, device numbers and bytes (regular files)."""
    st = os.lstat(path)
    data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev, link, data


def tree(folder: Path) -> Set[str]:
    """Every entry below ``folder`` (links not followed), as relative paths."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    return found


def env_without_network_settings(**extra: str) -> Dict[str, str]:
    env = subprocess_env(**extra)
    for key in ("VEHICLENET_MIRROR", "VEHICLENET_OFFLINE", "VEHICLENET_ASSETS"):
        env.pop(key, None)
    env.update(GLOG_v="3", VEHICLENET_TIMEOUT="5,5", VEHICLENET_RETRIES="1", VEHICLENET_BACKOFF="0.05",
               VEHICLENET_LOCK_TIMEOUT="30")
    env.update(extra)
    return env


@pytest.fixture
def site(tmp_path, http_server):
    """A served asset, its manifest, an empty cache and a folder of victims outside the cache."""
    url = http_server.add("/w.ckpt", Route(body=PAYLOAD))
    manifest = write_manifest(tmp_path, [asset_entry("w", FILE, PAYLOAD, [url], size=len(PAYLOAD))])
    cache = tmp_path / "cache"
    victims = tmp_path / "victims"
    victims.mkdir()
    env = env_without_network_settings(VEHICLENET_ASSETS=str(manifest), VEHICLENET_HOME=str(cache))
    return SimpleNamespace(url=url, cache=cache, victims=victims, env=env, server=http_server, tmp=tmp_path)


# --------------------------------------------------------------------------- 1. hostile cache entries

PLACES = {"final": FILE, "part": FILE + ".part", "lock": f".locks/{FILE}.lock"}


def plant(site, place: str, kind: str) -> SimpleNamespace:
    """Put a hostile ``kind`` of entry at the cache name ``place``; return it and its victim."""
    entry = site.cache / PLACES[place]
    entry.parent.mkdir(parents=True, exist_ok=True)
    victim = site.victims / "victim.bin"
    # At the final name the victim holds the asset's very bytes: even then the link is not trusted.
    victim.write_bytes(PAYLOAD if place == "final" else PRECIOUS)
    if kind == "symlink":
        entry.symlink_to(victim)
    elif kind == "dangling":
        entry.symlink_to(site.victims / "not-yet-there")
        victim = site.victims / "not-yet-there"
    elif kind == "device":
        entry.symlink_to("/dev/null")
        victim = Path("/dev/null")
    elif kind == "fifo":
        os.mkfifo(entry)
        victim = entry
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(entry))  # the socket file stays after close
        victim = entry
    elif kind == "hardlink":
        os.link(victim, entry)
    return SimpleNamespace(entry=entry, victim=victim, before=snapshot(victim) if victim.exists() else None,
                           planted=snapshot(entry), victims=tree(site.victims))


CASES = [(p, k) for p in PLACES for k in ("symlink", "dangling", "device", "fifo", "socket")] + [("part", "hardlink")]


@pytest.mark.parametrize("place, kind", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_hostile_cache_entry_is_moved_aside_never_followed(site, place, kind):
    planted = plant(site, place, kind)
    proc = cli("download", env=site.env)
    assert proc.returncode == 0, proc.stderr
    final = site.cache / FILE
    assert proc.stdout.strip().splitlines()[-1] == str(final)
    # The victim is exactly what it was (same inode, type and bytes), or still absent.
    if planted.before is None:
        assert not os.path.lexists(planted.victim)
    elif kind not in ("fifo", "socket"):  # those are the planted entry itself, checked below
        assert snapshot(planted.victim) == planted.before
    assert tree(site.victims) == planted.victims
    # The planted entry itself was moved aside untouched, and the warning names it and where it went.
    aside = planted.entry.with_name(planted.entry.name + ".corrupt")
    assert snapshot(aside) == planted.planted
    assert str(planted.entry) in proc.stderr and f"moved it to {aside}" in proc.stderr
    # The cache now holds a verified regular file, its lock, the set-aside entry, and nothing else.
    assert stat.S_ISREG(os.lstat(final).st_mode) and final.read_bytes() == PAYLOAD
    assert stat.S_ISREG(os.lstat(site.cache / PLACES["lock"]).st_mode)
    assert tree(site.cache) == {FILE, ".locks", PLACES["lock"], PLACES[place] + ".corrupt"}


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_hostile_lock_folder_is_moved_aside(site, kind):
    locks = site.cache / ".locks"
    site.cache.mkdir()
    if kind == "symlink":
        locks.symlink_to(site.victims, target_is_directory=True)
    else:
        os.mkfifo(locks)
    before, planted = tree(site.victims), snapshot(locks)
    proc = cli("download", env=site.env)
    assert proc.returncode == 0, proc.stderr
    assert tree(site.victims) == before  # no lock file was created in the folder the link pointed to
    assert snapshot(site.cache / ".locks.corrupt") == planted
    assert str(locks) in proc.stderr and "moved it to" in proc.stderr
    assert (site.cache / FILE).read_bytes() == PAYLOAD
    assert tree(site.cache) == {FILE, ".locks", PLACES["lock"], ".locks.corrupt"}


def test_directory_at_part_name_is_refused_and_kept(site):
    part = site.cache / PLACES["part"]
    part.mkdir(parents=True)
    (part / "mine.txt").write_bytes(PRECIOUS)
    proc = cli("download", env=site.env)
    assert proc.returncode == 1
    assert f"{part} is a directory" in proc.stderr and "remove or rename it" in proc.stderr
    assert (part / "mine.txt").read_bytes() == PRECIOUS
    assert site.server.requests == []  # refused before any byte was fetched
    assert tree(site.cache) == {PLACES["part"], PLACES["part"] + "/mine.txt", ".locks", PLACES["lock"]}


def test_linked_cache_entry_is_not_verified_or_used_offline(site):
    """`verify`, `info` and an offline `download` do not take a link at the cache name for the asset,
    even when it points to the right bytes."""
    planted = plant(site, "final", "symlink")
    entry = planted.entry
    proc = cli("verify", env=site.env)
    assert proc.returncode == 1
    assert f"{entry}: FAILED" in proc.stdout and "symbolic link" in proc.stderr
    proc = cli("info", "--no-device", env=site.env)
    assert proc.returncode == 0 and "FAILED" in proc.stdout and "symbolic link" in proc.stdout
    offline = dict(site.env, VEHICLENET_OFFLINE="1")
    proc = cli("download", env=offline)
    assert proc.returncode == 1 and "VEHICLENET_OFFLINE" in proc.stderr and str(entry) in proc.stderr
    assert snapshot(planted.victim) == planted.before
    assert snapshot(entry.with_name(FILE + ".corrupt")) == planted.planted
    assert site.server.requests == []
    assert tree(site.cache) == {FILE + ".corrupt", ".locks", PLACES["lock"]}


# --------------------------------------------------------------------------- 2. output paths


def make_images(folder: Path, n: int = 2):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i + 1:04d}_c00{i + 1}_00000000_0.jpg"  # VeRi-style names
        Image.new("RGB", (32, 24), (40 * i, 90, 200)).save(path)
        paths.append(path)
    return paths


def plain_env(tmp_path: Path) -> Dict[str, str]:
    return env_without_network_settings(VEHICLENET_HOME=str(tmp_path / "home"))


# Given to commands whose output is refused: were the refusal to regress, loading these weights
# would fail before anything is written (this suite runs as root too, where /dev/null could go).
MISSING_WEIGHTS = "missing-weights.ckpt"


def assert_refused(proc, option: str, path: Path, words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{option} {str(path)!r}" in proc.stderr and words in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and MISSING_WEIGHTS not in proc.stderr
    assert not imported_mindspore(proc.stderr)  # refused before MindSpore or the network


def special_file(kind: str, tmp_path: Path) -> Path:
    if kind == "fifo":
        path = tmp_path / "pipe.npz"
        os.mkfifo(path)
    elif kind == "socket":
        path = tmp_path / "sock.npz"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # the socket file stays after close
    elif kind == "link-to-device":
        path = tmp_path / "link.npz"
        path.symlink_to("/dev/full")
    else:
        path = Path(kind)
    return path


SPECIAL = {"/dev/full": "character device", "/dev/null": "character device", "fifo": "FIFO",
           "socket": "socket", "link-to-device": "character device"}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_out_device_fifo_or_socket_is_refused(tmp_path, kind):
    (img,) = make_images(tmp_path / "imgs", 1)
    out = special_file(kind, tmp_path)
    before = snapshot(out)
    target = Path(os.path.realpath(out))
    target_before = snapshot(target)
    listing = tree(tmp_path)
    proc = cli("embed", img, "--out", out, "--checkpoint", MISSING_WEIGHTS, env=plain_env(tmp_path),
               importtime=True)
    assert_refused(proc, "--out", out, SPECIAL[kind])
    assert snapshot(out) == before and snapshot(target) == target_before  # still the device / FIFO / socket
    assert tree(tmp_path) == listing


def test_out_that_is_an_input_is_refused(tmp_path):
    """`embed a.jpg b.jpg --out a.jpg`, and the same input reached through a link, a hard link
    or a folder: refused by inode, the input left as it was."""
    a, b = make_images(tmp_path / "imgs")
    link = tmp_path / "link.npz"
    link.symlink_to(a)
    hard = tmp_path / "hard.npz"
    os.link(b, hard)
    cases = [(("embed", a, b), a, a), (("embed", a, b), link, a), (("embed", tmp_path / "imgs"), hard, b),
             (("embed", tmp_path / "imgs"), b, b)]
    env = plain_env(tmp_path)
    for args, out, victim in cases:
        before, listing = snapshot(victim), tree(tmp_path)
        proc = cli(*args, "--out", out, "--checkpoint", MISSING_WEIGHTS, env=env, importtime=True)
        assert_refused(proc, "--out", out, "own input")
        assert snapshot(victim) == before
        assert tree(tmp_path) == listing


def test_rank_out_that_is_the_query_or_gallery_is_refused(tmp_path):
    q, g = make_images(tmp_path / "imgs")
    env = plain_env(tmp_path)
    for out in (q, g):
        before, listing = snapshot(out), tree(tmp_path)
        proc = cli("rank", "--query", q, "--gallery", tmp_path / "imgs", "--out", out,
                   "--checkpoint", MISSING_WEIGHTS, env=env, importtime=True)
        assert_refused(proc, "--out", out, "own input")
        assert snapshot(out) == before and tree(tmp_path) == listing


def test_export_out_that_is_the_checkpoint_is_refused(tmp_path, http_server):
    """`export --format CKPT --out ft.ckpt --checkpoint ft.ckpt` (also as `--out ft`, the suffix
    added, and through a link), and --out naming the cached published checkpoint it would read."""
    ft = tmp_path / "ft.ckpt"
    ft.write_bytes(PRECIOUS)
    link = tmp_path / "link.ckpt"
    link.symlink_to(ft)
    env = plain_env(tmp_path)
    for out in (ft, tmp_path / "ft", link):
        before, listing = snapshot(ft), tree(tmp_path)
        proc = cli("export", "--format", "CKPT", "--out", out, "--checkpoint", ft, env=env, importtime=True)
        shown = out if out.suffix else out.with_name(out.name + ".ckpt")
        assert_refused(proc, "--out", shown, "own input")
        assert snapshot(ft) == before and tree(tmp_path) == listing
    # Without --checkpoint the input is the cached published checkpoint.
    url = http_server.add("/w.ckpt", Route(body=PAYLOAD))
    manifest = write_manifest(tmp_path, [asset_entry("w", FILE, PAYLOAD, [url])])
    cached = tmp_path / "home" / FILE
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)
    before = snapshot(cached)
    proc = cli("export", "--format", "CKPT", "--out", cached, env=dict(env, VEHICLENET_ASSETS=str(manifest)),
               importtime=True)
    assert_refused(proc, "--out", cached, "own input")
    assert snapshot(cached) == before and http_server.requests == []


def test_evaluate_save_features_onto_the_data_set_is_refused(tmp_path):
    veri = tmp_path / "veri"
    make_images(veri / "image_query", 1)
    gallery = make_images(veri / "image_test", 2)
    names = veri / "name_test.txt"
    names.write_text("".join(f"{p.name}\n" for p in gallery))
    env = plain_env(tmp_path)
    for out in (gallery[1], names):
        before, listing = snapshot(out), tree(tmp_path)
        proc = cli("evaluate", "--data", veri, "--save-features", out, "--checkpoint", MISSING_WEIGHTS,
                   env=env, importtime=True)
        assert_refused(proc, "--save-features", out, "own input")
        assert snapshot(out) == before and tree(tmp_path) == listing


def test_outputs_beside_inputs_are_allowed_and_late_special_files_refused(tmp_path):
    """The library checks behind the CLI: an .npz in an input folder is no input (embed reads images
    only), and atomic_write refuses a FIFO that appears while the output is made, leaving no temp file."""
    from vehiclenet.errors import UsageError
    from vehiclenet.fileio import atomic_write, check_output_file
    from vehiclenet.preprocessing import is_image_path

    imgs = tmp_path / "imgs"
    make_images(imgs)
    feats = imgs / "feats.npz"
    feats.write_bytes(PRECIOUS)
    check_output_file(feats, "--out", [imgs], accept=is_image_path)  # no error
    late = tmp_path / "late.npz"
    with pytest.raises(UsageError, match="FIFO"):
        with atomic_write(late) as handle:
            handle.write(PRECIOUS)
            os.mkfifo(late)
    assert stat.S_ISFIFO(os.lstat(late).st_mode)
    assert tree(tmp_path) == {"imgs", "late.npz", *(f"imgs/{p.name}" for p in imgs.iterdir())}


# --------------------------------------------------------------------------- 3. credentials

# User names count too: a token is often given as the user part alone (https://TOKEN@host/).
SECRETS = ("hunter2", "s3cret", "pw3x", "pw4x", "pw5x", "alice7q", "bob7q", "carol7q", "dave7q", "erin7q")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (secret, text[-3000:])


def with_userinfo(url: str, userinfo: str) -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


def test_credentials_in_urls_are_masked_in_download_logs(site):
    """A mirror that fails (warning) and a manifest URL that works, both with user:password@: the
    credentials still reach the server, never the terminal, even with --verbose."""
    url = with_userinfo(site.url, "alice7q:hunter2")
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [url], size=len(PAYLOAD))])
    mirror = with_userinfo(site.server.url("/mirror"), "bob7q:s3cret")
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest), VEHICLENET_MIRROR=mirror)
    proc = cli("--verbose", "download", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout, proc.stderr)
    assert f"{with_userinfo(site.server.url('/mirror/w.ckpt'), '***')}: HTTP 404" in proc.stderr
    assert f"from {with_userinfo(site.url, '***')}" in proc.stderr
    sent = {r.path: r.authorization for r in site.server.requests}
    assert sent["/w.ckpt"] == "Basic " + base64.b64encode(b"alice7q:hunter2").decode()


def test_credentials_in_urls_are_masked_in_errors(site):
    """Every way a URL reaches an error message: failed URLs listed, a refused redirect, an unusable
    mirror, the offline hint, a bad manifest entry."""
    site.server.add("/gone", Route(status=404))
    site.server.add("/redirect", Route(redirect="http://carol7q:pw3x@example.com/w.ckpt"))
    urls = [with_userinfo(site.server.url(p), "alice7q:hunter2") for p in ("/gone", "/redirect")]
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, urls)])
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest))
    proc = cli("download", env=env)
    assert proc.returncode == 1 and "could not download w" in proc.stderr
    assert f"{with_userinfo(site.server.url('/gone'), '***')}\n    -> HTTP 404" in proc.stderr
    assert "redirected to http://***@example.com/w.ckpt" in proc.stderr
    proc2 = cli("download", env=dict(env, VEHICLENET_MIRROR="http://dave7q:pw4x@example.com/m"))
    assert proc2.returncode == 1 and "VEHICLENET_MIRROR='http://***@example.com/m'" in proc2.stderr
    proc3 = cli("download", env=dict(env, VEHICLENET_OFFLINE="1"))
    assert proc3.returncode == 1 and f"download {with_userinfo(site.server.url('/gone'), '***')}" in proc3.stderr
    bad = write_manifest(site.tmp / "victims", [asset_entry("w", FILE, PAYLOAD, ["ftp://erin7q:pw5x@host/w.ckpt"])])
    proc4 = cli("download", env=dict(env, VEHICLENET_ASSETS=str(bad)))
    assert proc4.returncode == 2 and "'ftp://***@host/w.ckpt'" in proc4.stderr
    for p in (proc, proc2, proc3, proc4):
        assert_no_secret(p.stdout, p.stderr)
    assert not (site.cache / FILE).exists() and not (site.cache / PLACES["part"]).exists()


def test_info_masks_mirror_credentials(site):
    mirror = with_userinfo(site.server.url("/mirror"), "bob7q:s3cret")
    env = dict(site.env, VEHICLENET_MIRROR=mirror)
    text = cli("info", "--no-device", env=env)
    report = cli("info", "--no-device", "--json", env=env)
    assert text.returncode == 0 and report.returncode == 0
    masked = with_userinfo(site.server.url("/mirror"), "***")
    assert f"mirror {masked}" in text.stdout
    assert json.loads(report.stdout)["mirror"] == masked
    assert_no_secret(text.stdout, text.stderr, report.stdout, report.stderr)
