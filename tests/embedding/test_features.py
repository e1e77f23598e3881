"""extract_features / embed: flip-sum and L2 semantics against direct network calls, batching,
bad inputs, input kinds, npz files.

Most tests run at 128x128 (``embed(size=...)``) with a randomly initialised network: the
semantics do not depend on the size, and it is ~9x cheaper than 384x384 on CPU.
"""
import os
import stat

import numpy as np
import pytest
from PIL import Image

from vehiclenet.errors import DataError
from vehiclenet.embedding.features import batch_plan as _batch_plan, embed, extract_features
from vehiclenet.embedding.inputs import list_images
from vehiclenet.embedding.files import load_features
from vehiclenet.embedding.result import save_features
from vehiclenet.embedding.preprocessing import load_image, preprocess

SMALL = (128, 128)


@pytest.fixture(scope="module")
def net():
    from vehiclenet import create_network

    return create_network(pretrained=False, include_top=False)


def _images(n, seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size + (3,), dtype=np.uint8) for _ in range(n)]


def _direct(net, imgs, flip, size):
    import mindspore as ms

    x = np.stack([preprocess(load_image(i), size) for i in imgs])
    out = net(ms.Tensor(x)).asnumpy()
    if flip:
        out = out + net(ms.Tensor(np.ascontiguousarray(x[..., ::-1]))).asnumpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_batch_plan_evens_out_and_never_exceeds_batch_size():
    assert _batch_plan(20, 16) == 10
    assert _batch_plan(17, 16) == 9
    assert _batch_plan(16, 16) == 16
    assert _batch_plan(1, 16) == 1
    assert _batch_plan(5, 4) == 3
    for n in range(1, 60):
        for b in (1, 3, 8, 16):
            plan = _batch_plan(n, b)
            assert 1 <= plan <= b
            assert -(-n // plan) == -(-n // b)  # no more network calls than batch_size would need


def test_full_size_features_shape_norm_and_flip_sum(net):
    imgs = _images(2, seed=1)
    feats = extract_features(net, imgs, batch_size=2)
    assert feats.dtype == np.float32 and feats.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(feats, _direct(net, imgs, True, (384, 384)), atol=2e-5)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_semantics_match_direct_network_calls(net, flip):
    imgs = _images(3, seed=2)
    res = embed(net, imgs, batch_size=3, flip=flip, size=SMALL)
    np.testing.assert_allclose(res.features, _direct(net, imgs, flip, SMALL), atol=2e-5)


def test_flip_changes_features_of_asymmetric_images(net):
    imgs = _images(2, seed=3)
    with_flip = embed(net, imgs, batch_size=2, flip=True, size=SMALL).features
    without = embed(net, imgs, batch_size=2, flip=False, size=SMALL).features
    assert np.abs(with_flip - without).max() > 1e-4


def test_flip_of_a_mirrored_image_gives_the_same_feature(net):
    img = _images(1, seed=4)[0]
    a, b = embed(net, [img, img[:, ::-1].copy()], batch_size=2, size=SMALL).features
    # Not bit-exact: resizing a mirrored image is not exactly the mirror of the resized one.
    assert float(a @ b) > 0.999


def test_padded_last_batch_gives_the_same_features_as_exact_batches(net):
    imgs = _images(5, seed=5)
    padded = embed(net, imgs, batch_size=4, size=SMALL).features  # plan: 3 + 2 (padded to 3)
    exact = embed(net, imgs, batch_size=5, size=SMALL).features
    single = np.concatenate([embed(net, [i], batch_size=1, size=SMALL).features for i in imgs])
    assert padded.shape == (5, 512)
    np.testing.assert_allclose(padded, exact, atol=2e-5)
    np.testing.assert_allclose(padded, single, atol=2e-5)


def _write_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    imgs = _images(3, seed=6)
    Image.fromarray(imgs[0]).save(folder / "a.jpg", quality=95)
    Image.fromarray(imgs[1]).save(folder / "b.png")
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(imgs[2]).convert("L").save(folder / "sub" / "c.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "readme.txt").write_text("ignored: not an image extension")
    (folder / ".hidden.jpg").write_bytes(b"ignored: hidden")
    return folder


def test_list_images_recursive_sorted_by_extension(tmp_path):
    folder = _write_files(tmp_path / "imgs")
    names = [p.replace(str(folder), "") for p in list_images(folder)]
    assert names == ["/a.jpg", "/b.png", "/corrupt.jpg", "/sub/c.png"]
    assert list_images([str(folder / "readme.txt")]) == [str(folder / "readme.txt")]
    with pytest.raises(DataError, match="missing.jpg"):
        list_images([folder / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image"):
        list_images(tmp_path / "empty")


def test_bad_file_raises_naming_it_unless_skip_bad(net, tmp_path):
    folder = _write_files(tmp_path / "imgs")
    with pytest.raises(DataError, match="corrupt.jpg"):
        embed(net, folder, batch_size=2, size=SMALL)
    missing = str(tmp_path / "missing.jpg")
    res = embed(net, [folder, missing], batch_size=2, size=SMALL, skip_bad=True)
    assert [p.replace(str(folder), "") for p in res.paths] == ["/a.jpg", "/b.png", "/sub/c.png"]
    assert [p for p, _ in res.skipped] == [str(folder / "corrupt.jpg"), missing]
    assert "no such file" in res.skipped[1][1]
    good = [folder / "a.jpg", folder / "b.png", folder / "sub" / "c.png"]
    np.testing.assert_allclose(res.features, _direct(net, good, True, SMALL), atol=2e-5)


def test_nothing_usable_raises(net, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    with pytest.raises(DataError, match="no usable image"):
        embed(net, [bad], skip_bad=True, size=SMALL)
    with pytest.raises(DataError):
        embed(net, [], size=SMALL)


def test_mixed_inputs_keep_order_and_names(net, tmp_path):
    imgs = _images(4, seed=7)
    path = tmp_path / "x.png"
    Image.fromarray(imgs[0]).save(path)
    stack = np.stack(imgs[2:4])
    res = embed(net, [path, Image.fromarray(imgs[1]), stack], batch_size=4, size=SMALL)
    assert res.paths == [str(path), "<image 1>", "<array 2>", "<array 3>"]
    np.testing.assert_allclose(res.features, _direct(net, imgs, True, SMALL), atol=2e-5)


def test_progress_bar_on_stderr_when_asked(net, capsys):
    embed(net, _images(2, seed=8), batch_size=1, size=SMALL, progress=True)
    assert "embedding" in capsys.readouterr().err
    embed(net, _images(2, seed=8), batch_size=1, size=SMALL, progress=False)
    assert "embedding" not in capsys.readouterr().err


def test_npz_round_trip_and_errors(tmp_path):
    feats = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    out = save_features(tmp_path / "feats", feats, ["a.jpg", "b.jpg", "c.jpg"], flip=True)
    assert out == tmp_path / "feats" and out.exists()  # no ".npz" appended
    with np.load(out) as npz:
        assert set(npz.files) == {"features", "paths", "flip"}
    back = load_features(out)
    np.testing.assert_array_equal(back.features, feats)
    assert back.paths == ["a.jpg", "b.jpg", "c.jpg"] and bool(back.extra["flip"])
    with pytest.raises(ValueError):
        save_features(tmp_path / "f.npz", feats, ["a.jpg"])
    np.savez(tmp_path / "other.npz", query_features=feats)
    with pytest.raises(DataError, match="features, paths"):
        load_features(tmp_path / "other.npz")
    with pytest.raises(DataError, match="no such"):
        load_features(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match="junk.npz"):
        load_features(tmp_path / "junk.npz")


def test_truncated_npz_and_plain_npy_are_data_errors_naming_the_file(tmp_path):
    feats = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    good = save_features(tmp_path / "good.npz", feats, ["a", "b", "c", "d"])
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(DataError) as err:
        load_features(tmp_path / "trunc.npz")
    assert "trunc.npz" in str(err.value) and "vehiclenet embed" in str(err.value)
    with open(tmp_path / "plain.npz", "wb") as fh:  # np.save of one array, whatever the name
        np.save(fh, feats)
    np.save(tmp_path / "plain.npy", feats)
    for name in ("plain.npz", "plain.npy"):
        with pytest.raises(DataError) as err:
            load_features(tmp_path / name)
        assert name in str(err.value) and ".npy" in str(err.value) and "vehiclenet embed" in str(err.value)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_file_gets_the_mode_of_a_plain_write(tmp_path, umask):
    feats = np.zeros((1, 512), np.float32)
    old = os.umask(umask)
    try:
        out = save_features(tmp_path / "feats.npz", feats, ["a"])
    finally:
        os.umask(old)
    # tempfile.mkstemp's 0600 must not leak into the user's output through the rename.
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npz"]  # no temporary left


def test_nearest_orders_by_cosine_distance_and_keeps_ties_in_gallery_order():
    from vehiclenet.retrieval.exact import nearest

    gallery = np.array([[1, 0], [0, 1], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    order, dist = nearest(np.array([0, 1], np.float32), gallery, k=4)
    assert order.tolist() == [1, 3, 2, 0]  # the tie (rows 1 and 3) keeps gallery order
    np.testing.assert_allclose(dist, [0.0, 0.0, 0.2, 1.0], atol=1e-6)


def test_interrupted_embedding_does_not_decode_the_waiting_images(tmp_path, monkeypatch):
    """Ctrl-C while the network runs: the decodings not yet started are cancelled before the
    pool shuts down (its shutdown would otherwise decode every waiting image first)."""
    import time

    import vehiclenet.embedding.features as features

    files = []
    for i in range(40):
        files.append(tmp_path / f"c{i}.png")
        Image.fromarray(np.full((40, 40, 3), i, np.uint8)).save(files[-1])
    decoded = []
    prepare = features._prepare

    def slow_prepare(*args):  # slower than the network, so the decoder cannot run ahead of it
        time.sleep(0.05)
        decoded.append(1)
        return prepare(*args)

    monkeypatch.setattr(features, "_prepare", slow_prepare)

    def interrupted_network(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        features.embed(interrupted_network, files, batch_size=4, num_workers=1, flip=False, progress=False,
                       size=(32, 32))
    # The first batch (4) and at most the one decoding in flight; the window held 2 * 4 + 1.
    assert len(decoded) <= 6
