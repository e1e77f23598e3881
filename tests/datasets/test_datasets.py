"""VehicleID and VERI-Wild: readers on their real layouts, the protocols against hand-worked
cases, and `vehiclenet evaluate --dataset ...` through real subprocesses."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from support.datasets import INFO_HEADER, make_vehicleid, make_veriwild, write_text
from vehiclenet.datasets import DATASETS, get_dataset
from vehiclenet.datasets.vehicleid import (VehicleIDFeatures, load_vehicleid_features, read_vehicleid,
                                           save_vehicleid_features)
from vehiclenet.datasets.veriwild import read_veriwild
from vehiclenet.errors import DataError, UsageError
from vehiclenet.embedding.files import FeatureSet, save_features_npz
from vehiclenet.retrieval.exact import cosine_distance
from vehiclenet.retrieval.metrics import evaluate
from vehiclenet.retrieval.protocols import evaluate_split, evaluate_vehicleid, one_image_per_identity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vehiclenet", "evaluate", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- VehicleID reader


def test_read_vehicleid_real_layout(tmp_path):
    rows = [("0004396", 1), ("0000021", 1), ("0008870", 57), ("0000123", 3)]
    root = make_vehicleid(tmp_path, rows)
    images = read_vehicleid(root, "small")
    assert [os.path.relpath(p, root) for p in images.paths] == [os.path.join("image", f"{i}.jpg") for i, _ in rows]
    assert images.ids.tolist() == [1, 1, 57, 3]
    assert images.cams.tolist() == [0, 1, 2, 3]  # each image its own camera: nothing is ever junk
    assert get_dataset("vehicleid").read(root, "small").ids.tolist() == [1, 1, 57, 3]
    # The other splits read their own list files.
    make_vehicleid(tmp_path, rows[:2], "test_list_2400.txt")
    assert len(read_vehicleid(root, "large")) == 2


@pytest.mark.parametrize("line", ["0000021", "0000021 1 7", "0000021 one", "0000021\t", "dir/0000021 1"])
def test_vehicleid_bad_line_names_file_and_line(tmp_path, line):
    root = make_vehicleid(tmp_path, [("0004396", 1)])
    write_text(os.path.join(root, "train_test_split", "test_list_800.txt"), f"0004396 1\n\n{line}\n")
    with pytest.raises(DataError) as err:
        read_vehicleid(root, "small")
    assert "test_list_800.txt:3: expected '<imgid> <vehicle id>'" in str(err.value)


def test_vehicleid_layout_errors(tmp_path):
    with pytest.raises(DataError, match="VehicleID root .* is missing"):
        read_vehicleid(str(tmp_path / "nope"), "small")
    os.makedirs(tmp_path / "image")
    with pytest.raises(DataError, match=r"test_list_800.txt' is missing.*image/ and train_test_split/"):
        read_vehicleid(str(tmp_path), "small")
    root = make_vehicleid(tmp_path, [("0000001", 4), ("0000002", 4)])
    os.remove(os.path.join(root, "image", "0000002.jpg"))
    with pytest.raises(DataError, match=r"test_list_800.txt names 1 image\(s\) that do not exist: .*0000002.jpg"):
        read_vehicleid(root, "small")
    write_text(os.path.join(root, "train_test_split", "test_list_800.txt"), "0000001 4\n0000001 4\n")
    with pytest.raises(DataError, match=r"test_list_800.txt:2: image '0000001' is listed twice \(also line 1\)"):
        read_vehicleid(root, "small")
    write_text(os.path.join(root, "train_test_split", "test_list_800.txt"), "\n")
    with pytest.raises(DataError, match="lists no images"):
        read_vehicleid(root, "small")


def test_registry_and_split_usage():
    assert set(DATASETS) == {"veri", "vehicleid", "veriwild"}
    assert DATASETS["vehicleid"].splits == DATASETS["veriwild"].splits == ("small", "medium", "large")
    with pytest.raises(UsageError, match="one test set"):
        get_dataset("veri").check_split("small")
    with pytest.raises(UsageError, match="needs a test split"):
        get_dataset("veriwild").check_split(None)
    with pytest.raises(UsageError, match="unknown dataset"):
        get_dataset("market")


# --------------------------------------------------------------------------- VERI-Wild reader

# The hand-worked VERI-Wild case. Every feature is a unit vector at an angle on a circle, so
# cosine distance ranks the gallery by angular distance from the query.
#   q1  00001/0000101  id 1  cam 1  at   0 deg
#   q2  00002/0000201  id 2  cam 3  at 180 deg
#   g0  00001/0000102  id 1  cam 1  at   5 deg  junk for q1 (its id and camera)
#   g1  00002/0000202  id 2  cam 3  at  10 deg  junk for q2
#   g2  00001/0000103  id 1  cam 2  at  20 deg
#   g3  00003/0000301  id 3  cam 1  at  90 deg
#   g4  00002/0000203  id 2  cam 5  at 170 deg
# q1 ranks g0 g1 g2 g3 g4; without junk g0 is a hit at position 0 (rank-1 hit). With the junk
# rule g0 leaves the ranking: g1 (miss) at 0, g2 (hit) at 1, g3, g4. So q1 misses rank 1,
# hits rank 5; trapezoidal AP = (old + prec) / 2 = (0/1 + 1/2) / 2 = 0.25 (standard AP 1/2);
# INP = 1 hit / (last hit position 1 + 1) = 1/2.
# q2 ranks g4 (10 deg away) first: a hit at 0, AP 1, INP 1 (g1 is junk, never counted).
# mAP = (0.25 + 1) / 2 = 0.625 (standard (0.5 + 1) / 2 = 0.75), rank-1 1/2, rank-5 1,
# mINP (1/2 + 1) / 2 = 0.75. Were g0 a valid hit, q1 would score rank-1 and
# AP = (1 + (1/2 + 2/3) / 2) / 2 = 0.7917: the junk rule changes the result.
WILD_QUERY = ["00001/0000101", "00002/0000201"]
WILD_GALLERY = ["00001/0000102", "00002/0000202", "00001/0000103", "00003/0000301", "00002/0000203"]
WILD_CAMS = {"00001/0000101": 1, "00002/0000201": 3, "00001/0000102": 1, "00002/0000202": 3,
             "00001/0000103": 2, "00003/0000301": 1, "00002/0000203": 5}
WILD_ANGLES = {"00001/0000101": 0, "00002/0000201": 180, "00001/0000102": 5, "00002/0000202": 10,
               "00001/0000103": 20, "00003/0000301": 90, "00002/0000203": 170}


def _angle(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def _wild_features(data):
    def feats(paths):
        keys = ["/".join(p.split(os.sep)[-2:])[: -len(".jpg")] for p in paths]
        return np.asarray([_angle(WILD_ANGLES[k]) for k in keys], dtype=np.float32)

    return feats(data.query.paths), feats(data.gallery.paths)


def test_read_veriwild_real_layout_and_query_left_out_of_gallery(tmp_path):
    # The gallery list also names q1: it is left out of the gallery and counted.
    root = make_veriwild(tmp_path, WILD_QUERY, [WILD_QUERY[0]] + WILD_GALLERY, WILD_CAMS)
    data = read_veriwild(root, "small")
    assert data.query_in_gallery == 1
    assert [os.path.relpath(p, root) for p in data.query.paths] == [
        os.path.join("images", "00001", "0000101.jpg"), os.path.join("images", "00002", "0000201.jpg")]
    assert data.query.ids.tolist() == [1, 2] and data.query.cams.tolist() == [1, 3]
    assert data.gallery.ids.tolist() == [1, 2, 1, 3, 2] and data.gallery.cams.tolist() == [1, 3, 2, 1, 5]
    assert not set(data.query.paths) & set(data.gallery.paths)
    assert [os.path.basename(s) for s in data.sources] == ["test_3000_query.txt", "test_3000.txt",
                                                           "vehicle_info.txt"]
    # Gallery lists without the queries (the published ones) give the same sets.
    root2 = make_veriwild(tmp_path / "b", WILD_QUERY, WILD_GALLERY, WILD_CAMS, n=10000)
    data2 = read_veriwild(root2, "large")
    assert data2.query_in_gallery == 0 and data2.gallery.cams.tolist() == [1, 3, 2, 1, 5]


def test_veriwild_metrics_hand_worked_with_junk(tmp_path):
    data = read_veriwild(make_veriwild(tmp_path, WILD_QUERY, WILD_GALLERY, WILD_CAMS), "small")
    qf, gf = _wild_features(data)
    args = (qf, gf, data.query.ids, data.gallery.ids, data.query.cams, data.gallery.cams)
    r = evaluate_split(*args)
    assert r.mAP == pytest.approx(0.625) and r.mINP == pytest.approx(0.75)
    assert r.rank(1) == 0.5 and r.rank(5) == 1.0 and r.num_valid_query == 2
    assert evaluate_split(*args, ap="standard").mAP == pytest.approx(0.75)
    # The same gallery with every camera distinct (no junk): q1's g0 becomes a rank-1 hit.
    no_junk = evaluate_split(qf, gf, data.query.ids, data.gallery.ids, [100, 101], np.arange(5))
    assert no_junk.rank(1) == 1.0 and no_junk.per_query_ap[0] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)


@pytest.mark.parametrize("name,text,message", [
    ("test_3000.txt", "00001/0000102\n00001-0000103\n", "test_3000.txt:2: expected '<vid>/<imgid>'"),
    ("test_3000.txt", "00001/0000102\nx/0000103\n", "test_3000.txt:2: expected '<vid>/<imgid>'"),
    ("test_3000_query.txt", "00001/0000101 00001/0000102\n", "test_3000_query.txt:1: expected '<vid>/<imgid>'"),
    ("test_3000.txt", "00001/0000102\n00001/0000102\n", "test_3000.txt:2: image '00001/0000102' is listed twice"),
    ("vehicle_info.txt", INFO_HEADER + "00001/0000101;1;t;m;t;c\n00001/0000102;cam7;t;m;t;c\n",
     "vehicle_info.txt:3: expected '<vid>/<imgid>;<camera id>;<time>;<model>;<type>;<color>'"),
    ("vehicle_info.txt", INFO_HEADER + "00001/0000101;1;t;m;t;c\n",
     "test_3000.txt:1: image '00001/0000102' has no line in"),
])
def test_veriwild_bad_lines_name_file_and_line(tmp_path, name, text, message):
    root = make_veriwild(tmp_path, WILD_QUERY[:1], ["00001/0000102", "00001/0000103"],
                         {k: WILD_CAMS[k] for k in ("00001/0000101", "00001/0000102", "00001/0000103")})
    write_text(os.path.join(root, "train_test_split", name), text)
    with pytest.raises(DataError) as err:
        read_veriwild(root, "small")
    assert message in str(err.value)


def test_veriwild_layout_errors(tmp_path):
    root = make_veriwild(tmp_path, WILD_QUERY, WILD_GALLERY, WILD_CAMS)
    with pytest.raises(DataError, match=r"test_5000_query.txt' is missing.*images/ and train_test_split/"):
        read_veriwild(root, "medium")
    os.remove(os.path.join(root, "images", "00003", "0000301.jpg"))
    with pytest.raises(DataError, match=r"test_3000.txt names 1 image\(s\) that do not exist"):
        read_veriwild(root, "small")
    os.remove(os.path.join(root, "train_test_split", "vehicle_info.txt"))
    with pytest.raises(DataError, match="vehicle_info.txt' is missing"):
        read_veriwild(root, "small")
    with pytest.raises(DataError, match="VERI-Wild image folder .* is missing"):
        read_veriwild(str(tmp_path / "train_test_split"), "small")
    root = make_veriwild(tmp_path / "c", WILD_QUERY, WILD_QUERY, WILD_CAMS)
    with pytest.raises(DataError, match="every image it lists is a query"):
        read_veriwild(root, "small")


# --------------------------------------------------------------------------- VehicleID protocol

# The hand-worked VehicleID case: 8 images of 3 ids, unit vectors in 3-D.
#   id 1: 2 images at p1 = (cos 30, sin 30, 0) and p2 = (cos 30, -sin 30, 0)   (cos(p1, p2) = 0.5)
#   id 2: 3 images, all at u = (1, 0, 0)                                     (cos(p, u) = 0.866)
#   id 3: 3 images, all at w = (0, 0, 1)                                     (cos(., w) = 0)
# Whichever image a trial puts in the gallery, the gallery is {one of p1/p2, u, w} and the
# 5 queries are: the other id-1 image, two at u, two at w.
#   id-1 query: u (0.866) first, its match (0.5) second: a miss at rank 1, a hit at rank 5;
#     trapezoidal AP = (0/1 + 1/2) / 2 = 0.25 (standard 0.5); INP 1/2.
#   id-2 and id-3 queries: the identical gallery vector first: AP 1, INP 1.
# mAP = (0.25 + 4) / 5 = 0.85 (standard (0.5 + 4) / 5 = 0.9), rank-1 4/5, rank-5 1,
# mINP (0.5 + 4) / 5 = 0.9, in every trial: mean as given, standard deviation 0.
C30, S30 = math.cos(math.radians(30)), math.sin(math.radians(30))
VID_FEATURES = np.asarray([[C30, S30, 0], [1, 0, 0], [0, 0, 1], [C30, -S30, 0], [1, 0, 0], [0, 0, 1],
                           [1, 0, 0], [0, 0, 1]], dtype=np.float32)
VID_IDS = np.asarray([1, 2, 3, 1, 2, 3, 2, 3])


def test_vehicleid_metrics_hand_worked():
    res = evaluate_vehicleid(VID_FEATURES, VID_IDS, trials=4, seed=0)
    out = res.to_dict()
    assert out["mAP"] == pytest.approx(0.85) and out["mINP"] == pytest.approx(0.9)
    assert out["rank1"] == pytest.approx(0.8) and out["rank5"] == 1.0 and out["rank10"] == 1.0
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in out["std"].values())
    assert out["num_query"] == 5 and out["num_valid_query"] == 5 and res.num_gallery == 3
    assert out["trials"] == 4 and out["seed"] == 0 and len(out["per_trial"]) == 4
    assert evaluate_vehicleid(VID_FEATURES, VID_IDS, trials=2, ap="standard").mean("mAP") == pytest.approx(0.9)


def test_one_image_per_identity_draw():
    ids = np.repeat(np.arange(40), 4)[np.random.default_rng(3).permutation(160)]
    q, g = one_image_per_identity(ids, seed=0, trial=0)
    assert sorted(ids[g].tolist()) == list(range(40))  # exactly one gallery image per identity
    assert np.array_equal(np.sort(np.concatenate([q, g])), np.arange(160))
    assert np.all(np.diff(q) > 0) and np.all(np.diff(g) > 0)
    # The documented rule: the image with the smallest PCG64(SeedSequence([seed, trial])) key.
    keys = np.random.PCG64(np.random.SeedSequence([0, 0])).random_raw(160)
    assert all(keys[i] == keys[ids == ids[i]].min() for i in g)
    same = one_image_per_identity(ids, seed=0, trial=0)
    assert np.array_equal(same[1], g) and np.array_equal(same[0], q)
    assert not np.array_equal(one_image_per_identity(ids, seed=1, trial=0)[1], g)  # another seed
    assert not np.array_equal(one_image_per_identity(ids, seed=0, trial=1)[1], g)  # another trial


def test_vehicleid_trials_reproducible_and_equal_to_per_split_evaluation():
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(12), rng.integers(2, 6, 12))
    centres = rng.standard_normal((12, 8))
    feats = (centres[ids] + 1.2 * rng.standard_normal((ids.size, 8))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    res = evaluate_vehicleid(feats, ids, trials=5, seed=7)
    again = evaluate_vehicleid(feats, ids, trials=5, seed=7)
    assert [t.mAP for t in res.trials] == [t.mAP for t in again.trials]
    assert [t.mAP for t in evaluate_vehicleid(feats, ids, trials=3, seed=7).trials] == [t.mAP for t in res.trials[:3]]
    other = evaluate_vehicleid(feats, ids, trials=5, seed=8)
    assert [t.mAP for t in other.trials] != [t.mAP for t in res.trials]
    maps = []
    for trial in range(5):  # each trial is plain evaluation of its split, each image its own camera
        q, g = one_image_per_identity(ids, 7, trial)
        want = evaluate(cosine_distance(feats[q], feats[g]), ids[q], ids[g], q, g)
        assert res.trials[trial].mAP == want.mAP and np.array_equal(res.trials[trial].cmc, want.cmc)
        maps.append(want.mAP)
    assert len(set(maps)) > 1  # the splits differ, so the spread is real
    assert res.mean("mAP") == pytest.approx(np.mean(maps)) and res.std("mAP") == pytest.approx(np.std(maps))


def test_vehicleid_features_file_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "vid.npz")
    save_vehicleid_features(path, VehicleIDFeatures(VID_FEATURES, VID_IDS, [f"{i:07d}" for i in range(8)], "small"))
    vf = load_vehicleid_features(path)
    assert np.array_equal(vf.features, VID_FEATURES) and vf.ids.tolist() == VID_IDS.tolist()
    assert vf.split == "small" and vf.names.tolist()[1] == "0000001"
    np.savez(tmp_path / "short.npz", features=VID_FEATURES, ids=VID_IDS[:-1])
    with pytest.raises(DataError, match="short.npz: ids has shape"):
        load_vehicleid_features(str(tmp_path / "short.npz"))
    np.savez(tmp_path / "veri.npz", query_features=VID_FEATURES)
    with pytest.raises(DataError, match="veri.npz: missing key.*features, ids"):
        load_vehicleid_features(str(tmp_path / "veri.npz"))
    np.savez(tmp_path / "other.npz", features=VID_FEATURES, ids=VID_IDS, dataset="veriwild")
    with pytest.raises(DataError, match="other.npz: features of dataset 'veriwild', not VehicleID"):
        load_vehicleid_features(str(tmp_path / "other.npz"))


# --------------------------------------------------------------------------- command line


def test_cli_vehicleid_features(tmp_path):
    path = str(tmp_path / "vid.npz")
    # The documented layout, written by hand: every test image's features and ids.
    np.savez(path, features=VID_FEATURES, ids=VID_IDS, dataset="vehicleid", split="small")
    proc = run_cli("--dataset", "vehicleid", "--features", path, "--trials", "3", "--seed", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["mAP"] == pytest.approx(0.85) and out["rank1"] == pytest.approx(0.8) and out["rank5"] == 1.0
    assert out["std"]["mAP"] == pytest.approx(0.0, abs=1e-12) and out["mINP"] == pytest.approx(0.9)
    assert (out["trials"], out["seed"], out["dataset"], out["split"]) == (3, 4, "vehicleid", "small")
    assert out["num_query"] == 5 and out["num_gallery"] == 3 and len(out["per_trial"]) == 3
    lines = proc.stdout.splitlines()
    assert "3 trial(s) with seed 4" in lines[0] and "[vehicleid small]" in lines[0]
    assert lines[1].startswith("mAP 85.00 ± 0.00 | rank-1 80.00 ± 0.00 | rank-5 100.00 ± 0.00")
    # Defaults: 10 trials, seed 0; re-ranking runs per trial.
    out = last_json(run_cli("--dataset", "vehicleid", "--features", path, "--json").stdout)
    assert (out["trials"], out["seed"]) == (10, 0)
    proc = run_cli("--dataset", "vehicleid", "--features", path, "--rerank", "--k1", "3", "--k2", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["rerank"] == {"k1": 3, "k2": 2, "lambda": 0.0, "neighbours": "exact", "nprobe": None}
    proc = run_cli("--dataset", "vehicleid", "--features", path, "--split", "large")
    assert proc.returncode == 1 and "vid.npz: features of split 'small', not 'large'" in proc.stderr


def test_cli_veriwild_features(tmp_path):
    data = read_veriwild(make_veriwild(tmp_path, WILD_QUERY, WILD_GALLERY, WILD_CAMS), "small")
    qf, gf = _wild_features(data)
    path = str(tmp_path / "wild.npz")
    save_features_npz(path, FeatureSet(qf, data.query.ids, data.query.cams, gf, data.gallery.ids,
                                       data.gallery.cams, dataset="veriwild", split="small"))
    proc = run_cli("--dataset", "veriwild", "--features", path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["mAP"] == pytest.approx(0.625) and out["rank1"] == 0.5 and out["mINP"] == pytest.approx(0.75)
    assert (out["dataset"], out["split"], out["num_gallery"]) == ("veriwild", "small", 5)
    assert "[veriwild small]" in proc.stdout.splitlines()[0]
    # Features of VERI-Wild are refused as VeRi-776's, and the other way round.
    proc = run_cli("--features", path)
    assert proc.returncode == 1 and "wild.npz: features of dataset 'veriwild', not 'veri'" in proc.stderr
    proc = run_cli("--dataset", "vehicleid", "--features", path)
    assert proc.returncode == 1 and "wild.npz: missing key(s) features, ids" in proc.stderr


def test_cli_usage_errors(tmp_path):
    path = str(tmp_path / "vid.npz")
    np.savez(path, features=VID_FEATURES, ids=VID_IDS)
    for args, message in [
        (("--features", path, "--split", "small"), "one test set"),
        (("--features", path, "--trials", "3"), "--trials and --seed apply to --dataset vehicleid only"),
        (("--dataset", "veriwild", "--features", path, "--seed", "1"), "apply to --dataset vehicleid only"),
        (("--dataset", "vehicleid", "--data", str(tmp_path)), "VehicleID needs a test split"),
        (("--dataset", "vehicleid", "--features", path, "--trials", "0"), "--trials must be from 1 to 1000, got 0"),
        (("--dataset", "vehicleid", "--features", path, "--seed", "-1"), "--seed must be >= 0"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = run_cli("--dataset", "vehicleid", "--data", str(tmp_path / "none"), "--split", "small")
    assert proc.returncode == 1 and "VehicleID root" in proc.stderr and "is missing" in proc.stderr


def test_cli_features_paths_do_not_import_mindspore(tmp_path):
    path = str(tmp_path / "vid.npz")
    np.savez(path, features=VID_FEATURES, ids=VID_IDS)
    code = (
        "import sys\nfrom vehiclenet.cli import main\n"
        f"rc = main(['evaluate', '--dataset', 'vehicleid', '--features', {path!r}, '--trials', '2'])\n"
        "print('RC', rc, 'MS', 'mindspore' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "RC 0 MS False", proc.stderr


def test_cli_save_features_onto_the_dataset_is_refused(tmp_path):
    root = make_vehicleid(tmp_path / "vid", [("0000001", 4), ("0000002", 4)])
    wild = make_veriwild(tmp_path / "wild", WILD_QUERY, WILD_GALLERY, WILD_CAMS)
    for args, out in [
        (("--dataset", "vehicleid", "--data", root), os.path.join(root, "train_test_split", "test_list_800.txt")),
        (("--dataset", "vehicleid", "--data", root), os.path.join(root, "image", "0000002.jpg")),
        (("--dataset", "veriwild", "--data", wild), os.path.join(wild, "train_test_split", "vehicle_info.txt")),
    ]:
        before = open(out, "rb").read()
        proc = run_cli(*args, "--split", "small", "--save-features", out, "--checkpoint", str(tmp_path / "no.ckpt"))
        assert proc.returncode == 2 and "own input" in proc.stderr, proc.stderr
        assert open(out, "rb").read() == before
