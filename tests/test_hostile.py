"""Hostile caches, paths, servers, checkpoints, images and inputs, through the real CLI in
subprocesses (issue 14).

Every case plants the real thing (symbolic links, hard links, FIFOs made with os.mkfifo,
/dev/null and /dev/full, a Unix socket file, servers that trickle or send too much,
damaged checkpoints, 13000x13000 images) and runs ``python -m vehiclenet``, against a
real loopback HTTP server where it downloads. Each asserts the exit code, the message
naming the path, that the victim is exactly what it was, and that nothing is left behind.
FIFO cases run under a subprocess timeout, so a regression hangs nothing but fails.
"""
import base64
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Set, Tuple

import numpy as np
import pytest
from PIL import Image

from http_fixture import (  # noqa: F401 - http_server is a fixture
    Route,
    TestServer,
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
    from vehiclenet.fileio import atomic_write, check_output_file, is_image_path

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


# --------------------------------------------------------------------------- item 3: link loops in input folders


def looped_folder(root: Path) -> Path:
    """Two JPEGs, two links back to the folder itself, one to its parent (which holds other
    images, beside and below it) and a second name for a file."""
    cars = root / "photos" / "cars"
    make_images(cars, 2)
    make_images(root / "photos" / "trucks", 3)
    Image.new("RGB", (32, 24), (9, 9, 9)).save(root / "photos" / "0009_c001_00000000_0.jpg")
    (cars / "loop").symlink_to(".")
    (cars / "again").symlink_to(".")  # with two loops the old walk went on for minutes
    (cars / "up").symlink_to("..")  # the parent, which holds this folder again
    (cars / "zz-alias.jpg").symlink_to("0001_c001_00000000_0.jpg")
    return cars


def test_link_loops_in_an_input_folder_embed_each_file_once(tmp_path):
    cars = looped_folder(tmp_path)
    out = tmp_path / "f.npz"
    started = time.monotonic()
    proc = cli("embed", cars, "--out", out, "--no-pretrained", env=plain_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 120  # the network's start-up; the old walk of 3 loops never ended
    with np.load(out) as npz:
        assert npz["features"].shape == (2, 512)
        assert [os.path.basename(p) for p in npz["paths"]] == ["0001_c001_00000000_0.jpg", "0002_c002_00000000_0.jpg"]
    # Each said once: the folders are listed once per command.
    for link in ("loop", "again"):
        assert proc.stderr.count(f"skipped {cars / link}: a link to a folder already searched") == 1
    assert proc.stderr.count(f"skipped {cars / 'up'}: a link to a folder that holds {cars} (a parent)") == 1


def test_folder_walk_prefers_plain_names_and_visits_each_folder_once(tmp_path):
    from vehiclenet.embedding.inputs import list_images

    root = tmp_path / "gallery"
    (root / "b-real" / "deep").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "b-real" / "deep" / "x.jpg")
    (root / "a-link").symlink_to("b-real")  # sorts first, yet the plain name wins
    (root / "b-real" / "deep" / "back").symlink_to(root)  # back to the top: a loop through two folders
    (root / "b-real" / "y.png").symlink_to(root / "b-real" / "deep" / "x.jpg")  # the same file, by a link
    Image.new("RGB", (8, 8)).save(root / "b-real" / "deep" / "hard.jpg")
    os.link(root / "b-real" / "deep" / "hard.jpg", root / "hard-too.jpg")  # a hard link: the same file too
    assert list_images(root) == [str(root / "b-real" / "deep" / "hard.jpg"), str(root / "b-real" / "deep" / "x.jpg")]


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


# --------------------------------------------------------------------------- item 5: servers that trickle

TRICKLE_T = 4.0  # VEHICLENET_TIMEOUT of these cases: the read timeout that sets the pace
# Between the slow URL's request and the next one (or the process's end), timed at the server:
# Python's start-up, which a loaded machine can stretch to seconds, is not part of it.
GIVE_UP_SLACK = 1.5


def lock_is_free(lock: Path) -> bool:
    """Whether this process can take the download lock at once (flock, as vehiclenet does)."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def wait_for_request(server, path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not server.requests_for(path):
        assert time.monotonic() < deadline, f"no request for {path}"
        time.sleep(0.05)


def popen_cli(*args, env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vehiclenet", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("head", [False, True], ids=["body", "headers"])
def test_trickling_server_is_abandoned_in_bounded_time_for_the_next_url(site, head):
    """One byte every 2 s (of the body, or of the status line and headers too) with a 4 s read
    timeout: abandoned within 2x the timeout, the second URL delivers, and a second process that
    waited for the lock meanwhile gets it and finds the file."""
    slow = site.server.add("/slow.ckpt", Route(body=PAYLOAD, trickle=2.0, trickle_head=head))
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [slow, site.url], size=len(PAYLOAD))])
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest), VEHICLENET_TIMEOUT=f"{TRICKLE_T:g}")
    first = popen_cli("download", env=env)
    wait_for_request(site.server, "/slow.ckpt")  # the first process holds the lock now
    second = popen_cli("download", env=env)
    out1, err1 = first.communicate(timeout=TIMEOUT)
    out2, err2 = second.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err1
    gave_up = site.server.requests[1].at - site.server.requests[0].at
    assert gave_up < 2 * TRICKLE_T + GIVE_UP_SLACK, (gave_up, err1)
    assert f"{slow}: too slow" in err1 and f"from {site.url}" in err1
    assert out1.strip().splitlines()[-1] == str(site.cache / FILE)
    assert (site.cache / FILE).read_bytes() == PAYLOAD
    assert second.returncode == 0, err2
    assert "was downloaded by another process" in err2  # it waited for the lock, then got it
    assert lock_is_free(site.cache / PLACES["lock"])
    assert [r.path for r in site.server.requests] == ["/slow.ckpt", "/w.ckpt"]
    assert tree(site.cache) == {FILE, ".locks", PLACES["lock"]}


@pytest.fixture
def tls_server(tmp_path):
    """The loopback server behind TLS, with a certificate for 127.0.0.1 made by the openssl command."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server = TestServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.start()
    try:
        yield SimpleNamespace(server=server, cert=cert, base=f"https://127.0.0.1:{server.server_address[1]}")
    finally:
        server.close()


@pytest.mark.parametrize("head", [False, True], ids=["body", "headers"])
def test_trickling_tls_server_is_abandoned_too(site, tls_server, head):
    """Over https the same: the body's rate check, and the headers deadline cutting the TLS
    connection's socket."""
    tls_server.server.add("/slow.ckpt", Route(body=PAYLOAD, trickle=2.0, trickle_head=head))
    tls_server.server.add("/w.ckpt", Route(body=PAYLOAD))
    slow, good = tls_server.base + "/slow.ckpt", tls_server.base + "/w.ckpt"
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [slow, good], size=len(PAYLOAD))])
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest), VEHICLENET_TIMEOUT=f"{TRICKLE_T:g}",
               REQUESTS_CA_BUNDLE=str(tls_server.cert))
    proc = cli("download", env=env)
    assert proc.returncode == 0, proc.stderr
    gave_up = tls_server.server.requests[1].at - tls_server.server.requests[0].at
    assert gave_up < 2 * TRICKLE_T + GIVE_UP_SLACK, (gave_up, proc.stderr)
    reason = "the response headers took more than 4 s" if head else "less than the 64 KiB required in every 4 s"
    assert f"{slow}: too slow: " in proc.stderr and reason in proc.stderr
    assert f"from {good}" in proc.stderr and (site.cache / FILE).read_bytes() == PAYLOAD
    assert [r.path for r in tls_server.server.requests] == ["/slow.ckpt", "/w.ckpt"]


