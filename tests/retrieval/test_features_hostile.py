"""Hostile features files (issue 14): zero-width, all-zero and non-finite rows are refused by
evaluate and rank, naming the file.
"""
from pathlib import Path

import numpy as np

from support.hostile import cli, imported_mindspore, make_images, plain_env


def write_feature_set(path: Path, query: np.ndarray, gallery: np.ndarray) -> Path:
    nq, ng = len(query), len(gallery)
    query, gallery = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30) for x in (query, gallery))
    np.savez(path, query_features=query, query_ids=np.arange(nq), query_cams=np.zeros(nq, np.int64),
             gallery_features=gallery, gallery_ids=np.arange(ng) % max(nq, 1), gallery_cams=np.ones(ng, np.int64))
    return path


def test_evaluate_refuses_zero_width_and_all_zero_features(tmp_path):
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    env = plain_env(tmp_path)
    good = write_feature_set(tmp_path / "good.npz", query, gallery)
    proc = cli("evaluate", "--features", good, env=env, importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the same data with usable rows is evaluated
    narrow = write_feature_set(tmp_path / "narrow.npz", query[:, :0], gallery[:, :0])
    gallery[[1, 3]] = 0
    zero = write_feature_set(tmp_path / "zero.npz", query, gallery)
    for path, words in ((narrow, "query_features has shape (2, 0): 0-wide features"),
                        (zero, "gallery_features has 2 all-zero row(s) (rows 1, 3)")):
        proc = cli("evaluate", "--features", path, env=env, importtime=True)
        assert proc.returncode == 1
        assert f"vehiclenet evaluate: error: {path}: {words}" in proc.stderr
        assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
        assert not imported_mindspore(proc.stderr)


def test_rank_refuses_a_gallery_file_with_nan_rows(tmp_path):
    """A NaN row would rank last with distance nan; like every reader of features, rank refuses the file."""
    from vehiclenet.embedding.result import save_features

    (query,) = make_images(tmp_path / "q", 1)
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 512)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats[1] = np.nan
    names = [str(tmp_path / f"g{i}.jpg") for i in range(3)]
    gallery = save_features(tmp_path / "gallery.npz", feats, names, flip=False)
    proc = cli("rank", "--query", query, "--gallery", gallery, "--no-pretrained", "--no-flip", "--no-picture",
               env=plain_env(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"vehiclenet rank: error: {gallery}: features contains NaN or inf (row 1)" in proc.stderr
    assert proc.stdout == ""
