"""Export of the embedding network: MindIR reloaded with GraphCell and ONNX under onnxruntime (at two batch sizes,
one file) give the same features."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vehiclenet.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
SIZE = 96


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, GLOG_v="3"), cwd=ROOT)


@pytest.fixture(scope="module")
def embedding_net(published_ckpt):
    """The in-process embedding network (published-layout weights) whose features the exports must give."""
    from vehiclenet import create_network

    return create_network(checkpoint=published_ckpt, include_top=False)


@pytest.fixture(scope="module")
def reference(embedding_net):
    """Features of the embedding network for two random images."""
    import mindspore as ms

    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    x2 = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    feats = [embedding_net(ms.Tensor(v)).asnumpy() for v in (x, x2)]
    assert feats[0].shape == (1, 512) and np.abs(feats[0]).max() > 1e-2  # non-trivial features to compare
    assert not np.allclose(feats[0], feats[1], atol=1e-3)
    return (x, x2), feats


def test_export_mindir_reloads_with_graphcell(published_ckpt, reference, tmp_path):
    import mindspore as ms
    import mindspore.nn as nn

    proc = _cli("export", "--format", "mindir", "--out", tmp_path / "vn", "--checkpoint", published_ckpt,
                "--num-classes", 575, "--image-size", SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.splitlines()[-1])
    assert path == tmp_path / "vn.mindir" and path.is_file()
    graph = nn.GraphCell(ms.load(str(path)))
    for x, ref in zip(*reference):
        out = graph(ms.Tensor(x)).asnumpy()
        assert out.shape == (1, 512)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_export_onnx_has_a_dynamic_batch_axis(published_ckpt, embedding_net, tmp_path):
    """One ONNX file, run by onnxruntime at batch 1 and 5: the network's own features on the same inputs."""
    import mindspore as ms
    import onnxruntime as ort

    from vehiclenet.model.export import export_embedding

    path = export_embedding(tmp_path / "vn.onnx", file_format="onnx", checkpoint=published_ckpt, image_size=SIZE)
    assert path == tmp_path / "vn.onnx" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vn.onnx"]  # no temporary file left behind
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "x" and list(inp.shape) == ["batch", 3, SIZE, SIZE]
    assert not isinstance(out.shape[0], int) and out.shape[1:] == [512], out.shape  # declared dynamic, not 1
    rng = np.random.default_rng(2)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        expected = embedding_net(ms.Tensor(x)).asnumpy()
        assert expected.shape == (batch, 512) and np.abs(expected).max() > 1e-2
        (features,) = session.run(None, {inp.name: x})
        assert features.shape == (batch, 512)
        assert np.abs(features - expected).max() < 1e-4, f"batch {batch}: max abs diff {np.abs(features - expected).max()}"
    # Five distinct feature rows, so rows swapped or repeated within the batch would not pass.
    assert min(np.abs(expected[0] - row).max() for row in expected[1:]) > 1e-3


def test_export_rejects_wrong_num_classes_and_format(published_ckpt, tmp_path):
    from vehiclenet.model.export import export_embedding

    with pytest.raises(CheckpointError, match="575 identities, not --num-classes 10") as err:
        export_embedding(tmp_path / "x", checkpoint=published_ckpt, num_classes=10, image_size=SIZE)
    assert str(published_ckpt) in str(err.value)
    proc = _cli("export", "--format", "TFLITE", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = _cli("export", "--format", "ONNX", "--out", tmp_path / "x", "--checkpoint", tmp_path / "none.ckpt")
    assert proc.returncode == 1 and "none.ckpt" in proc.stderr and "does not exist" in proc.stderr


def test_export_checks_out_path_and_headless_files_before_work(published_ckpt, tmp_path):
    import mindspore as ms

    from vehiclenet.model.export import export_embedding, export_weights
    from vehiclenet.model.network import VehicleNet

    # --out naming a folder is refused up front, by name, for every format.
    (tmp_path / "d.mindir").mkdir()
    proc = _cli("export", "--format", "MINDIR", "--out", tmp_path / "d.mindir", "--checkpoint", published_ckpt)
    assert proc.returncode == 2 and "d.mindir" in proc.stderr and "is a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "w.ckpt").mkdir()
    proc = _cli("export", "--format", "CKPT", "--out", tmp_path / "w.ckpt", "--checkpoint", published_ckpt)
    assert proc.returncode == 2 and "w.ckpt" in proc.stderr and "is a folder" in proc.stderr

    # An embedding-only checkpoint has no head to check --num-classes against: said so, nothing written.
    headless = tmp_path / "embedding_only.ckpt"
    ms.save_checkpoint(VehicleNet(include_top=False), str(headless))
    for export in (export_embedding, export_weights):
        with pytest.raises(CheckpointError, match="no classification head") as err:
            export(tmp_path / "out", checkpoint=headless, num_classes=575)
        assert "embedding_only.ckpt" in str(err.value)
    assert not list(tmp_path.glob("out*"))
    # Without --num-classes it exports, and says what it holds.
    proc = _cli("export", "--format", "CKPT", "--out", tmp_path / "emb", "--checkpoint", headless)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embedding only" in proc.stderr + proc.stdout and "None" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_export_ckpt_keeps_network_weights_only(published_ckpt, tmp_path):
    """CKPT: the 273 network entries (head included), no SGD state; loads like the original."""
    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.model.checkpoint import read_checkpoint

    proc = _cli("export", "--format", "ckpt", "--out", tmp_path / "weights", "--checkpoint", published_ckpt,
                "--num-classes", 575)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.splitlines()[-1])
    assert path == tmp_path / "weights.ckpt" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.ckpt"]
    # MindSpore writes it 0400; like every output it gets the mode a plain open gives.
    from vehiclenet.fileio import current_umask

    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()
    assert "no training state" in proc.stdout
    entries = ms.load_checkpoint(str(path))
    source = read_checkpoint(published_ckpt, keep_training_state=True)
    source.pop("__training_state__")
    network = {n for n in source if not n.startswith(("accum.", "stat.", "learning_rate", "momentum", "global_step"))}
    assert len(network) == 273 and set(entries) == network
    for name in ("model.conv1.weight", "model.layer4.2.bn3.moving_variance", "classifier.classifier.bias"):
        np.testing.assert_array_equal(entries[name].asnumpy(), source[name].asnumpy())
    assert path.stat().st_size < 0.4 * published_ckpt.stat().st_size

    net = create_network(checkpoint=path, num_classes=575)
    np.testing.assert_array_equal(net.classifier.dense.weight.asnumpy(), source["classifier.dense.weight"].asnumpy())

    proc = _cli("export", "--format", "ckpt", "--out", tmp_path / "j" / "w", "--checkpoint", path, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"path": str(tmp_path / "j" / "w.ckpt"), "format": "CKPT", "input": None,
                                       "bytes": path.stat().st_size}

    # A file that is not a whole VehicleNet is refused before anything is written.
    partial = tmp_path / "partial.ckpt"
    ms.save_checkpoint([{"name": "model.conv1.weight", "data": source["model.conv1.weight"]}], str(partial))
    proc = _cli("export", "--format", "CKPT", "--out", tmp_path / "bad", "--checkpoint", partial)
    assert proc.returncode == 1 and "partial.ckpt" in proc.stderr and "missing" in proc.stderr
    assert not (tmp_path / "bad.ckpt").exists()