def test_trickling_only_url_ends_with_a_clear_error(site):
    slow = site.server.add("/slow.ckpt", Route(body=PAYLOAD, trickle=2.0))
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [slow], size=len(PAYLOAD))])
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest), VEHICLENET_TIMEOUT=f"{TRICKLE_T:g}")
    proc = cli("download", env=env)
    gave_up = time.monotonic() - site.server.requests[0].at  # its exit included
    assert proc.returncode == 1
    assert gave_up < 2 * TRICKLE_T + GIVE_UP_SLACK, (gave_up, proc.stderr)
    assert f"could not download w ({FILE}):\n  {slow}\n    -> too slow:" in proc.stderr
    assert "KiB required in every 4 s (the read timeout, VEHICLENET_TIMEOUT); abandoned" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert lock_is_free(site.cache / PLACES["lock"])
    assert not (site.cache / FILE).exists()
    # The few bytes received are kept for a resume, under the .part name only.
    assert 0 < (site.cache / PLACES["part"]).stat().st_size < 10


# --------------------------------------------------------------------------- item 6: bodies larger than the asset

JUNK = make_payload(8 * 1024 * 1024, seed=6)  # 8 MiB more than the asset, as in the issue


def test_body_without_length_is_stopped_at_the_manifest_size(site):
    """No Content-Length and 8 MiB more than the manifest's size: stopped at once, nothing past
    the size written, the next URL used; alone, a clear error and a .part no larger than the asset."""
    long_url = site.server.add("/long.ckpt", Route(body=PAYLOAD + JUNK, no_length=True))
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [long_url], size=len(PAYLOAD))])
    env = dict(site.env, VEHICLENET_ASSETS=str(manifest))
    proc = cli("download", env=env)
    assert proc.returncode == 1
    assert f"{long_url}\n    -> server sent more than the manifest's {len(PAYLOAD)} bytes" in proc.stderr
    assert "without writing the excess" in proc.stderr and "Traceback" not in proc.stderr
    part = site.cache / PLACES["part"]
    assert part.stat().st_size <= len(PAYLOAD)  # never more than the asset on disk
    assert PAYLOAD.startswith(part.read_bytes())
    assert tree(site.cache) == {PLACES["part"], ".locks", PLACES["lock"]}
    # With a good second URL the download completes (resuming the bytes already there).
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [long_url, site.url], size=len(PAYLOAD))])
    proc = cli("download", env=dict(env, VEHICLENET_ASSETS=str(manifest)))
    assert proc.returncode == 0, proc.stderr
    assert (site.cache / FILE).read_bytes() == PAYLOAD
    assert tree(site.cache) == {FILE, ".locks", PLACES["lock"]}


