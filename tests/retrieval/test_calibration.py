""""Same vehicle?" (issue 26, part 2): a threshold calibrated on labelled features, its ROC and
picture, `vehiclenet calibrate` / `compare` through the CLI, and TPR@FPR in `evaluate`.

Features are generated with known structure: identities as random centres, each image its
centre plus noise, five cameras. Counts are checked against every pair computed directly.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.http_server import subprocess_env


def clustered(identities: int = 120, per_id: int = 5, dim: int = 64, noise: float = 1.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(identities), per_id)
    cams = np.tile(np.arange(per_id), identities)
    x = rng.standard_normal((identities, dim))[ids] + noise * rng.standard_normal((len(ids), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), ids, cams


def direct_pairs(feats, ids, cams):
    """Distances of every same-vehicle pair from two cameras and every different-vehicle pair."""
    d = 1.0 - feats.astype(np.float64) @ feats.T.astype(np.float64)
    i, j = np.triu_indices(len(ids), 1)
    same = ids[i] == ids[j]
    return d[i, j][same & (cams[i] != cams[j])], d[i, j][~same]


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=subprocess_env(GLOG_v="3", VEHICLENET_HOME=str(cwd / "home")))


def test_threshold_and_roc_agree_with_every_pair_counted_directly():
    from vehiclenet.retrieval.calibration import calibrate

    feats, ids, cams = clustered()
    cal = calibrate(feats, ids, cams, fmr=1e-3)
    pos, neg = direct_pairs(feats, ids, cams)
    assert (cal.positives, cal.negatives) == (len(pos), len(neg)) == (120 * 10, 600 * 599 // 2 - 120 * 10)
    # Pairs within float32 rounding of the threshold may fall either way: at most a couple.
    assert abs(np.sum(neg < cal.distance) - cal.measured_fmr * len(neg)) <= 2
    assert abs(np.sum(pos < cal.distance) - cal.tpr * len(pos)) <= 2
    assert cal.measured_fmr <= 1e-3 and np.mean(neg < cal.distance + 2e-4) > 1e-3 - 2 / len(neg)  # the largest
    assert 0.2 < cal.tpr < 1.0  # the data are hard enough for the threshold to matter
    for fpr, tpr in cal.roc.items():
        t = np.sort(neg)[int(float(fpr) * len(neg))]  # distance below which a share fpr of negatives lies
        assert abs(tpr - np.mean(pos < t)) <= 0.01, fpr
    assert list(cal.roc) == ["1e-04", "1e-03", "1e-02"] and cal.roc["1e-04"] <= cal.roc["1e-03"] <= cal.roc["1e-02"]
    # Without cameras, same-camera pairs count too.
    assert calibrate(feats, ids, fmr=1e-3).positives == 120 * 10


def test_same_vehicle_decides_by_the_threshold():
    from vehiclenet import same_vehicle
    from vehiclenet.retrieval.calibration import calibrate

    feats, ids, cams = clustered()
    cal = calibrate(feats, ids, cams)
    a, b = feats[0], feats[1]  # one vehicle, two cameras
    distance, same = same_vehicle(a, b, cal)
    assert distance == pytest.approx(1.0 - float(a @ b), abs=1e-6) and same == (distance < cal.distance)
    assert same_vehicle(a, a, cal) == (pytest.approx(0.0, abs=1e-6), True)
    assert same_vehicle(a, -a, cal) == (pytest.approx(2.0, abs=1e-6), False)


def test_calibrate_through_the_cli_writes_the_threshold_and_a_picture(tmp_path):
    from vehiclenet.retrieval.calibration import calibrate, load_calibration
    from vehiclenet.embedding.result import save_features

    feats, ids, cams = clustered()
    save_features(tmp_path / "val.npz", feats, [f"v{i}.jpg" for i in range(len(ids))], ids=ids, cams=cams)
    proc = cli("calibrate", "val.npz", "--out", "threshold.json", "--picture", "cal.png", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = calibrate(feats, ids, cams)
    saved = load_calibration(tmp_path / "threshold.json")
    assert out["distance"] == saved.distance == expected.distance and saved.roc == expected.roc
    assert json.loads((tmp_path / "threshold.json").read_text())["format"] == "vehiclenet-threshold"
    with Image.open(tmp_path / "cal.png") as img:
        pic = np.asarray(img.convert("RGB"))
    assert pic.shape == (12 * 2 + 360 + 30, 12 * 3 + 720, 3)
    x = 12 + round(360 * saved.distance / 2)
    column = pic[12:372, x - 1:x + 2]
    assert (np.abs(column.astype(int) - (40, 90, 220)).sum(axis=2) < 30).any(axis=1).mean() > 0.9  # the threshold
    for colour in ((0, 170, 60), (220, 30, 30)):  # both histograms are drawn
        assert (np.abs(pic[12:372, 12:372].astype(int) - colour).sum(axis=2) < 30).sum() > 100
    text = cli("calibrate", "val.npz", "--out", "t2.json", "--fmr", "0.01", cwd=tmp_path)
    assert text.returncode == 0 and "at false-match rate 0.01" in text.stdout and "TPR@FPR=1e-02" in text.stdout


def test_calibrate_reads_veri_names_and_evaluate_files_and_refuses_what_cannot_be_calibrated(tmp_path):
    from vehiclenet.embedding.result import save_features

    feats, ids, cams = clustered(identities=40)
    names = [f"{i:04d}_c{c + 1:03d}_{k:08d}_0.jpg" for k, (i, c) in enumerate(zip(ids, cams))]
    save_features(tmp_path / "veri.npz", feats, names)
    np.savez(tmp_path / "eval.npz", query_features=feats[:100], query_ids=ids[:100], query_cams=cams[:100],
             gallery_features=feats[100:], gallery_ids=ids[100:], gallery_cams=cams[100:])
    for name in ("veri.npz", "eval.npz"):
        proc = cli("calibrate", name, "--out", f"{name}.json", "--fmr", "0.01", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["positives"] == 40 * 10
    short = [f"{i:04d}_c{c + 1:03d}.jpg" for i, c in zip(ids, cams)]  # VeRi names without frame and suffix
    save_features(tmp_path / "short.npz", feats, short)
    proc = cli("calibrate", "short.npz", "--out", "short.json", "--fmr", "0.01", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["positives"] == 40 * 10, proc.stderr
    save_features(tmp_path / "plain.npz", feats, [f"x{i}.jpg" for i in range(len(ids))])
    save_features(tmp_path / "one.npz", feats[:5], [f"x{i}.jpg" for i in range(5)], ids=np.arange(5))
    for argv, code, words in ((["plain.npz"], 1, "no ids"), (["one.npz"], 1, "0 same-vehicle"),
                              (["veri.npz", "--fmr", "1e-6"], 1, "cannot measure a false-match rate of 1e-06"),
                              (["veri.npz", "--fmr", "0"], 2, "--fmr must be between 0 and 1")):
        proc = cli("calibrate", *argv, "--out", "bad.json", cwd=tmp_path)
        assert proc.returncode == code and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "bad.json").exists()


def test_evaluate_reports_tpr_at_fpr(tmp_path):
    from vehiclenet.retrieval.calibration import cross_histograms, roc

    feats, ids, cams = clustered(identities=60)
    q, g = np.arange(0, 300, 5), np.setdiff1d(np.arange(300), np.arange(0, 300, 5))
    np.savez(tmp_path / "f.npz", query_features=feats[q], query_ids=ids[q], query_cams=cams[q],
             gallery_features=feats[g], gallery_ids=ids[g], gallery_cams=cams[g])
    proc = cli("evaluate", "--features", "f.npz", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["roc"] == roc(*cross_histograms(feats[q], feats[g], ids[q], ids[g], cams[q], cams[g]))
    assert list(out["roc"]) == ["1e-04", "1e-03", "1e-02"]  # 14,160 negative pairs measure down to 1e-4
    assert proc.stdout.splitlines()[2].startswith(f"verification: TPR@FPR=1e-04 {100 * out['roc']['1e-04']:.2f}")


def test_evaluate_vehicleid_reports_tpr_at_fpr_over_every_pair_of_test_images(tmp_path):
    from vehiclenet.retrieval.calibration import pair_histograms, roc

    feats, ids, _ = clustered(identities=60)
    np.savez(tmp_path / "vid.npz", features=feats, ids=ids, dataset="vehicleid", split="small")
    proc = cli("evaluate", "--dataset", "vehicleid", "--features", "vid.npz", "--trials", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # Counted directly: every unordered pair of the 300 images (no cameras, so no pair is junk).
    d = 1.0 - feats.astype(np.float64) @ feats.T.astype(np.float64)
    i, j = np.triu_indices(len(ids), 1)
    pos, neg = np.sort(d[i, j][ids[i] == ids[j]]), np.sort(d[i, j][ids[i] != ids[j]])
    assert (len(pos), len(neg)) == (60 * 10, 300 * 299 // 2 - 600)
    assert out["roc"] == roc(*pair_histograms(feats, ids))
    assert list(out["roc"]) == ["1e-04", "1e-03", "1e-02"]
    for key, tpr in out["roc"].items():
        # at most k = FPR x negatives below the threshold, a histogram bin edge (1e-4 wide) between the
        # k-th and (k+1)-th nearest negative counted directly: the TPR lies between their fractions
        k = int(float(key) * len(neg))
        assert np.mean(pos <= neg[k - 1] - 2e-4) <= tpr <= np.mean(pos <= neg[k] + 2e-4), (key, tpr)
    assert out["roc"]["1e-02"] > out["roc"]["1e-04"] > 0.0
    line = proc.stdout.splitlines()[2]
    assert line.startswith(f"verification: TPR@FPR=1e-04 {100 * out['roc']['1e-04']:.2f}"), line
    assert line.endswith("(every pair of test images, cosine distance)"), line
    assert "roc_s" in out["timings"]


@pytest.mark.slow
def test_compare_two_images_with_a_threshold_given_or_beside_the_checkpoint(tmp_path):
    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.retrieval.calibration import calibrate, save_calibration
    from vehiclenet.embedding.result import save_features

    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / name)
    feats, ids, cams = clustered()
    cal = calibrate(feats, ids, cams)
    save_calibration(tmp_path / "t.json", cal)
    same = cli("compare", "a.png", "a.png", "--no-pretrained", "--image-size", 64, "--threshold", "t.json",
               "--json", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    out = json.loads(same.stdout)
    assert out["distance"] == pytest.approx(0.0, abs=1e-5) and out["same_vehicle"] is True
    assert out["threshold"] == cal.distance and out["fmr"] == 1e-3
    cal.distance = 0.0  # nothing is the same vehicle below 0
    ckpt = tmp_path / "net.ckpt"
    ms.save_checkpoint(create_network(pretrained=False), str(ckpt))
    save_calibration(tmp_path / "net.ckpt.threshold.json", cal)
    beside = cli("compare", "a.png", "b.png", "--checkpoint", ckpt, "--image-size", 64, cwd=tmp_path)
    assert beside.returncode == 0, beside.stderr
    assert beside.stdout.startswith("a.png vs b.png: distance ") and "different vehicles (threshold 0.0000" in beside.stdout
    bare = cli("compare", "a.png", "b.png", "--no-pretrained", "--image-size", 64, cwd=tmp_path)
    assert bare.returncode == 0 and "no threshold: give --threshold FILE" in bare.stdout, bare.stderr
    # rank marks its matches too: with a threshold of 2, every match is below it.
    gallery = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    save_features(tmp_path / "g.npz", gallery / np.linalg.norm(gallery, axis=1, keepdims=True),
                  [f"g{i}.jpg" for i in range(4)], flip=True)
    cal.distance = 2.0
    save_calibration(tmp_path / "all.json", cal)
    ranked = cli("rank", "--query", "a.png", "--gallery", "g.npz", "--threshold", "all.json", "--no-pretrained",
                 "--image-size", 64, "--no-picture", "--json", cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr
    assert [m["same_vehicle"] for m in json.loads(ranked.stdout)["results"][0]["matches"]] == [True] * 4


def test_search_marks_the_matches_a_threshold_calls_the_same_vehicle(tmp_path):
    from vehiclenet.retrieval.calibration import calibrate, save_calibration
    from vehiclenet.embedding.result import save_features

    feats, ids, cams = clustered()
    save_calibration(tmp_path / "t.json", cal := calibrate(feats, ids, cams))
    q = np.arange(0, 100, 5)  # one image of each of 20 vehicles; their other images in the gallery
    g = np.setdiff1d(np.arange(len(ids)), q)
    save_features(tmp_path / "g.npz", feats[g], [f"g{i}.jpg" for i in g])
    save_features(tmp_path / "q.npz", feats[q], [f"q{i}.jpg" for i in q])
    assert cli("index", "build", "g.npz", "--out", "g.index", cwd=tmp_path).returncode == 0
    proc = cli("search", "--index", "g.index", "--features", "q.npz", "--threshold", "t.json", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    matches = [m for r in json.loads(proc.stdout)["results"] for m in r["matches"]]
    assert all(m["same_vehicle"] == (m["distance"] < cal.distance) for m in matches)
    assert 0 < sum(m["same_vehicle"] for m in matches) < len(matches)
    text = cli("search", "--index", "g.index", "--features", "q.npz", "--threshold", "t.json", cwd=tmp_path)
    marked = [line for line in text.stdout.splitlines() if line.endswith("  same vehicle")]
    assert len(marked) == sum(m["same_vehicle"] for m in matches)
    bad = cli("search", "--index", "g.index", "--features", "q.npz", "--threshold", "g.npz", cwd=tmp_path)
    assert bad.returncode == 1 and "g.npz: not a threshold file written by `vehiclenet calibrate`" in bad.stderr
    edited = json.loads((tmp_path / "t.json").read_text())
    edited["threshold"]["fmr"] = "x"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    bad = cli("search", "--index", "g.index", "--features", "q.npz", "--threshold", "edited.json", cwd=tmp_path)
    assert bad.returncode == 1 and "edited.json: not a threshold file" in bad.stderr and "fmr 'x'" in bad.stderr
    folder = cli("compare", tmp_path, "q.npz", "--no-pretrained", cwd=tmp_path)
    assert folder.returncode == 2 and "is a folder: compare takes two image files" in folder.stderr
