"""`vehiclenet evaluate --data` end to end: a VeRi-776 layout on disk -> network -> metrics,
and the saved features give the same numbers through `--features` (no MindSpore)."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from support.http_server import subprocess_env


def _write_veri(root):
    """3 ids; the query sees each id with camera 1; the gallery has it under cameras 1 and 2
    (the camera-1 copy is junk for the query). Each id has its own colour pattern."""
    rng = np.random.default_rng(0)
    for folder in ("image_query", "image_test"):
        (root / folder).mkdir(parents=True)
    for vid in (2, 7, 13):
        base = rng.integers(0, 255, (1, 1, 3))
        for folder, cams in (("image_query", (1,)), ("image_test", (1, 2))):
            for cam in cams:
                noise = rng.integers(-20, 20, (60, 80, 3))
                pixels = np.clip(base + noise + np.linspace(0, 60, 80)[None, :, None] * (vid % 3), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    root / folder / f"{vid:04d}_c{cam:03d}_{1000 * vid + cam:08d}_0.jpg", quality=92)


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "vehiclenet", "evaluate", *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_data_then_features_give_the_same_metrics(tmp_path):
    import mindspore as ms

    from vehiclenet import create_network

    ckpt = tmp_path / "net.ckpt"
    ms.save_checkpoint(create_network(pretrained=False, include_top=False), str(ckpt))
    root = tmp_path / "VeRi"
    _write_veri(root)
    feats = tmp_path / "veri_feats.npz"

    from_images = _run("--data", str(root), "--checkpoint", str(ckpt), "--batch-size", "4",
                       "--save-features", str(feats), "--json")
    assert from_images["num_query"] == 3 and from_images["num_valid_query"] == 3
    assert from_images["num_gallery"] == 6
    assert 0.0 < from_images["mAP"] <= 1.0

    saved = np.load(feats)
    assert saved["query_features"].shape == (3, 512) and saved["gallery_features"].shape == (6, 512)
    np.testing.assert_allclose(np.linalg.norm(saved["gallery_features"], axis=1), 1.0, rtol=1e-5)
    assert saved["query_ids"].tolist() == [2, 7, 13] and saved["gallery_cams"].tolist() == [1, 2, 1, 2, 1, 2]
    assert str(saved["dataset"]) == "veri" and "split" not in saved.files  # what --features checks against

    from_features = _run("--features", str(feats), "--json")
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP", "num_query", "num_valid_query"):
        assert from_features[key] == from_images[key], key


def _write_vehicleid(root):
    """VehicleID layout: image/<imgid>.jpg and train_test_split/test_list_800.txt; ids 5, 9, 11 with
    2, 3 and 2 images (4 queries and 3 gallery images per trial), each id its own colour pattern."""
    rng = np.random.default_rng(1)
    (root / "image").mkdir(parents=True)
    (root / "train_test_split").mkdir()
    lines = []
    for vid, count in ((5, 2), (9, 3), (11, 2)):
        base = rng.integers(0, 255, (1, 1, 3))
        for k in range(count):
            imgid = f"{100 * vid + k:07d}"
            noise = rng.integers(-20, 20, (60, 80, 3))
            pixels = np.clip(base + noise + np.linspace(0, 60, 80)[None, :, None] * (vid % 3), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "image" / f"{imgid}.jpg", quality=92)
            lines.append(f"{imgid} {vid}\n")
    (root / "train_test_split" / "test_list_800.txt").write_text("".join(lines))
    return [line.split()[0] for line in lines]


def test_evaluate_vehicleid_data_then_features_give_the_same_metrics(tmp_path):
    import mindspore as ms

    from vehiclenet import create_network

    ckpt = tmp_path / "net.ckpt"
    ms.save_checkpoint(create_network(pretrained=False, include_top=False), str(ckpt))
    root = tmp_path / "VehicleID"
    names = _write_vehicleid(root)
    feats = tmp_path / "vid_feats.npz"

    from_images = _run("--dataset", "vehicleid", "--split", "small", "--data", str(root), "--checkpoint", str(ckpt),
                       "--batch-size", "4", "--trials", "3", "--seed", "2", "--save-features", str(feats), "--json")
    assert from_images["num_query"] == 4 and from_images["num_gallery"] == 3 and from_images["trials"] == 3
    assert 0.0 < from_images["mAP"] <= 1.0 and from_images["seed"] == 2

    saved = np.load(feats)  # every test image once, in list order, for later re-splits
    assert saved["features"].shape == (7, 512) and saved["ids"].tolist() == [5, 5, 9, 9, 9, 11, 11]
    assert saved["names"].tolist() == names and str(saved["split"]) == "small"
    np.testing.assert_allclose(np.linalg.norm(saved["features"], axis=1), 1.0, rtol=1e-5)

    from_features = _run("--dataset", "vehicleid", "--features", str(feats), "--trials", "3", "--seed", "2", "--json")
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP", "std", "per_trial", "num_query", "split"):
        assert from_features[key] == from_images[key], key