def test_body_longer_than_its_content_length_is_cut_at_the_length(site):
    """A manifest without size: the Content-Length bounds the body; the bytes after it are never written."""
    url = site.server.add("/long.ckpt", Route(body=PAYLOAD + JUNK, content_length=len(PAYLOAD)))
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [url])])
    proc = cli("download", env=dict(site.env, VEHICLENET_ASSETS=str(manifest)))
    assert proc.returncode == 0, proc.stderr
    assert (site.cache / FILE).read_bytes() == PAYLOAD
    assert tree(site.cache) == {FILE, ".locks", PLACES["lock"]}


def test_free_space_check_uses_the_manifest_size_without_content_length(site):
    """A server sending no length, an asset of 1 PB in the manifest: refused before any byte is
    written, naming the folder and what it needs (the real disk's free space, no mock)."""
    url = site.server.add("/huge.ckpt", Route(body=PAYLOAD + JUNK, no_length=True))
    manifest = write_manifest(site.tmp, [asset_entry("w", FILE, PAYLOAD, [url], size=10 ** 15)])
    proc = cli("download", env=dict(site.env, VEHICLENET_ASSETS=str(manifest)))
    assert proc.returncode == 1
    assert f"{site.cache} has" in proc.stderr and "MB free but the download needs 1000000000 MB more" in proc.stderr
    assert "VEHICLENET_HOME" in proc.stderr and "Traceback" not in proc.stderr
    assert [r.path for r in site.server.requests] == ["/huge.ckpt"]
    assert tree(site.cache) == {".locks", PLACES["lock"]}  # not even an empty .part


