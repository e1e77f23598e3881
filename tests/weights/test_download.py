"""Download, resume, retry, verification and cache behaviour against a real local HTTP server."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vehiclenet.weights import download as dl
from vehiclenet.weights.assets import get_asset
from vehiclenet.errors import DownloadChecksumError, DownloadError, ManifestError, OfflineError

from support.http_server import (
    Route,
    asset_entry,
    make_payload,
    sha256_hex,
    subprocess_env,
    write_manifest,
)

FILE = "test_model.ckpt"
PAYLOAD = make_payload()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache and manifest; short timeouts and backoff so failures are quick."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VEHICLENET_HOME", str(cache))
    for key in ("VEHICLENET_MIRROR", "VEHICLENET_OFFLINE", "VEHICLENET_ASSETS", "VEHICLENET_TIMEOUT",
                "VEHICLENET_RETRIES", "VEHICLENET_BACKOFF", "VEHICLENET_LOCK_TIMEOUT",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("VEHICLENET_TIMEOUT", "2,2")
    monkeypatch.setenv("VEHICLENET_RETRIES", "3")
    monkeypatch.setenv("VEHICLENET_BACKOFF", "0.05")
    dl._verified.clear()
    return tmp_path


def use_manifest(tmp_path, monkeypatch, urls, data=PAYLOAD, size=None, name="test"):
    manifest = write_manifest(tmp_path, [asset_entry(name, FILE, data, urls, size=size)])
    monkeypatch.setenv("VEHICLENET_ASSETS", str(manifest))
    return get_asset(name)


def cache_listing(cache: Path):
    return sorted(p.name for p in cache.iterdir() if p.name != ".locks") if cache.exists() else []


def full_gets(server, path):
    return [r for r in server.requests_for(path) if r.status == 200]


def test_normal_download(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    asset = use_manifest(env, monkeypatch, [url], size=len(PAYLOAD))
    path = dl.fetch(progress=False)
    assert path == env / "cache" / FILE
    assert path.read_bytes() == PAYLOAD
    assert cache_listing(path.parent) == [FILE]
    # Second call: served from the cache, no request.
    n = len(http_server.requests)
    assert dl.fetch(asset, progress=False) == path
    assert len(http_server.requests) == n


def test_dropped_connection_is_resumed_with_range(env, http_server, monkeypatch):
    half = len(PAYLOAD) // 2
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, drop_at=[half, half + 1024 * 1024 + 7]))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    assert sha256_hex(path.read_bytes()) == sha256_hex(PAYLOAD)
    reqs = http_server.requests_for("/m.ckpt")
    assert [r.status for r in reqs] == [200, 206, 206]
    # Bytes of an unfinished 1 MiB read are lost with the connection, so a resume starts at
    # most one chunk before the drop, never after it, and always moves forward.
    starts = [int(r.range.split("=")[1].rstrip("-")) for r in reqs[1:]]
    assert half - dl.CHUNK < starts[0] <= half
    assert starts[0] < starts[1] <= half + 1024 * 1024 + 7
    assert cache_listing(path.parent) == [FILE]


def test_partial_file_from_earlier_run_is_resumed(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    asset = use_manifest(env, monkeypatch, [url])
    cache = env / "cache"
    cache.mkdir()
    (cache / (FILE + ".part")).write_bytes(PAYLOAD[:1000000])
    path = dl.fetch(asset, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.range for r in http_server.requests_for("/m.ckpt")] == ["bytes=1000000-"]


def test_stale_partial_file_is_discarded_after_mismatch(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    asset = use_manifest(env, monkeypatch, [url])
    cache = env / "cache"
    cache.mkdir()
    (cache / (FILE + ".part")).write_bytes(b"\0" * 1000000)  # not a prefix of the real file
    path = dl.fetch(asset, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.range for r in http_server.requests_for("/m.ckpt")] == ["bytes=1000000-", None]


def test_server_ignoring_range(env, http_server, monkeypatch):
    half = len(PAYLOAD) // 2
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, drop_at=[half], ignore_range=True))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    assert path.read_bytes() == PAYLOAD
    reqs = http_server.requests_for("/m.ckpt")
    assert [r.status for r in reqs] == [200, 200]
    assert reqs[0].range is None and reqs[1].range.startswith("bytes=")  # asked to resume, got the whole file


def test_503_twice_then_success(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, fail=[(503, None), (503, None)]))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.status for r in http_server.requests_for("/m.ckpt")] == [503, 503, 200]


def test_429_retry_after_is_honoured(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, fail=[(429, "1")]))
    use_manifest(env, monkeypatch, [url])
    t0 = time.monotonic()
    path = dl.fetch(progress=False)
    assert time.monotonic() - t0 >= 0.9
    assert path.read_bytes() == PAYLOAD


def test_persistent_503_gives_up_and_names_url(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, fail=[(503, None)] * 10))
    use_manifest(env, monkeypatch, [url])
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False, retries=2)
    assert url in str(err.value) and "503" in str(err.value)
    assert len(http_server.requests_for("/m.ckpt")) == 3  # first try + 2 retries


def test_404_on_first_url_then_second_url(env, http_server, monkeypatch):
    bad = http_server.add("/missing.ckpt", Route(status=404))
    good = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [bad, good])
    path = dl.fetch(progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.status for r in http_server.requests_for("/missing.ckpt")] == [404]  # 404 is not retried


def test_all_urls_fail_lists_each(env, http_server, monkeypatch):
    bad = http_server.add("/missing.ckpt", Route(status=404))
    refused = "http://127.0.0.1:9/nothing.ckpt"  # discard port: connection refused
    use_manifest(env, monkeypatch, [bad, refused])
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False, retries=1)
    text = str(err.value)
    assert bad in text and "404" in text
    assert refused in text and "refused" in text
    assert "VEHICLENET_MIRROR" in text  # says what to do
    assert cache_listing(env / "cache") == []


def free_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, never listened on, then closed: connections are refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [["download"], ["embed", "car.png", "--out", "f.npz"]])
def test_unreachable_servers_fail_at_once_one_line_each_saying_what_to_do(env, monkeypatch, command):
    """Offline: a host that does not resolve or refuses the connection is tried once (no retries,
    no backoff), each URL is one line of the error, which says how to go on without the network."""
    from PIL import Image

    for key in ("VEHICLENET_RETRIES", "VEHICLENET_BACKOFF", "VEHICLENET_TIMEOUT"):
        monkeypatch.delenv(key)  # the defaults: 4 retries, backoff from 0.5 s
    unresolved, refused = "https://vehiclenet-test.invalid/m.ckpt", f"http://127.0.0.1:{free_port()}/m.ckpt"
    manifest = write_manifest(env, [asset_entry("test", FILE, PAYLOAD, [unresolved, refused])])
    Image.new("RGB", (64, 48), (200, 30, 30)).save(env / "car.png")
    proc = subprocess.run([sys.executable, "-m", "vehiclenet", "--verbose", *command], cwd=env, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(VEHICLENET_ASSETS=str(manifest), GLOG_v="3"))
    assert proc.returncode == 1, proc.stderr
    # One connection attempt per host (urllib3 logs each at debug level), none retried.
    assert proc.stderr.count("Starting new HTTPS connection (1): vehiclenet-test.invalid:443") == 1, proc.stderr
    assert proc.stderr.count(f"Starting new HTTP connection (1): 127.0.0.1:{refused.split(':')[2].split('/')[0]}") == 1
    assert "Starting new HTTP connection (2)" not in proc.stderr and "Retrying" not in proc.stderr
    assert "WARNING" not in proc.stderr.replace("WARNING vehiclenet: --no-pretrained", "")
    error = proc.stderr[proc.stderr.index(f"vehiclenet {command[0]}: error:"):]
    assert f"  {unresolved}: host name could not be resolved\n" in error
    assert f"  {refused}: connection refused\n" in error
    assert "is this machine offline?" in error and "--checkpoint FILE" in error and "--no-pretrained" in error
    assert not (env / "f.npz").exists()


def test_wrong_bytes_are_deleted_and_error_shows_hashes(env, http_server, monkeypatch):
    wrong = bytearray(PAYLOAD)
    wrong[12345] ^= 1
    url = http_server.add("/m.ckpt", Route(body=bytes(wrong)))
    asset = use_manifest(env, monkeypatch, [url])
    with pytest.raises(DownloadChecksumError) as err:
        dl.fetch(progress=False)
    text = str(err.value)
    assert asset.sha256 in text and sha256_hex(bytes(wrong)) in text and url in text
    assert "nothing was kept" in text
    assert not (env / "cache" / FILE).exists()
    assert cache_listing(env / "cache") == []


def test_mirror_is_tried_first(env, http_server, monkeypatch):
    http_server.add("/mirror/" + FILE, Route(body=PAYLOAD))
    orig = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [orig])
    monkeypatch.setenv("VEHICLENET_MIRROR", http_server.url("/mirror/"))
    dl.fetch(progress=False)
    assert len(http_server.requests_for("/mirror/" + FILE)) == 1
    assert http_server.requests_for("/m.ckpt") == []


def test_bad_mirror_wrong_bytes_falls_back_to_manifest_url(env, http_server, monkeypatch):
    http_server.add("/mirror/" + FILE, Route(body=b"x" * 1000))
    orig = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [orig])
    monkeypatch.setenv("VEHICLENET_MIRROR", http_server.url("/mirror"))
    assert dl.fetch(progress=False).read_bytes() == PAYLOAD


def test_stalled_server_read_timeout(env, http_server, monkeypatch):
    # Past the first 1 MiB read, so real bytes arrive before the stall (a read cut off by the
    # timeout loses its bytes, and an empty .part is not kept).
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, stall_at=dl.CHUNK + 100000))
    use_manifest(env, monkeypatch, [url])
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False, timeout=(2.0, 0.5), retries=1)
    elapsed = time.monotonic() - t0
    assert "timed out" in str(err.value)
    assert elapsed < 5
    # The partial is kept (not under the final name) so a later run can resume.
    assert cache_listing(env / "cache") == [FILE + ".part"]
    assert (env / "cache" / (FILE + ".part")).stat().st_size >= dl.CHUNK


def test_stall_once_then_resume(env, http_server, monkeypatch):
    stall = dl.CHUNK + 100000
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, stall_at=stall, stall_times=1))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False, timeout=(2.0, 0.5))
    assert path.read_bytes() == PAYLOAD
    ranges = [r.range for r in http_server.requests_for("/m.ckpt")]
    assert ranges[0] is None and len(ranges) == 2
    assert stall - dl.CHUNK < int(ranges[1].split("=")[1].rstrip("-")) <= stall


def test_content_length_disagreeing_with_manifest_size(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url], size=len(PAYLOAD) + 1)
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False)
    assert "manifest says" in str(err.value)
    assert cache_listing(env / "cache") == []


def test_redirect_to_https_url_followed_but_to_remote_http_refused(env, http_server, monkeypatch):
    http_server.add("/m.ckpt", Route(body=PAYLOAD))
    local = http_server.add("/r1", Route(redirect="/m.ckpt"))
    remote = http_server.add("/r2", Route(redirect="http://example.com/m.ckpt"))
    use_manifest(env, monkeypatch, [remote])
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False)
    assert "http://example.com/m.ckpt" in str(err.value) and "refused" in str(err.value)
    use_manifest(env, monkeypatch, [local])
    assert dl.fetch(progress=False).read_bytes() == PAYLOAD


def test_offline_without_cache_fails_with_instructions(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    asset = use_manifest(env, monkeypatch, [url])
    monkeypatch.setenv("VEHICLENET_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        dl.fetch(progress=False)
    text = str(err.value)
    assert str(env / "cache" / FILE) in text and "vehiclenet download" in text and asset.sha256 in text
    assert http_server.requests == []


def test_offline_with_cache_uses_it(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    n = len(http_server.requests)
    dl._verified.clear()  # as in a new process: the full hash runs again
    assert dl.fetch(progress=False, offline=True) == path
    assert len(http_server.requests) == n


def test_corrupted_cache_is_set_aside_and_fetched_again(env, http_server, monkeypatch, caplog):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    with open(path, "r+b") as f:  # same size, one byte changed: only the hash can tell
        f.seek(777)
        f.write(b"\xff" if PAYLOAD[777] != 0xFF else b"\x00")
    dl._verified.clear()
    with caplog.at_level(logging.WARNING, logger="vehiclenet.weights.download"):
        again = dl.fetch(progress=False)
    assert again == path and path.read_bytes() == PAYLOAD
    assert (path.parent / (FILE + ".corrupt")).exists()
    assert any("corrupted" in r.message for r in caplog.records)
    assert len(full_gets(http_server, "/m.ckpt")) == 2


def test_corrupted_cache_offline_is_set_aside_and_error(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    path.write_bytes(PAYLOAD[:-1])
    dl._verified.clear()
    with pytest.raises(OfflineError) as err:
        dl.fetch(progress=False, offline=True)
    assert "corrupted" in str(err.value)
    assert not path.exists()


def test_corrupted_cache_offline_does_not_claim_a_refetch(env, http_server, monkeypatch, caplog):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    path = dl.fetch(progress=False)
    path.write_bytes(PAYLOAD[:-1])
    dl._verified.clear()
    n = len(http_server.requests)
    monkeypatch.setenv("VEHICLENET_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="vehiclenet.weights.download"):
        with pytest.raises(OfflineError) as err:
            dl.fetch(progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupted" in m and "not fetching it again" in m and "VEHICLENET_OFFLINE" in m for m in messages)
    assert not any("and fetching it again" in m for m in messages)
    text = str(err.value)
    assert str(path) + ".corrupt" in text and f"belongs at {path}" in text
    assert len(http_server.requests) == n


@pytest.mark.parametrize("force, offline", [(False, False), (True, False), (False, True)])
def test_directory_at_cache_path_is_refused_before_download(env, http_server, monkeypatch, force, offline):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    folder = env / "cache" / FILE
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False, force=force, offline=offline)
    text = str(err.value)
    assert str(folder) in text and "directory" in text and "remove or rename" in text
    assert http_server.requests == []
    assert cache_listing(env / "cache") == [FILE]  # no .part left
    assert (folder / "keep.txt").read_text() == "mine"


def test_force_downloads_again(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    dl.fetch(progress=False)
    dl.fetch(progress=False, force=True)
    assert len(full_gets(http_server, "/m.ckpt")) == 2


def test_unknown_asset_name_lists_known(env, http_server, monkeypatch):
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    with pytest.raises(ManifestError) as err:
        dl.fetch("nope")
    assert "'nope'" in str(err.value) and "test" in str(err.value)


def test_cache_dir_default_uses_platform_cache(monkeypatch):
    monkeypatch.delenv("VEHICLENET_HOME", raising=False)
    import platformdirs

    assert dl.cache_dir() == Path(platformdirs.user_cache_dir("vehiclenet", appauthor=False))


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(PAYLOAD)
    assert dl.sha256_file(p) == sha256_hex(PAYLOAD)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert dl.sha256_file(empty) == sha256_hex(b"")


def test_four_processes_download_once(env, http_server, monkeypatch):
    # Slow server so the four processes really overlap.
    url = http_server.add("/m.ckpt", Route(body=PAYLOAD, delay_per_chunk=0.02))
    use_manifest(env, monkeypatch, [url])
    child_env = subprocess_env(**{k: v for k, v in os.environ.items() if k.startswith("VEHICLENET_")})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vehiclenet", "download"],
            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(env / "cache" / FILE)}
    assert Path(paths.pop()).read_bytes() == PAYLOAD
    assert len(full_gets(http_server, "/m.ckpt")) == 1
    assert cache_listing(env / "cache") == [FILE]
    logs = [err for _, err in outs]
    assert sum("downloaded and verified" in e for e in logs) == 1
    # The others really overlapped: they waited on the lock, then found the verified file.
    assert sum("downloaded by another process" in e for e in logs) >= 1


def test_lock_timeout_names_lock_and_what_to_do(env, http_server, monkeypatch):
    import filelock

    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    asset = use_manifest(env, monkeypatch, [url])
    lock_file = dl._lock_path(dl.cached_path(asset))
    lock_file.parent.mkdir(parents=True)
    holder = filelock.FileLock(str(lock_file))
    with holder:
        # A different lock object on the same file, as another process would have.
        import threading

        errors = []
        t = threading.Thread(target=lambda: errors.append(_catch(lambda: dl.fetch(progress=False, lock_timeout=0.3))))
        t.start()
        t.join(10)
    assert errors and isinstance(errors[0], DownloadError)
    assert "VEHICLENET_LOCK_TIMEOUT" in str(errors[0]) and str(lock_file) in str(errors[0])
    assert http_server.requests == []


def _catch(func):
    try:
        func()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None


def test_not_enough_disk_space(env, http_server, monkeypatch):
    import shutil
    from collections import namedtuple

    url = http_server.add("/m.ckpt", Route(body=PAYLOAD))
    use_manifest(env, monkeypatch, [url])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError) as err:
        dl.fetch(progress=False)
    assert "MB free" in str(err.value) and "VEHICLENET_HOME" in str(err.value)
    assert not (env / "cache" / FILE).exists()
