"""Cold start (issue 17): what a one-image job does not pay for, and that it changes no result.

- A network whose weights come from a checkpoint is built without drawing random values
  for the parameters the file fills (the file's values are what the network holds).
- The command line runs a handful of images in PyNative (no graph compilation) and more in
  graph mode; the features are the same either way.
Timings live in benchmarks/cold_start.py, not here.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vehiclenet.model.device import PYNATIVE_MAX_IMAGES, mode_for_images


def test_mode_for_images():
    assert mode_for_images(1) == "pynative"
    assert mode_for_images(PYNATIVE_MAX_IMAGES) == "pynative"
    assert mode_for_images(PYNATIVE_MAX_IMAGES + 1) == "graph"
    assert mode_for_images(0) == "graph"  # unknown count (inputs that cannot be listed)


def test_checkpoint_values_are_what_the_network_holds(published_ckpt):
    import mindspore as ms

    from vehiclenet import create_network

    net = create_network(checkpoint=published_ckpt, mode="pynative")
    want = ms.load_checkpoint(str(published_ckpt))
    for param in net.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), want[param.name].asnumpy(), err_msg=param.name)


def _embed(tmp_path, ckpt, *images, out):
    done = subprocess.run([sys.executable, "-m", "vehiclenet", "embed", "--checkpoint", str(ckpt), *map(str, images),
                           "--out", str(out)], cwd=tmp_path, env=dict(os.environ, GLOG_v="3"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with np.load(out) as npz:
        return npz["features"], done.stderr


@pytest.mark.parametrize("other_images", [PYNATIVE_MAX_IMAGES + 2])
def test_one_image_in_pynative_gives_the_graphs_features(tmp_path, published_ckpt, other_images):
    from PIL import Image

    rng = np.random.default_rng(3)
    files = []
    for i in range(1 + other_images):
        files.append(tmp_path / f"car{i}.png")
        Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(files[-1])
    one, log_one = _embed(tmp_path, published_ckpt, files[0], out=tmp_path / "one.npz")
    many, log_many = _embed(tmp_path, published_ckpt, *files, out=tmp_path / "many.npz")
    assert "execution mode pynative for 1 image(s)" in log_one
    assert f"execution mode graph for {1 + other_images} image(s)" in log_many
    np.testing.assert_allclose(one[0], many[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- compile cache

CHILD = r"""
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import numpy as np, mindspore as ms
import vehiclenet
from vehiclenet import create_network
ckpt, batch, size, mode, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
net = create_network(checkpoint=ckpt, include_top=False, mode=mode)
x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
np.save(out, net(ms.Tensor(x)).asnumpy())
"""


def _run(tmp_path, ckpt, home, name, *, batch=2, size=64, mode="graph", cache="1", wait=True):
    env = dict(os.environ, GLOG_v="3", VEHICLENET_HOME=str(home), VEHICLENET_COMPILE_CACHE=cache)
    script = tmp_path / "child.py"  # a file: MindSpore's cache reads the entry script (not with -c)
    script.write_text(CHILD)
    args = [sys.executable, str(script), str(ckpt), str(batch), str(size), mode, str(tmp_path / f"{name}.npy")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finish(proc, tmp_path, name) if wait else (proc, name)


def _finish(proc, tmp_path, name):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return np.load(tmp_path / f"{name}.npy"), err


@pytest.mark.slow
def test_second_process_reuses_the_compiled_graph_with_identical_features(tmp_path, published_ckpt):
    home = tmp_path / "home"
    first, log1 = _run(tmp_path, published_ckpt, home, "first")
    second, log2 = _run(tmp_path, published_ckpt, home, "second")
    assert "compile cache filled" in log1 and "compile cache hit" in log2
    plain, log3 = _run(tmp_path, published_ckpt, home, "plain", cache="0")
    pynative, log4 = _run(tmp_path, published_ckpt, home, "pynative", mode="pynative")
    assert "compile cache" not in log3 + log4  # off, and PyNative compiles no graph
    for other in (second, plain, pynative):
        np.testing.assert_array_equal(first, other)
    entries = [p for p in (home / "compiled").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "files.json").is_file()


def test_another_shape_precision_or_version_gets_its_own_entry(published_ckpt, monkeypatch):
    import mindspore as ms

    import vehiclenet
    from vehiclenet import create_network
    from vehiclenet.model.graph_key import graph_key
    from vehiclenet.model.cpu_kernels import bf16_status

    net = create_network(pretrained=False, include_top=False, mode="pynative")
    x2, x3 = (ms.Tensor(np.zeros((b, 3, 64, 64), np.float32)) for b in (2, 3))
    key = graph_key(net, (x2,))
    assert graph_key(net, (x2,)) == key
    assert graph_key(net, (x3,)) != key
    assert graph_key(net, (ms.Tensor(np.zeros((2, 3, 64, 80), np.float32)),)) != key
    other = bf16_status().startswith("available")  # the key also names the kernel library and precision
    assert graph_key(create_network(pretrained=False, include_top=False, mode="pynative", cpu_kernels=False),
                     (x2,)) != key
    if other:
        bf16 = create_network(pretrained=False, include_top=False, mode="pynative", precision="bf16")
        assert graph_key(bf16, (x2,)) != key
    assert graph_key(create_network(pretrained=False, include_top=True, mode="pynative"), (x2,)) != key
    monkeypatch.setattr(vehiclenet, "__version__", vehiclenet.__version__ + ".post1")
    assert graph_key(net, (x2,)) != key


@pytest.mark.slow
def test_a_truncated_cache_file_is_rebuilt_not_trusted(tmp_path, published_ckpt):
    home = tmp_path / "home"
    first, _ = _run(tmp_path, published_ckpt, home, "first")
    (graph,) = (home / "compiled").rglob("*.mindir")
    size = graph.stat().st_size
    graph.chmod(0o600)
    with open(graph, "r+b") as f:
        f.truncate(size // 2)
    again, log = _run(tmp_path, published_ckpt, home, "again")
    assert "does not match its record" in log and "compile cache filled" in log
    np.testing.assert_array_equal(first, again)
    assert graph.stat().st_size == size
    _, log = _run(tmp_path, published_ckpt, home, "third")
    assert "compile cache hit" in log


def test_two_processes_filling_the_cache_at_once_both_succeed(tmp_path, published_ckpt):
    home = tmp_path / "home"
    started = [_run(tmp_path, published_ckpt, home, name, wait=False) for name in ("a", "b")]
    (a, log_a), (b, log_b) = (_finish(proc, tmp_path, name) for proc, name in started)
    np.testing.assert_array_equal(a, b)
    assert "compile cache filled" in log_a + log_b
    _, log = _run(tmp_path, published_ckpt, home, "after")
    assert "compile cache hit" in log


def test_the_graph_key_covers_sources_in_sub_packages(tmp_path):
    """A module moved into a sub-package still invalidates cached graphs when it changes."""
    import shutil

    from vehiclenet.model.graph_key import _sources_digest

    package = tmp_path / "vehiclenet"
    shutil.copytree(Path(__file__).resolve().parents[2] / "vehiclenet", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = _sources_digest(package)
    network = package / "model" / "network.py"
    network.write_text(network.read_text() + "\n# edited\n")
    edited = _sources_digest(package)
    (package / "model" / "cells").mkdir()
    network.rename(package / "model" / "cells" / "network.py")  # the same bytes under another path
    moved = _sources_digest(package)
    network = package / "model" / "cells" / "network.py"
    network.write_text(network.read_text() + "\n# edited\n")
    assert len({before, edited, moved, _sources_digest(package)}) == 4