# --------------------------------------------------------------------------- item 8: checkpoints, all or nothing

# Late entries in the file's order, so a loader that assigned as it went would already have
# overwritten model.conv1.weight and most of the backbone when it met them.
FLOAT16_ENTRY = "classifier.bn1.gamma"
NAN_ENTRY = "model.layer4.2.conv3.weight"
INF_ENTRY = "classifier.dense.bias"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> SimpleNamespace:
    """A good network-only checkpoint of random weights, and the same with one float16 entry,
    three NaN values in one entry and an infinite one in another."""
    import mindspore as ms

    from vehiclenet import create_network

    folder = tmp_path_factory.mktemp("ckpt")
    values = {p.name: p.asnumpy().copy() for p in create_network(pretrained=False).get_parameters()}
    good, bad = folder / "good.ckpt", folder / "bad.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in values.items()], str(good))
    damaged = dict(values)
    damaged[FLOAT16_ENTRY] = values[FLOAT16_ENTRY].astype(np.float16)
    damaged[NAN_ENTRY] = values[NAN_ENTRY].copy()
    damaged[NAN_ENTRY].flat[[0, 7, 1000]] = np.nan
    damaged[INF_ENTRY] = values[INF_ENTRY].copy()
    damaged[INF_ENTRY][3] = np.inf
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in damaged.items()], str(bad))
    return SimpleNamespace(good=good, bad=bad, values=values)


def assert_names_bad_entries(message: str, path: Path) -> None:
    assert f"checkpoint {str(path)!r}" in message
    assert f"{FLOAT16_ENTRY}: file Float16 vs network Float32" in message
    assert f"{NAN_ENTRY}: 3 of {2048 * 512} values" in message and f"{INF_ENTRY}: 1 of 512 values" in message
    assert "NaN or infinite" in message and "Nothing was loaded: the network is as it was" in message


def test_refused_checkpoint_leaves_the_network_exactly_as_it_was(checkpoints):
    from vehiclenet import create_network
    from vehiclenet.model.checkpoint import load_weights
    from vehiclenet.errors import CheckpointError

    net = create_network(pretrained=False)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    with pytest.raises(CheckpointError) as err:
        load_weights(net, checkpoints.bad)
    assert_names_bad_entries(str(err.value), checkpoints.bad)
    after = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert after.keys() == before.keys() and len(after) == 273
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # The comparison could fail: the good file's values differ, and loading them changes every parameter.
    assert not np.array_equal(before["model.conv1.weight"], checkpoints.values["model.conv1.weight"])
    load_weights(net, checkpoints.good)
    for p in net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), checkpoints.values[p.name], err_msg=p.name)


