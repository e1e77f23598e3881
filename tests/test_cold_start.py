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

import numpy as np
import pytest

from vehiclenet.device import PYNATIVE_MAX_IMAGES, mode_for_images


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
