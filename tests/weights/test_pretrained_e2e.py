"""create_network(pretrained=True) end to end: a real HTTP server on 127.0.0.1 serves a
published-layout checkpoint; one call downloads, verifies and loads it."""
import hashlib

import numpy as np
import pytest

from support.http_server import Route, write_manifest
from vehiclenet import create_network
from vehiclenet.weights.download import cached_path
from vehiclenet.errors import ChecksumError, DownloadError

FILE = "vehiclenet_test_published_layout.ckpt"


@pytest.fixture(scope="module")
def published_bytes(published_ckpt) -> bytes:
    return published_ckpt.read_bytes()


def _manifest(tmp_path, data: bytes, urls) -> None:
    entry = {"name": "vehiclenet_test", "file": FILE, "sha256": hashlib.sha256(data).hexdigest(),
             "urls": urls, "size": len(data), "num_classes": 575}
    return write_manifest(tmp_path, [entry])


def test_pretrained_downloads_verifies_and_loads(http_server, published_bytes, published_ckpt, tmp_path,
                                                 monkeypatch):
    import mindspore as ms

    # The first connection drops a third of the way in: the call must resume and still verify.
    url = http_server.add("/r1.8/" + FILE, Route(body=published_bytes, drop_at=[len(published_bytes) // 3]))
    monkeypatch.setenv("VEHICLENET_ASSETS", str(_manifest(tmp_path, published_bytes, [url])))
    monkeypatch.setenv("VEHICLENET_BACKOFF", "0")

    net = create_network(pretrained=True, include_top=True)
    cached = cached_path("vehiclenet_test")
    assert cached.read_bytes() == published_bytes
    ranges = [r.range for r in http_server.requests_for("/r1.8/" + FILE)]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    assert ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-", ranges  # resumed, not restarted
    want = ms.load_checkpoint(str(published_ckpt), specify_prefix="model.layer3.5.conv2.weight")
    np.testing.assert_array_equal(net.model.layer3[5].conv2.weight.asnumpy(),
                                  want["model.layer3.5.conv2.weight"].asnumpy())

    # Second call: served from the verified cache, no request.
    before = len(http_server.requests)
    emb = create_network(pretrained="vehiclenet_test", include_top=False)
    assert len(http_server.requests) == before
    out = emb(ms.Tensor(np.zeros((1, 3, 128, 128), np.float32))).asnumpy()
    assert out.shape == (1, 512) and np.isfinite(out).all()


def test_pretrained_via_mirror(http_server, published_bytes, tmp_path, monkeypatch):
    """VEHICLENET_MIRROR is tried first: the manifest's own URL (a 404 here) is never needed."""
    http_server.add("/mirror/" + FILE, Route(body=published_bytes))
    dead = http_server.add("/gone/" + FILE, Route(status=404))
    monkeypatch.setenv("VEHICLENET_ASSETS", str(_manifest(tmp_path, published_bytes, [dead])))
    monkeypatch.setenv("VEHICLENET_MIRROR", http_server.url("/mirror"))
    net = create_network(pretrained=True, include_top=False, num_classes=575)
    assert sum(p.size for p in net.get_parameters()) > 20_000_000
    assert http_server.requests_for("/gone/" + FILE) == []


def test_tampered_weights_are_never_loaded(http_server, published_bytes, tmp_path, monkeypatch):
    tampered = bytearray(published_bytes)
    tampered[len(tampered) // 2] ^= 0xFF
    url = http_server.add("/bad/" + FILE, Route(body=bytes(tampered)))
    monkeypatch.setenv("VEHICLENET_ASSETS", str(_manifest(tmp_path, published_bytes, [url])))
    monkeypatch.setenv("VEHICLENET_RETRIES", "0")
    with pytest.raises((ChecksumError, DownloadError)) as err:
        create_network(pretrained=True)
    assert hashlib.sha256(published_bytes).hexdigest() in str(err.value)
    assert url in str(err.value)
    folder = cached_path("vehiclenet_test").parent
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(FILE)] if folder.exists() else []
    assert leftovers == []  # neither the final name nor a .part holding the wrong bytes
