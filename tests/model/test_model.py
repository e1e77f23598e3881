"""The network is parameter-for-parameter the published VehicleNet, and loads its files."""
import logging

import numpy as np
import pytest

import hub_conf
from support.checkpoints import published_parameters, write_published_layout
from vehiclenet.model.checkpoint import load_weights
from vehiclenet.errors import CheckpointError


def _features(net, x):
    import mindspore as ms

    return net(ms.Tensor(x)).asnumpy()


def test_parameter_names_and_shapes_match_published_table():
    net = hub_conf.create_network(pretrained=False)
    got = [(p.name, tuple(p.shape)) for p in net.get_parameters()]
    assert len(got) == 273
    assert got == published_parameters()


def test_full_size_embedding_and_feature_map_shapes():
    import mindspore as ms

    net = hub_conf.create_network(pretrained=False, include_top=False)
    x = np.random.default_rng(1).standard_normal((2, 3, 384, 384)).astype(np.float32)
    emb = _features(net, x)
    assert emb.shape == (2, 512) and np.isfinite(emb).all()
    # layer4 keeps stride 2, as the published weights were trained: 384 / 32 = 12.
    fmap = net.model.feature_map(ms.Tensor(x)).asnumpy()
    assert fmap.shape == (2, 2048, 12, 12)
    # the embedding is the head's bn1 output of the spatially averaged map
    pooled = fmap.mean(axis=(2, 3))
    head = net.classifier
    w, b = head.dense.weight.asnumpy(), head.dense.bias.asnumpy()
    bn = {k: getattr(head.bn1, k).asnumpy() for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    dense = pooled @ w.T + b
    expected = (dense - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-5) * bn["gamma"] + bn["beta"]
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)


def test_last_stride_one_is_an_explicit_option():
    import mindspore as ms

    net = hub_conf.create_network(pretrained=False, include_top=False, last_stride=1, mode="pynative")
    x = ms.Tensor(np.zeros((1, 3, 128, 128), np.float32))
    assert net.model.feature_map(x).shape == (1, 2048, 8, 8)
    with pytest.raises(ValueError, match="last_stride"):
        hub_conf.create_network(pretrained=False, last_stride=3)


def test_logits_shape_and_inference_mode():
    net = hub_conf.create_network(pretrained=False, num_classes=10)
    assert not net.training
    out = _features(net, np.zeros((2, 3, 128, 128), np.float32))
    assert out.shape == (2, 10)


def test_published_layout_loads_completely_and_graph_equals_pynative(published_ckpt, caplog):
    import mindspore as ms

    caplog.set_level(logging.INFO, logger="vehiclenet")
    x = np.random.default_rng(2).standard_normal((2, 3, 384, 384)).astype(np.float32)
    graph = hub_conf.create_network(checkpoint=published_ckpt, include_top=False, mode="graph")
    f_graph = _features(graph, x)
    assert "loaded 271 network parameters" in caplog.text
    assert "skipped 334 optimizer/schedule entries" in caplog.text

    full = hub_conf.create_network(checkpoint=published_ckpt)  # 575-class head: all 273
    assert "loaded 273 network parameters" in caplog.text
    report = load_weights(full, published_ckpt)
    assert len(report.loaded) == 273 and not report.reinitialized and not report.unused
    assert len(report.training_state) == 607 - 273
    stored = ms.load_checkpoint(str(published_ckpt), specify_prefix="classifier.classifier.weight")
    np.testing.assert_array_equal(full.classifier.classifier.weight.asnumpy(),
                                  stored["classifier.classifier.weight"].asnumpy())

    eager = hub_conf.create_network(checkpoint=published_ckpt, include_top=False, mode="pynative")
    f_eager = _features(eager, x)
    rel = np.linalg.norm(f_graph - f_eager) / np.linalg.norm(f_eager)
    assert rel <= 1e-5, rel
    ms.set_context(mode=ms.GRAPH_MODE)


