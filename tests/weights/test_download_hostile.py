"""Hostile caches, servers and manifests against the download (issue 14): links, FIFOs,
devices and sockets where the cache keeps its files; credentials in URLs; servers that trickle
or send more than the asset; manifests that name files the cache cannot hold.

Each case plants the real thing and runs ``python -m vehiclenet`` in a subprocess; it asserts
the exit code, the message naming the path, that the victim is exactly what it was, and that
nothing is left behind. FIFO cases run under a subprocess timeout, so a regression hangs
nothing but fails.
"""
import base64
import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest

from support.hostile import FILE, PAYLOAD, PRECIOUS, TIMEOUT, cli, snapshot, tree
from support.http_server import Route, TestServer, asset_entry, make_payload, write_manifest


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


# --------------------------------------------------------------------------- manifests


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
