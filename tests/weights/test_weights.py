"""Random weights are seeded and every output records which weights embedded it; features of two
networks are never compared (real MindSpore networks, real subprocesses, real files)."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vehiclenet import __version__
from vehiclenet.errors import UsageError
from vehiclenet.embedding.result import save_features
from vehiclenet.weights.choice import WeightsChoice, check_same_weights, describe


def run_cli(*args, cwd):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _parameters(net) -> dict:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_a_seed_draws_the_same_weights_whatever_was_drawn_before_and_leaves_numpy_as_it_was():
    from vehiclenet import create_network

    first = _parameters(create_network(pretrained=False, include_top=False, seed=3, mode="pynative"))
    np.random.rand(17)  # another history of numpy's global generator
    state = np.random.get_state()[1].copy()
    again = _parameters(create_network(pretrained=False, include_top=False, seed=3, mode="pynative"))
    assert (np.random.get_state()[1] == state).all()
    other = _parameters(create_network(pretrained=False, include_top=False, seed=4, mode="pynative"))
    assert first.keys() == again.keys() == other.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    conv = next(k for k in first if k.endswith("conv1.weight"))
    assert not np.array_equal(first[conv], other[conv])
    with pytest.raises(ValueError, match="seed must be None or an int"):
        create_network(pretrained=False, seed=-1)
    # One value for the same weights: a WeightsChoice builds what the arguments build.
    chosen = _parameters(create_network(weights=WeightsChoice(pretrained=False, seed=3), include_top=False,
                                        mode="pynative"))
    assert all(np.array_equal(first[k], chosen[k]) for k in first)
    with pytest.raises(ValueError, match="either as weights=WeightsChoice"):
        create_network(weights=WeightsChoice(pretrained=False), pretrained=False)
    with pytest.raises(ValueError, match="seed=4 contradicts weights.seed=3"):
        create_network(weights=WeightsChoice(pretrained=False, seed=3), seed=4)


def test_a_choice_is_resolved_once(tmp_path):
    """A command makes one WeightsChoice: its checkpoint is hashed once, however many outputs
    record the identity, so every output names the weights the network was built from even if
    the file is rewritten meanwhile."""
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"weights")
    choice = WeightsChoice.of(ckpt)
    first = choice.identity()
    ckpt.write_bytes(b"other weights")
    assert choice.identity() == first == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert WeightsChoice.of(ckpt).identity() == "sha256:" + hashlib.sha256(b"other weights").hexdigest()
    assert choice == WeightsChoice.of(ckpt)  # what was resolved is not part of the value
    assert choice.file() == str(ckpt) and WeightsChoice.of(None, False).file() is None


def test_identities_name_the_weights_without_downloading(tmp_path):
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"weights")
    assert WeightsChoice(str(ckpt)).identity() == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert WeightsChoice(pretrained=False, seed=7).identity() == f"random:seed=7:vehiclenet-{__version__}"
    assert WeightsChoice(pretrained=False).identity() is None  # unseeded: nothing to record
    published = WeightsChoice().identity()
    assert published.startswith("sha256:") and len(published) == 71
    assert describe(f"random:seed=7:vehiclenet-{__version__}") == f"random weights (seed 7, vehiclenet-{__version__})"
    check_same_weights(None, published, "old.npz")  # files of older versions carry none
    with pytest.raises(UsageError, match=r"g\.npz was embedded with random weights \(seed 7.*the query with weights"):
        check_same_weights(f"random:seed=7:vehiclenet-{__version__}", published, "g.npz")


def test_unseeded_random_weights_cannot_make_chunks_and_seeded_ones_are_recorded():
    from vehiclenet.embedding.shards import make_job
    from vehiclenet.weights.choice import WeightsChoice

    with pytest.raises(UsageError, match="unseeded random weights differ in every process"):
        make_job(["a.jpg"], chunk_size=1, weights=WeightsChoice(pretrained=False))
    assert make_job(["a.jpg"], chunk_size=1, weights=WeightsChoice(pretrained=False, seed=2)).weights == \
        f"random:seed=2:vehiclenet-{__version__}"


def test_embed_then_rank_and_search_use_one_network_and_refuse_another(tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(gallery / f"car{i}.png")
    query = tmp_path / "query.png"
    shutil.copy(gallery / "car1.png", query)  # the same picture under another name

    res = run_cli("embed", gallery, "--out", "g.npz", "--no-pretrained", "--no-flip", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "random weights (seed 0)" in res.stderr
    recorded = f"random:seed=0:vehiclenet-{__version__}"
    assert str(np.load(tmp_path / "g.npz")["weights"]) == recorded

    # Another process, the same seed: the copy of car1 is at distance 0 from car1's stored features.
    res = run_cli("rank", "--query", query, "--gallery", "g.npz", "--no-pretrained", "--no-flip", "--no-picture",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    best = next(ln.split() for ln in res.stdout.splitlines() if ln.split() and ln.split()[0] == "1")
    assert best[2].endswith("car1.png") and abs(float(best[1])) < 1e-5, res.stdout

    refused = "g.npz was embedded with random weights (seed 0"
    res = run_cli("rank", "--query", query, "--gallery", "g.npz", "--no-pretrained", "--seed", "1",
                  "--no-flip", "--no-picture", cwd=tmp_path)
    assert res.returncode == 2 and refused in res.stderr and "the query with random weights (seed 1" in res.stderr
    assert "Traceback" not in res.stderr

    assert run_cli("index", "build", "g.npz", "--out", "g.index", cwd=tmp_path).returncode == 0
    res = run_cli("search", "--index", "g.index", "--query", query, "--no-pretrained", "--seed", "1", cwd=tmp_path)
    assert res.returncode == 2 and "g.index was embedded with random weights (seed 0" in res.stderr, res.stderr

    other = np.eye(2, 512, dtype=np.float32)
    save_features(tmp_path / "other.npz", other, ["x.png", "y.png"], flip=False, weights="sha256:" + "ab" * 32)
    res = run_cli("search", "--index", "g.index", "--features", "other.npz", cwd=tmp_path)
    assert res.returncode == 2 and "other.npz with weights abababababab" in res.stderr, res.stderr
    res = run_cli("index", "add", "g.index", "other.npz", cwd=tmp_path)
    assert res.returncode == 1 and "the added ones with weights abababababab" in res.stderr, res.stderr
    res = run_cli("index", "build", "g.npz", "other.npz", "--out", "mixed.index", cwd=tmp_path)
    assert res.returncode == 1 and "features of two networks cannot share an index" in res.stderr, res.stderr
    assert not (tmp_path / "mixed.index").exists()
    res = run_cli("rank", "--query", query, "--gallery", "g.npz", "--seed", "1", "--no-picture", cwd=tmp_path)
    assert res.returncode == 2 and "--seed draws the random weights of --no-pretrained" in res.stderr