def test_refused_checkpoint_through_the_cli_names_file_and_entries(tmp_path, checkpoints):
    (img,) = make_images(tmp_path / "imgs", 1)
    out = tmp_path / "feats.npz"
    proc = cli("embed", img, "--out", out, "--checkpoint", checkpoints.bad, env=plain_env(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("vehiclenet embed: error: checkpoint") == 1
    assert_names_bad_entries(proc.stderr, checkpoints.bad)
    assert "Traceback" not in proc.stderr and "load_param_into_net" not in proc.stderr
    assert not out.exists() and tree(tmp_path) == {"imgs", f"imgs/{img.name}"}


# --------------------------------------------------------------------------- item 9: images bounded in memory

HUGE = 13000  # pixels a side: 169 million pixels, 507 MB as RGB
RSS_LIMIT = 1 << 30  # must-show 4: embedding four of them stays within 1 GB (or is refused)


def write_flat_png(path: Path, width: int, height: int, colour=(90, 120, 200)) -> Path:
    """A one-colour RGB PNG streamed row by row: ~0.5 MB on disk for 13000x13000, no big buffer here."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row, packer = b"\x00" + bytes(colour) * width, zlib.compressobj(6)
    idat = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    return write_flat_png(tmp_path_factory.mktemp("huge") / "huge.png", HUGE, HUGE)


# `python -m vehiclenet ARGS` that, as it exits, writes its own peak RSS in KiB (VmHWM) to the
# file named first. Not ru_maxrss: Linux starts a child's at the RSS of the process that spawned
# it (this test process, with MindSpore loaded), and counts a compiler it may start for the kernels.
PEAK_RSS_MAIN = """\
import atexit, re, runpy, sys
report = sys.argv.pop(1)
def peak():
    status = open("/proc/self/status").read()
    open(report, "w").write(re.search(r"VmHWM:\\s*(\\d+) kB", status).group(1))
atexit.register(peak)
sys.argv[0] = "vehiclenet"
runpy.run_module("vehiclenet", run_name="__main__", alter_sys=True)
"""


def cli_peak_rss(*args, env: Dict[str, str], tmp: Path) -> Tuple[int, str, str, int]:
    """Run the CLI with ARGS; exit code, stdout, stderr and the process's peak RSS in bytes."""
    report = tmp / "peak-rss.txt"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_MAIN, str(report), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    peak = int(report.read_text()) * 1024
    report.unlink()
    return proc.returncode, proc.stdout, proc.stderr, peak


def test_huge_pngs_are_refused_by_name_and_memory_stays_bounded(tmp_path, huge_png):
    """Four 13000x13000 PNGs (3.8 GB peak RSS when decoded): refused from their header, naming the
    file and the limit; with --skip-bad each is skipped with a message and a good image is embedded.
    Peak RSS of both runs, network included, stays under 1 GB (the second at batch size 1: a batch
    planned for five images and padded from the one good image takes 300 MB more in the network)."""
    bigs = [shutil.copy(huge_png, tmp_path / f"big{i}.png") for i in range(4)]
    (good,) = make_images(tmp_path / "imgs", 1)
    env = plain_env(tmp_path)
    out = tmp_path / "feats.npz"
    code, _, err, peak = cli_peak_rss("embed", *bigs, "--no-pretrained", "--out", out, env=env, tmp=tmp_path)
    assert code == 1, err[-3000:]
    assert f"error: {bigs[0]}: 13000x13000 is 169.0 million pixels, more than the 40 million" in err
    assert "VEHICLENET_MAX_PIXELS" in err and "Traceback" not in err and "DecompressionBomb" not in err
    assert not out.exists()
    assert peak < RSS_LIMIT, peak
    code, stdout, err, peak = cli_peak_rss("embed", *bigs, good, "--no-pretrained", "--skip-bad", "--batch-size", 1,
                                           "--out", out, env=env, tmp=tmp_path)
    assert code == 0, err[-3000:]
    for big in bigs:
        assert f"skipped {big}: 13000x13000 is 169.0 million pixels" in err
    assert "embedded 1 image(s)" in stdout and "skipped 4" in stdout
    with np.load(out) as saved:
        assert saved["features"].shape == (1, 512) and list(saved["paths"]) == [str(good)]
    assert peak < RSS_LIMIT, peak


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from vehiclenet.errors import DataError, UsageError
    from vehiclenet.embedding.preprocessing import load_image

    (img,) = make_images(tmp_path, 1)  # 32x24
    assert load_image(img).shape == (24, 32, 3)
    monkeypatch.setenv("VEHICLENET_MAX_PIXELS", "700")
    with pytest.raises(DataError, match=rf"{re.escape(str(img))}: 32x24 is 768 pixels, more than the "
                                        r"700 vehiclenet decodes"):
        load_image(img)
    monkeypatch.setenv("VEHICLENET_MAX_PIXELS", "lots")
    with pytest.raises(UsageError, match="VEHICLENET_MAX_PIXELS='lots' is not a whole number"):
        load_image(img)


def draw_scene(width: int, height: int, colour=(200, 40, 30)) -> Image.Image:
    """A vehicle-like drawing at any size (shapes scale with it), to stand for a large photo."""
    from PIL import ImageDraw

    img = Image.new("RGB", (width, height), (110, 120, 115))
    d = ImageDraw.Draw(img)
    w, h = width / 100, height / 100
    d.rectangle([0, 75 * h, width, height], fill=(60, 60, 60))
    d.rounded_rectangle([10 * w, 40 * h, 90 * w, 72 * h], radius=int(6 * w), fill=colour)
    d.polygon([(28 * w, 40 * h), (36 * w, 18 * h), (68 * w, 18 * h), (78 * w, 40 * h)], fill=colour)
    d.polygon([(32 * w, 38 * h), (38 * w, 22 * h), (66 * w, 22 * h), (73 * w, 38 * h)], fill=(170, 210, 235))
    for cx in (25 * w, 75 * w):
        d.ellipse([cx - 9 * w, 62 * h, cx + 9 * w, 80 * h], fill=(20, 20, 20))
    return img


def test_big_jpeg_is_decoded_at_reduced_scale_with_the_same_features(tmp_path, monkeypatch):
    """An 8000x6000 JPEG (48 million pixels, above the limit) decodes at 1/4 scale through libjpeg:
    its network input is that of the full decode but on sharp edges, and its features are those
    of the same picture resized first, not those of another picture."""
    from vehiclenet.embedding.preprocessing import load_image, preprocess

    big = tmp_path / "big.jpg"
    scene = draw_scene(8000, 6000)
    scene.save(big, quality=90)
    first = tmp_path / "first.png"
    scene.resize((800, 600), Image.LANCZOS).save(first)
    other = tmp_path / "other.png"
    draw_scene(800, 600, colour=(30, 60, 200)).transpose(Image.FLIP_LEFT_RIGHT).save(other)
    del scene
    drafted = load_image(big)
    assert drafted.shape == (1500, 2000, 3)  # 1/4 scale, still twice the 384 px input
    monkeypatch.setenv("VEHICLENET_MAX_PIXELS", str(50_000_000))
    full = load_image(big, size=None)
    assert full.shape == (6000, 8000, 3)
    # Normalised units (1 = 57 grey levels): 99 % of the values within 3 grey levels; the rest lie
    # on the drawing's sharp edges, which the full-size bicubic samples without smoothing.
    gap = np.abs(preprocess(drafted) - preprocess(full))
    assert gap.mean() < 0.01 and np.quantile(gap, 0.99) < 0.05, (gap.mean(), np.quantile(gap, 0.99))
    del full
    out = tmp_path / "feats.npz"
    code, _, err, peak = cli_peak_rss("embed", big, first, other, "--no-pretrained", "--no-flip", "--out", out,
                                      env=plain_env(tmp_path), tmp=tmp_path)
    assert code == 0, err[-3000:]
    assert peak < RSS_LIMIT, peak
    with np.load(out) as saved:
        f = saved["features"]
    same, different = float(f[0] @ f[1]), float(f[0] @ f[2])
    assert same > 0.999 and same > different, (same, different)


# --------------------------------------------------------------------------- item 10: smaller cases


def test_deeply_nested_manifest_is_a_manifest_error(site):
    manifest = site.tmp / "deep.json"
    manifest.write_text('{"assets": ' + "[" * 200_000 + "]" * 200_000 + "}")
    for command in ("download", "verify"):
        proc = cli(command, env=dict(site.env, VEHICLENET_ASSETS=str(manifest)))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"manifest {manifest} (from $VEHICLENET_ASSETS) is nested too deeply" in proc.stderr
        assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert site.server.requests == [] and not site.cache.exists()


@pytest.mark.parametrize("name", [".locks", "kernels", "w\nckpt", "w\r.ckpt", "sub/w.ckpt", "..\\w.ckpt", "/etc/passwd"])
def test_manifest_file_names_the_cache_cannot_hold_are_refused(site, name):
    manifest = write_manifest(site.tmp, [asset_entry("w", name, PAYLOAD, [site.url])])
    proc = cli("download", env=dict(site.env, VEHICLENET_ASSETS=str(manifest)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"asset #0 ('w'), key 'file': {name!r}" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line: a newline in the name is shown escaped
    assert site.server.requests == [] and not site.cache.exists()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_fifo_or_device_as_checkpoint_is_not_a_regular_file(tmp_path, kind):
    """Reported by what it is, at once (no read that blocks or never ends), before MindSpore
    is imported; the library's loader says the same."""
    from vehiclenet.model.checkpoint import read_checkpoint
    from vehiclenet.errors import CheckpointError

    ckpt = Path(kind)
    if kind == "fifo":
        ckpt = tmp_path / "weights.ckpt"
        os.mkfifo(ckpt)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    (img,) = make_images(tmp_path / "imgs", 1)
    proc = cli("embed", img, "--out", tmp_path / "f.npz", "--checkpoint", ckpt, env=plain_env(tmp_path),
               importtime=True, timeout=60)
    assert proc.returncode == 1
    assert f"error: checkpoint {str(ckpt)!r} is {what}, not a regular file" in proc.stderr
    assert "does not exist" not in proc.stderr and not imported_mindspore(proc.stderr)
    with pytest.raises(CheckpointError, match=f"is {re.escape(what)}, not a regular file"):
        read_checkpoint(ckpt)


def write_feature_set(path: Path, query: np.ndarray, gallery: np.ndarray) -> Path:
    nq, ng = len(query), len(gallery)
    query, gallery = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30) for x in (query, gallery))
    np.savez(path, query_features=query, query_ids=np.arange(nq), query_cams=np.zeros(nq, np.int64),
             gallery_features=gallery, gallery_ids=np.arange(ng) % max(nq, 1), gallery_cams=np.ones(ng, np.int64))
    return path


def test_evaluate_refuses_zero_width_and_all_zero_features(tmp_path):
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    env = plain_env(tmp_path)
    good = write_feature_set(tmp_path / "good.npz", query, gallery)
    proc = cli("evaluate", "--features", good, env=env, importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the same data with usable rows is evaluated
    narrow = write_feature_set(tmp_path / "narrow.npz", query[:, :0], gallery[:, :0])
    gallery[[1, 3]] = 0
    zero = write_feature_set(tmp_path / "zero.npz", query, gallery)
    for path, words in ((narrow, "query_features has shape (2, 0): 0-wide features"),
                        (zero, "gallery_features has 2 all-zero row(s) (rows 1, 3)")):
        proc = cli("evaluate", "--features", path, env=env, importtime=True)
        assert proc.returncode == 1
        assert f"vehiclenet evaluate: error: {path}: {words}" in proc.stderr
        assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
        assert not imported_mindspore(proc.stderr)


def test_rank_refuses_a_gallery_file_with_nan_rows(tmp_path):
    """A NaN row would rank last with distance nan; like every reader of features, rank refuses the file."""
    from vehiclenet.embedding.result import save_features

    (query,) = make_images(tmp_path / "q", 1)
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 512)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats[1] = np.nan
    names = [str(tmp_path / f"g{i}.jpg") for i in range(3)]
    gallery = save_features(tmp_path / "gallery.npz", feats, names, flip=False)
    proc = cli("rank", "--query", query, "--gallery", gallery, "--no-pretrained", "--no-flip", "--no-picture",
               env=plain_env(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"vehiclenet rank: error: {gallery}: features contains NaN or inf (row 1)" in proc.stderr
    assert proc.stdout == ""


def test_empty_input_folder_is_reported_before_the_network(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here\n")
    (query,) = make_images(tmp_path / "q", 1)
    env = plain_env(tmp_path)
    runs = [("embed", empty, "--out", tmp_path / "f.npz"),
            ("rank", "--query", query, "--gallery", empty, "--no-picture")]
    for args in runs:
        proc = cli(*args, "--checkpoint", MISSING_WEIGHTS, env=env, importtime=True)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"vehiclenet {args[0]}: error: {empty}: folder holds no image files" in proc.stderr
        assert MISSING_WEIGHTS not in proc.stderr and not imported_mindspore(proc.stderr)
    assert not (tmp_path / "f.npz").exists()
