"""Manifest loading and validation."""
import json

import pytest

from vehiclenet.weights.assets import PACKAGED_MANIFEST, Asset, get_asset, load_manifest, parse_manifest, url_problem
from vehiclenet.errors import ManifestError

GOOD_SHA = "e38499b0dbc409d74bfd266533b7d3c3f0ee020811fb3bf6c60869c82eb36028"
R18 = "https://download.mindspore.cn/models/r1.8/vehiclenet_ascend_v180_vehiclenetdataset_research_cv_mAP83.71_rank1acc94.34.ckpt"
R110 = "https://download.mindspore.cn/models/r1.10/vehiclenet_ascend_v1100_vehiclenetdataset_research_cv_mAP83.71_rank1acc94.34.ckpt"


def entry(**overrides):
    base = {"name": "m", "file": "m.ckpt", "sha256": "a" * 64, "urls": ["https://example.org/m.ckpt"]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def write(tmp_path, data):
    path = tmp_path / "assets.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("VEHICLENET_ASSETS", raising=False)


def test_packaged_manifest_is_the_published_model():
    assets = load_manifest()
    default = get_asset()
    assert default is not None and default == assets[0]
    assert default.sha256 == GOOD_SHA
    assert default.urls == (R18, R110)
    assert default.file == R18.rsplit("/", 1)[1]
    assert default.num_classes == 575 and default.last_stride == 2 and default.input_size == (384, 384)
    assert default.size is None or default.size > 250_000_000
    assert "protocol" in default.metrics and default.metrics["mAP"] == pytest.approx(0.8371)
    assert default.license and default.source
    assert default.manifest == PACKAGED_MANIFEST
    assert get_asset(default.name) == default
    hash(default)  # usable as a dict key despite its mapping fields


def test_env_var_selects_another_manifest(tmp_path, monkeypatch):
    path = write(tmp_path, {"assets": [entry(name="private", size=123, extra_key=[1, 2])]})
    monkeypatch.setenv("VEHICLENET_ASSETS", str(path))
    asset = get_asset()
    assert isinstance(asset, Asset)
    assert asset.name == "private" and asset.size == 123 and asset.get("extra_key") == [1, 2]
    assert asset.manifest == path


def test_unknown_name_lists_known_names(tmp_path):
    path = write(tmp_path, {"assets": [entry(name="a", file="a.ckpt"), entry(name="b", file="b.ckpt")]})
    with pytest.raises(ManifestError) as err:
        get_asset("c", manifest=path)
    assert "'c'" in str(err.value) and "a, b" in str(err.value)
    assert get_asset("b", manifest=path).file == "b.ckpt"


def test_network_settings_are_parsed_and_optional():
    (full, bare) = parse_manifest({"assets": [entry(name="a", num_classes=10, last_stride=1, input_size=[256, 128]),
                                              entry(name="b", file="b.ckpt")]})
    assert (full.num_classes, full.last_stride, full.input_size) == (10, 1, (256, 128))
    assert (bare.num_classes, bare.last_stride, bare.input_size) == (None, None, None)
    assert "last_stride" not in full.extra and "input_size" not in full.extra


def test_sha256_is_normalised_to_lower_case():
    (asset,) = parse_manifest({"assets": [entry(sha256="ABCDEF" + "0" * 58)]})
    assert asset.sha256 == "abcdef" + "0" * 58


@pytest.mark.parametrize(
    "bad, key, words",
    [
        (entry(sha256=...), "sha256", "is missing"),
        (entry(sha256="xyz"), "sha256", "64 hexadecimal"),
        (entry(sha256="g" * 64), "sha256", "64 hexadecimal"),
        (entry(sha256="a" * 63), "sha256", "64 hexadecimal"),
        (entry(file="models/m.ckpt"), "file", "bare file name"),
        (entry(file="..\\m.ckpt"), "file", "bare file name"),
        (entry(file=".."), "file", "bare file name"),
        (entry(file=""), "file", "non-empty"),
        (entry(urls=["http://example.org/m.ckpt"]), "urls", "only https"),
        (entry(urls=["ftp://example.org/m.ckpt"]), "urls", "only https"),
        (entry(urls=[]), "urls", "non-empty list"),
        (entry(urls="https://example.org/m.ckpt"), "urls", "non-empty list"),
        (entry(urls=...), "urls", "is missing"),
        (entry(name=...), "name", "is missing"),
        (entry(size=-5), "size", "positive integer"),
        (entry(size="300MB"), "size", "positive integer"),
        (entry(num_classes=0), "num_classes", "positive integer"),
        (entry(last_stride=3), "last_stride", "not 1 or 2"),
        (entry(last_stride=True), "last_stride", "not 1 or 2"),
        (entry(input_size=[384]), "input_size", "[height, width]"),
        (entry(input_size=[384, 16]), "input_size", "at least 32"),
        (entry(input_size="384x384"), "input_size", "[height, width]"),
        (entry(input_size=[384.0, 384]), "input_size", "[height, width]"),
        (entry(metrics=[1]), "metrics", "must be an object"),
    ],
)
def test_malformed_entries_name_file_asset_and_key(tmp_path, bad, key, words):
    path = write(tmp_path, {"assets": [entry(name="ok", file="ok.ckpt"), bad]})
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert str(path) in text
    assert "asset #1" in text
    assert f"key {key!r}" in text
    assert words in text
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    "data, words",
    [
        ("{not json", "not valid JSON"),
        ([], "top level"),
        ({"assets": []}, "non-empty list"),
        ({"assets": {}}, "non-empty list"),
        ({"schema": 99, "assets": [entry()]}, "schema 99"),
        ({"assets": [entry(), entry()]}, "names must be unique"),
        ({"assets": ["x"]}, "must be a JSON object"),
    ],
)
def test_malformed_manifests(tmp_path, data, words):
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_missing_manifest_file_mentions_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("VEHICLENET_ASSETS", str(tmp_path / "nope.json"))
    with pytest.raises(ManifestError) as err:
        load_manifest()
    assert "VEHICLENET_ASSETS" in str(err.value) and "nope.json" in str(err.value)


def test_non_utf8_manifest_is_a_manifest_error(tmp_path, monkeypatch):
    path = tmp_path / "assets.json"
    path.write_bytes(b"\xff\xfe{")  # e.g. saved as UTF-16 by an editor
    monkeypatch.setenv("VEHICLENET_ASSETS", str(path))
    with pytest.raises(ManifestError) as err:
        load_manifest()
    text = str(err.value)
    assert str(path) in text and "VEHICLENET_ASSETS" in text and "UTF-8" in text
    assert err.value.exit_code == 2


def test_size_null_or_absent_means_unknown():
    a, b = parse_manifest({"assets": [entry(name="a", size=None), entry(name="b")]})
    assert a.size is None and b.size is None


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://example.org/x", True),
        ("http://127.0.0.1:8000/x", True),
        ("http://127.5.5.5/x", True),
        ("http://[::1]:8000/x", True),
        ("http://localhost/x", True),
        ("http://example.org/x", False),
        ("http://10.0.0.1/x", False),
        ("file:///etc/passwd", False),
        ("https:///nohost", False),
    ],
)
def test_url_policy(url, ok):
    assert (url_problem(url) is None) is ok