def test_network_only_file_loads(tmp_path):
    import mindspore as ms

    src = hub_conf.create_network(pretrained=False, num_classes=7)
    path = tmp_path / "net_only.ckpt"
    ms.save_checkpoint(src, str(path))
    dst = hub_conf.create_network(checkpoint=path, num_classes=7)
    for a, b in zip(src.get_parameters(), dst.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_the_head_size_comes_from_the_checkpoint_when_not_given(tmp_path, caplog):
    """A fine-tuned checkpoint of 120 identities without num_classes: its trained head, not a
    random 575-class one with a warning (issue 24)."""
    import mindspore as ms

    caplog.set_level(logging.INFO, logger="vehiclenet")
    src = hub_conf.create_network(pretrained=False, num_classes=120)
    path = tmp_path / "own120.ckpt"
    ms.save_checkpoint(src, str(path))
    net = hub_conf.create_network(checkpoint=path)
    assert net.num_classes == net.weights_meta.num_classes == net.load_report.file_num_classes == 120
    assert "freshly initialised" not in caplog.text and net.load_report.reinitialized == []
    np.testing.assert_array_equal(net.classifier.classifier.weight.asnumpy(),
                                  src.classifier.classifier.weight.asnumpy())
    x = ms.Tensor(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32))
    np.testing.assert_allclose(net(x).asnumpy(), src(x).asnumpy(), rtol=0, atol=1e-5)
    assert net(x).shape == (2, 120)
    # An explicit other size is the caller's choice: that layer is re-initialised, and said.
    assert hub_conf.create_network(checkpoint=path, num_classes=575).num_classes == 575
    assert "the checkpoint's head has 120 classes, the network 575" in caplog.text
    # Without a head in the file (network-only, include_top=False), the published size stays.
    embedding = tmp_path / "embedding.ckpt"
    ms.save_checkpoint(hub_conf.create_network(pretrained=False, include_top=False), str(embedding))
    assert hub_conf.create_network(checkpoint=embedding, include_top=False).weights_meta.num_classes == 575


def test_other_num_classes_reinitialises_only_the_last_layer(published_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="vehiclenet")
    net = hub_conf.create_network(checkpoint=published_ckpt, num_classes=12, pretrained=False)
    assert tuple(net.classifier.classifier.weight.shape) == (12, 512)
    assert "575 classes" in caplog.text and "freshly initialised" in caplog.text
    # Built without drawing the parameters the file fills; the new last layer is drawn all the same.
    head = net.classifier.classifier.weight.asnumpy()
    assert np.isfinite(head).all() and head.std() > 1e-4
    report = load_weights(net, published_ckpt)
    assert report.reinitialized == ["classifier.classifier.weight", "classifier.classifier.bias"]
    assert len(report.loaded) == 271
    # The returned network carries the report of its own load.
    assert net.load_report.reinitialized == report.reinitialized and len(net.load_report.loaded) == 271
    assert net.load_report.file_num_classes == 575 and len(net.load_report.training_state) == 334
    assert hub_conf.create_network(pretrained=False, include_top=False).load_report is None


def test_wrong_shape_names_entry_and_file(tmp_path):
    shapes = [(n, (32,) + s[1:]) if n == "model.layer2.1.conv1.weight" else (n, s)
              for n, s in published_parameters()]
    path = write_published_layout(tmp_path / "wrong_shape.ckpt", shapes=shapes, steps=4)
    with pytest.raises(CheckpointError) as err:
        hub_conf.create_network(checkpoint=path, pretrained=False)
    msg = str(err.value)
    assert "model.layer2.1.conv1.weight" in msg and "wrong_shape.ckpt" in msg and "(32, 512, 1, 1)" in msg


def test_missing_entries_are_named(tmp_path):
    shapes = [(n, s) for n, s in published_parameters() if not n.startswith("model.layer4.2.")]
    path = write_published_layout(tmp_path / "missing.ckpt", shapes=shapes, steps=4)
    with pytest.raises(CheckpointError, match=r"missing\.ckpt.*15 network parameters missing.*model\.layer4\.2\."):
        hub_conf.create_network(checkpoint=path, pretrained=False)


def test_truncated_and_foreign_files_give_clear_errors(published_ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    with open(published_ckpt, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.*not a readable MindSpore checkpoint"):
        hub_conf.create_network(checkpoint=truncated)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        hub_conf.create_network(checkpoint=text)
    with pytest.raises(CheckpointError, match="does not exist"):
        hub_conf.create_network(checkpoint=tmp_path / "absent.ckpt")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown model name"):
        hub_conf.create_network("resnet50", pretrained=False)
    with pytest.raises(ValueError, match="mode"):
        hub_conf.create_network(pretrained=False, mode="eager")
    with pytest.raises(ValueError, match="amp_level"):
        hub_conf.create_network(pretrained=False, amp_level="O9")
