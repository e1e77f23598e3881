"""Hostile checkpoints (issue 14): non-finite entries are refused whole, leaving the network as
it was, and a FIFO or device given as a checkpoint is refused by what it is.

Each case plants the real thing and runs ``python -m vehiclenet`` in a subprocess; it asserts
the exit code, the message naming the path, that the victim is exactly what it was, and that
nothing is left behind. FIFO cases run under a subprocess timeout, so a regression hangs
nothing but fails.
"""
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from support.hostile import cli, imported_mindspore, make_images, plain_env, tree


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
