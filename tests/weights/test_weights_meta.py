"""The manifest asset's num_classes, last_stride and input_size drive create_network and the
feature pipeline, unless the caller passes them (issue 15, must-show 3).

A real HTTP server on 127.0.0.1 serves a generated 10-identity checkpoint listed in a test
manifest (VEHICLENET_ASSETS) as an asset with its own settings."""
import hashlib
import logging

import numpy as np
import pytest
from PIL import Image

from support.http_server import Route, write_manifest
from vehiclenet import create_network
from vehiclenet.model.factory import WeightsMeta

OTHER = "vehiclenet_other_10ids"
FILE = "vehiclenet_other_10ids.ckpt"
HEAD = ("classifier.classifier.weight", "classifier.classifier.bias")


@pytest.fixture(scope="module")
def ten_id_checkpoint(tmp_path_factory):
    """A network-only checkpoint with a 10-identity head (random weights), and its bytes."""
    import mindspore as ms

    from vehiclenet.model.network import VehicleNet

    path = tmp_path_factory.mktemp("other") / FILE
    ms.save_checkpoint(VehicleNet(num_classes=10), str(path))
    return path, path.read_bytes()


@pytest.fixture
def other_asset(http_server, ten_id_checkpoint, tmp_path, monkeypatch):
    """A manifest whose second asset is the 10-identity file, trained (it says) with layer4
    stride 1 and evaluated at 128x96; the first (default) asset says nothing of the kind."""
    path, data = ten_id_checkpoint
    url = http_server.add("/" + FILE, Route(body=data))
    sha = hashlib.sha256(data).hexdigest()
    plain = {"name": "plain", "file": "plain.ckpt", "sha256": "0" * 64, "urls": [http_server.url("/none")]}
    other = {"name": OTHER, "file": FILE, "sha256": sha, "urls": [url], "size": len(data),
             "num_classes": 10, "last_stride": 1, "input_size": [128, 96]}
    monkeypatch.setenv("VEHICLENET_ASSETS", str(write_manifest(tmp_path, [plain, other])))
    return path


def _file_weights(path):
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_asset_settings_build_the_network_without_arguments(other_asset):
    import mindspore as ms

    net = create_network(pretrained=OTHER)  # no num_classes=, no last_stride=
    assert net.weights_meta == WeightsMeta(num_classes=10, last_stride=1, input_size=(128, 96), asset=OTHER)
    assert tuple(net.classifier.classifier.weight.shape) == (10, 512)
    assert net.load_report.reinitialized == []  # the head came from the file, all 273 entries
    assert len(net.load_report.loaded) == 273
    want = _file_weights(other_asset)
    for name in HEAD + ("model.layer4.0.conv2.weight",):
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), want[name])
    x = ms.Tensor(np.zeros((1, 3, 128, 96), np.float32))
    assert net.model.feature_map(x).shape == (1, 2048, 8, 6)  # layer4 at stride 1: /16
    assert net(x).shape == (1, 10)


def test_explicit_arguments_win_over_the_asset(other_asset, caplog):
    import mindspore as ms

    caplog.set_level(logging.INFO, logger="vehiclenet")
    net = create_network(pretrained=OTHER, num_classes=4, last_stride=2)
    assert net.weights_meta == WeightsMeta(num_classes=4, last_stride=2, input_size=(128, 96), asset=OTHER)
    assert tuple(net.classifier.classifier.weight.shape) == (4, 512)
    assert sorted(net.load_report.reinitialized) == sorted(HEAD) and net.load_report.file_num_classes == 10
    assert "freshly initialised" in caplog.text
    assert "were trained with layer4 stride 1" in caplog.text
    want = _file_weights(other_asset)
    np.testing.assert_array_equal(net.classifier.dense.weight.asnumpy(), want["classifier.dense.weight"])
    x = ms.Tensor(np.zeros((1, 3, 128, 96), np.float32))
    assert net.model.feature_map(x).shape == (1, 2048, 4, 3)  # stride 2: /32


def test_local_checkpoint_and_random_weights_keep_the_published_settings(other_asset):
    net = create_network(checkpoint=other_asset, num_classes=10)
    assert net.weights_meta == WeightsMeta(num_classes=10, last_stride=2, input_size=(384, 384), asset=None)
    bare = create_network(pretrained=False, include_top=False)
    assert bare.weights_meta == WeightsMeta() and bare.weights_meta.input_size == (384, 384)


def test_embedding_resizes_to_the_assets_input_size(other_asset, tmp_path):
    from vehiclenet.embedding.features import embed, input_size

    rng = np.random.default_rng(5)
    files = []
    for i in range(2):
        files.append(tmp_path / f"car{i}.png")
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(files[-1])
    emb = create_network(pretrained=OTHER, include_top=False)
    assert input_size(emb) == (128, 96)
    auto = embed(emb, files, batch_size=2).features
    np.testing.assert_array_equal(auto, embed(emb, files, batch_size=2, size=(128, 96)).features)
    # Another size gives other features (a network on 384x384 would not match the asset's).
    other = embed(emb, files, batch_size=2, size=(64, 64)).features
    assert np.abs(auto - other).max() > 1e-3


def test_embed_command_uses_the_default_assets_settings(http_server, ten_id_checkpoint, tmp_path, monkeypatch):
    """`vehiclenet embed` with the published weights switched, through the manifest, to an
    asset evaluated at 128x96 with layer4 stride 1: the command builds and resizes accordingly."""
    import os
    import subprocess
    import sys

    from vehiclenet.embedding.features import embed

    path, data = ten_id_checkpoint
    url = http_server.add("/" + FILE, Route(body=data))
    other = {"name": OTHER, "file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "urls": [url],
             "num_classes": 10, "last_stride": 1, "input_size": [128, 96]}
    monkeypatch.setenv("VEHICLENET_ASSETS", str(write_manifest(tmp_path, [other])))
    rng = np.random.default_rng(6)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / f"car{i}.png")
    done = subprocess.run([sys.executable, "-m", "vehiclenet", "embed", "car0.png", "car1.png", "--out", "f.npz"],
                          cwd=tmp_path, env=dict(os.environ, GLOG_v="3"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "f.npz")["features"]
    files = [tmp_path / "car0.png", tmp_path / "car1.png"]
    emb = create_network(checkpoint=path, last_stride=1, include_top=False)
    np.testing.assert_allclose(got, embed(emb, files, size=(128, 96)).features, rtol=0, atol=1e-5)
    assert np.abs(got - embed(emb, files, size=(384, 384)).features).max() > 1e-3


def test_export_follows_the_assets_input_size(other_asset, tmp_path):
    """ONNX export of the asset without --image-size: the file takes the asset's 128x96
    input at any batch; --image-size still wins."""
    import onnxruntime as ort

    from vehiclenet.model.export import export_embedding

    net = create_network(pretrained=OTHER, include_top=False, mode="graph")
    path = export_embedding(tmp_path / "other.onnx", file_format="ONNX", pretrained=OTHER)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 128, 96]
    x = np.random.default_rng(7).standard_normal((2, 3, 128, 96)).astype(np.float32)
    import mindspore as ms

    want = net(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], want, rtol=0, atol=1e-4)
    square = export_embedding(tmp_path / "square.onnx", file_format="ONNX", pretrained=OTHER, image_size=64)
    shape = ort.InferenceSession(str(square), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert shape[1:] == [3, 64, 64]
