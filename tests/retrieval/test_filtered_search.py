"""Camera-, time- and tag-aware search (vehiclenet/retrieval/filters.py, metadata.py, tracklets.py): a
filtered top-k is the true top-k of the rows that pass, compared with exact search over those
rows alone; metadata from CSV files, VeRi-776 names and VERI-Wild's vehicle_info.txt;
tracklets. Real faiss, real files, the command line as real subprocesses."""
import csv
import json

import numpy as np
import pytest

from vehiclenet.errors import DataError, UsageError
from vehiclenet.embedding.files import load_features
from vehiclenet.embedding.result import save_features
from vehiclenet.retrieval.exact import nearest
from vehiclenet.retrieval.filters import RowFilter
from vehiclenet.retrieval.index import GalleryIndex, load_index
from vehiclenet.embedding.metadata import UNKNOWN_CAMERA, UNKNOWN_TIME, parse_time, read_meta
from vehiclenet.retrieval.ranking import search_filtered
from vehiclenet.embedding.tracklets import aggregate, read_tracklets

from support.images import COLOURS, draw_vehicle
from support.features import clustered, names, unit
from support.processes import run_cli

T0 = 1_520_000_000  # 2018-03-02T14:13:20Z


def gallery_with_meta(n: int, d: int, seed: int):
    feats, ids, centres = clustered(n, d, seed=seed)
    rng = np.random.default_rng(seed + 100)
    cams = rng.integers(0, 20, n)
    times = T0 + rng.integers(0, 86_400, n)
    times[::97] = UNKNOWN_TIME
    tags = np.array(["red,sedan", "blue", "", "red,van"])[rng.integers(0, 4, n)]
    queries = unit(centres[rng.integers(0, len(centres), 40)] + 0.8 * unit(rng.standard_normal((40, d))))
    return feats, ids, cams, times, tags.tolist(), queries


def exact_over(feats: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int):
    """The truth: exact search over the allowed rows alone, in gallery row numbers."""
    rows = np.flatnonzero(allowed)
    order, dist = nearest(query, feats[rows], k)
    return rows[order], dist


def passing(cams, times, tags, flt: RowFilter, query_cam=None) -> np.ndarray:
    """The rows a filter keeps, written out plainly, row by row."""
    keep = []
    for c, t, g in zip(cams, times, tags):
        ok = flt.cameras is None or c in flt.cameras
        if flt.after is not None or flt.before is not None:
            ok &= t != UNKNOWN_TIME and (flt.after is None or t >= flt.after) and (flt.before is None or t < flt.before)
        ok &= set(flt.tags) <= set(g.split(","))
        ok &= not (flt.exclude_same_camera and c == query_cam)
        keep.append(bool(ok))
    return np.array(keep)


FILTERS = [RowFilter(cameras=(3, 7)), RowFilter(after=T0 + 3_600, before=T0 + 7_200),
           RowFilter(tags=("red",), cameras=(1, 2, 3, 4, 5)), RowFilter(cameras=(11,), tags=("red", "van"))]


@pytest.mark.parametrize("flt", FILTERS, ids=["cameras", "time-window", "tag+cameras", "one-camera-one-tag"])
def test_exact_filtered_search_is_exact_search_over_the_rows_that_pass(tmp_path, flt):
    feats, ids, cams, times, tags, queries = gallery_with_meta(6000, 32, seed=1)
    index = load_index(GalleryIndex.build(feats, names(6000), cams=cams, times=times, tags=tags).save(
        tmp_path / "g.index"))  # the metadata goes through the file
    allowed = passing(cams, times, tags, flt)
    assert 0 < allowed.sum() < 6000
    mask = flt.base_mask(index.columns(), 6000, "g.index")
    assert mask.tolist() == allowed.tolist()
    dist, rows = index.search(queries, 10, allowed=mask)
    for q, d, r in zip(queries, dist, rows):
        ref_rows, ref_dist = exact_over(feats, allowed, q, 10)
        found = r[r >= 0]
        assert found.tolist() == ref_rows.tolist()
        np.testing.assert_allclose(d[: len(found)], ref_dist, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf-sq8", "hnsw-sq8"])
def test_approximate_filtered_search_finds_the_filtered_top_k(kind):
    feats, ids, cams, times, tags, queries = gallery_with_meta(20000, 32, seed=2)
    index = GalleryIndex.build(feats, names(20000), cams=cams, times=times, tags=tags, kind=kind, tune_queries=300)
    flt = RowFilter(cameras=(4,))  # 5 % of the gallery: a post-filtered top-10 would keep ~0.5 rows
    allowed = passing(cams, times, tags, flt)
    dist, rows = index.search(queries, 10, allowed=flt.base_mask(index.columns(), 20000, "g"))
    assert set(rows[rows >= 0].tolist()) <= set(np.flatnonzero(allowed).tolist())
    assert (rows >= 0).all()  # ten matches for every query
    recall = np.mean([len(set(r) & set(exact_over(feats, allowed, q, 10)[0])) / 10 for q, r in zip(queries, rows)])
    assert recall >= 0.9, recall
    unfiltered = index.search(queries, 10)[1]
    assert np.mean([np.isin(r, np.flatnonzero(allowed)).sum() for r in unfiltered]) < 2  # what post-filtering keeps


def test_same_camera_exclusion_is_per_query_and_empty_filters_find_nothing():
    feats, ids, cams, times, tags, queries = gallery_with_meta(3000, 16, seed=3)
    index = GalleryIndex.build(feats, names(3000), cams=cams, times=times, tags=tags)
    q_cams = [int(c) for c in np.random.default_rng(4).integers(0, 20, len(queries))]
    q_cams[0] = UNKNOWN_CAMERA  # a query from an unknown camera excludes none
    flt = RowFilter(exclude_same_camera=True, after=T0)
    dist, rows, among = search_filtered(index, queries, [None] * len(queries), 10, flt, q_cams)
    for q, cam, r, n in zip(queries, q_cams, rows, among):
        allowed = passing(cams, times, tags, flt, cam)
        assert r.tolist() == exact_over(feats, allowed, q, 10)[0].tolist() and n == allowed.sum()
        assert cam == UNKNOWN_CAMERA or cam not in cams[r]
    with pytest.raises(UsageError, match="each query's camera"):
        search_filtered(index, queries, [None] * len(queries), 10, flt, None)

    nothing = np.zeros(3000, dtype=bool)
    dist, rows = index.search(queries[:2], 5, allowed=nothing)
    assert (rows == -1).all() and np.isinf(dist).all()
    few = np.zeros(3000, dtype=bool)
    few[[5, 9]] = True
    rows = index.search(queries[:2], 5, allowed=few)[1]
    assert [sorted(r[:2].tolist()) for r in rows] == [[5, 9], [5, 9]] and (rows[:, 2:] == -1).all()
    bare = GalleryIndex.build(feats, names(3000))
    with pytest.raises(DataError, match=r"--after/--before: the gallery index stores no times; .*--meta"):
        search_filtered(bare, queries, [None] * len(queries), 10, RowFilter(after=T0))
    with pytest.raises(UsageError, match="time window is empty"):
        RowFilter(after=T0, before=T0)


def test_metadata_from_csv_veri_names_and_veri_wild(tmp_path):
    paths = ["g/a.jpg", "g/b.jpg", "g/c.jpg"]
    (tmp_path / "m.csv").write_text("path,camera,time,tags\ng/a.jpg,3,2018-03-11 11:40:38,\"red, sedan\"\n"
                                    "./g/b.jpg,,1520768438,\ng/c.jpg,5,2018-03-11T19:40:38+08:00,blue\n")
    meta = read_meta(str(tmp_path / "m.csv"), paths)
    assert meta.cams.tolist() == [3, UNKNOWN_CAMERA, 5]
    assert meta.times.tolist() == [1520768438] * 3  # UTC, a number, and an offset all the same moment
    assert meta.tags == ["red,sedan", "", "blue"]
    with pytest.raises(DataError, match=r"m\.csv: has no row for g/d\.jpg"):
        read_meta(str(tmp_path / "m.csv"), paths + ["g/d.jpg"])
    (tmp_path / "bad.csv").write_text("path,time\ng/a.jpg,yesterday\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: 'yesterday' is not a time"):
        read_meta(str(tmp_path / "bad.csv"), ["g/a.jpg"])
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,camera\ng/a.jpg,2\n".encode("utf-8"))  # as spreadsheets save
    assert read_meta(str(tmp_path / "bom.csv"), ["g/a.jpg"]).cams.tolist() == [2]
    (tmp_path / "latin.csv").write_bytes("path,tags\ng/a.jpg,d\xe9j\xe0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not a UTF-8 CSV file"):
        read_meta(str(tmp_path / "latin.csv"), ["g/a.jpg"])
    (tmp_path / "ms.csv").write_text("path,time\ng/a.jpg,1520768438000\n")  # milliseconds
    with pytest.raises(DataError, match=r"ms\.csv:2: 1520768438000 seconds is beyond the years 1-9999"):
        read_meta(str(tmp_path / "ms.csv"), ["g/a.jpg"])
    (tmp_path / "nocol.csv").write_text("file,camera\n")
    with pytest.raises(DataError, match="header must name a path column"):
        read_meta(str(tmp_path / "nocol.csv"), ["g/a.jpg"])
    assert parse_time("1970-01-01T00:01:00") == 60
    assert read_meta("veri", ["x/0002_c014_00030600_0.jpg"]).cams.tolist() == [14]
    with pytest.raises(DataError, match="VeRi-776 image name"):
        read_meta("veri", ["car.jpg"])

    info = tmp_path / "wild" / "train_test_split" / "vehicle_info.txt"
    info.parent.mkdir(parents=True)
    info.write_text("id/image;Camera ID;Time;Model;Type;Color\n"
                    "00001/000001;12;2018-03-11 11:40:38;m;t;c\n00001/000002;40;2018-03-11 11:41:00;m;t;c\n")
    wild = read_meta(f"veri-wild:{tmp_path / 'wild'}", ["images/00001/000002.jpg", "images/00001/000001.jpg"])
    assert wild.cams.tolist() == [40, 12] and wild.times.tolist() == [1520768460, 1520768438]
    with pytest.raises(DataError, match="has no record for images/00002/000001.jpg"):
        read_meta(f"veri-wild:{tmp_path / 'wild'}", ["images/00002/000001.jpg"])


def test_tracklets_average_their_images_and_carry_their_metadata(tmp_path):
    rng = np.random.default_rng(5)
    feats = unit(rng.standard_normal((5, 8)))
    extra = {"cams": np.array([2, 2, 3, 4, 4]), "times": np.array([T0 + 9, T0 + 5, UNKNOWN_TIME, T0, T0 + 1]),
             "tags": np.array(["red", "sedan", "", "blue", ""])}
    tracks = aggregate(feats, ["t2", "t2", "t1", "t9", "t9"], extra)
    assert tracks.names == ["t2", "t1", "t9"] and tracks.sizes.tolist() == [2, 1, 2]
    np.testing.assert_allclose(tracks.features[0], unit((feats[0] + feats[1])[None])[0], atol=1e-6)
    np.testing.assert_allclose(tracks.features[1], feats[2], atol=1e-6)
    assert tracks.extra["cams"].tolist() == [2, 3, 4] and tracks.extra["times"].tolist() == [T0 + 5, UNKNOWN_TIME, T0]
    assert tracks.extra["tags"].tolist() == ["red,sedan", "", "blue"]
    mixed = aggregate(feats, ["a", "a", "a", "b", "b"], extra)
    assert mixed.extra["cams"].tolist() == [UNKNOWN_CAMERA, 4]  # a track over two cameras has none
    (tmp_path / "t.csv").write_text("path,track\na.jpg,t1\n")
    with pytest.raises(DataError, match=r"t\.csv: lists no track for b\.jpg"):
        read_tracklets(str(tmp_path / "t.csv"), ["a.jpg", "b.jpg"])


@pytest.fixture
def filtered_files(tmp_path):
    feats, ids, cams, times, tags, queries = gallery_with_meta(2000, 64, seed=6)
    save_features(tmp_path / "a.npz", feats[:1500], names(1500), ids=ids[:1500])
    save_features(tmp_path / "b.npz", feats[1500:], names(500, 1500), ids=ids[1500:])
    save_features(tmp_path / "q.npz", queries[:4], [f"q{i}.jpg" for i in range(4)], cams=np.array([3, 7, 11, 3]))
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "camera", "time", "tags"])
        for p, c, t, g in zip(names(2000), cams, times, tags):
            out.writerow([p, c, "" if t == UNKNOWN_TIME else int(t), g])
    return tmp_path, feats, cams, times, tags, queries[:4]


def test_cli_filtered_search_equals_exact_search_over_the_filtered_rows(filtered_files):
    tmp, feats, cams, times, tags, queries = filtered_files
    built = run_cli("index", "build", "a.npz", "--out", "g.index", "--meta", "meta.csv", cwd=tmp)
    assert built.returncode == 0, built.stderr
    added = run_cli("index", "add", "g.index", "b.npz", "--meta", "meta.csv", cwd=tmp)
    assert added.returncode == 0, added.stderr
    info = json.loads(run_cli("index", "info", "g.index", "--json", cwd=tmp).stdout)
    assert info["labels"] == ["ids", "cams", "times", "tags"] and info["count"] == 2000

    args = ["--cameras", "1,3,7,9", "--after", "2018-03-02 15:13:20", "--before", str(T0 + 60_000), "--tag", "red",
            "--exclude-same-camera"]
    res = run_cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", "5", *args, "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["filters"] == {"cameras": [1, 3, 7, 9], "after": T0 + 3600, "before": T0 + 60_000, "tags": ["red"],
                              "exclude_same_camera": True}
    flt = RowFilter(cameras=(1, 3, 7, 9), after=T0 + 3600, before=T0 + 60_000, tags=("red",),
                    exclude_same_camera=True)
    for result, q, q_cam in zip(out["results"], queries, (3, 7, 11, 3)):
        allowed = passing(cams, times, tags, flt, q_cam)
        assert [m["row"] for m in result["matches"]] == exact_over(feats, allowed, q, 5)[0].tolist()
        assert result["among"] == allowed.sum()
        assert all(m["cam"] in (1, 3, 7, 9) and m["cam"] != q_cam and "red" in m["tags"].split(",")
                   for m in result["matches"])
    text = run_cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", "2", *args, cwd=tmp)
    assert "filtered: cameras 1,3,7,9; after 2018-03-02T15:13:20Z" in text.stdout and "tags red" in text.stdout

    bare = run_cli("index", "build", "a.npz", "--out", "bare.index", cwd=tmp)
    assert bare.returncode == 0, bare.stderr
    res = run_cli("search", "--index", "bare.index", "--features", "q.npz", "--after", str(T0), cwd=tmp)
    assert res.returncode == 1 and "bare.index stores no times" in res.stderr and "--meta" in res.stderr


@pytest.mark.parametrize("bad, message", [
    (["--cameras", "a,b"], "--cameras 'a,b'"),
    (["--after", "soon"], "--after: 'soon' is not a time"),
    (["--query-camera", "3"], "--query-camera only serves --exclude-same-camera"),
    (["--tag", ""], "--tag takes one non-empty tag"),
    (["--cameras=-1,2"], "cameras are numbers from 0"),
    (["--after", "10" + "0" * 20], "beyond the years 1-9999"),
    (["--after", str(T0 + 5), "--before", str(T0)], "time window is empty"),
])
def test_cli_filter_usage_errors_exit_2_before_work(filtered_files, bad, message):
    tmp = filtered_files[0]
    res = run_cli("search", "--index", "missing.index", "--features", "q.npz", *bad, cwd=tmp)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_cli_meta_source_errors(filtered_files):
    tmp = filtered_files[0]
    before = (tmp / "meta.csv").read_bytes()
    res = run_cli("index", "build", "a.npz", "--out", "meta.csv", "--meta", "meta.csv", cwd=tmp)
    assert res.returncode == 2 and "meta.csv" in res.stderr and (tmp / "meta.csv").read_bytes() == before
    res = run_cli("index", "build", "a.npz", "--out", "g.index", "--meta", "nope.csv", cwd=tmp)
    assert res.returncode == 2 and "--meta nope.csv: no such file" in res.stderr and not (tmp / "g.index").exists()
    (tmp / "short.csv").write_text("path,camera\ngallery/000000.jpg,1\n")
    res = run_cli("index", "build", "a.npz", "--out", "g.index", "--meta", "short.csv", cwd=tmp)
    assert res.returncode == 1 and "short.csv: has no row for gallery/000001.jpg" in res.stderr
    res = run_cli("search", "--index", "x.index", "--query", "car.jpg", "--exclude-same-camera", cwd=tmp)
    assert res.returncode != 0


def test_cli_embed_meta_and_tracklets_then_filtered_rank(tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    files = []
    for k, (vid, cam) in enumerate(((1, 1), (1, 2), (2, 1), (2, 3), (3, 2), (3, 3))):
        name = gallery / f"{vid:04d}_c{cam:03d}_{k:08d}_0.jpg"
        draw_vehicle(COLOURS[vid], 10 + k).save(name, quality=92)
        files.append(str(name.relative_to(tmp_path)))
    draw_vehicle(COLOURS[1], 40).save(tmp_path / "0001_c001_query.jpg", quality=92)
    with open(tmp_path / "tracks.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "track"])
        for f in files:
            out.writerow([f, "track-" + f.split("/")[-1][:4]])
    common = ["--no-pretrained", "--image-size", "64", "--batch-size", "6"]
    images = run_cli("embed", "gallery", "--out", "g.npz", "--meta", "veri", *common, cwd=tmp_path)
    assert images.returncode == 0, images.stderr
    g = load_features(tmp_path / "g.npz")
    assert g.extra["cams"].tolist() == [1, 2, 1, 3, 2, 3]

    tracks = run_cli("embed", "gallery", "--out", "t.npz", "--meta", "veri", "--tracklets", "tracks.csv", *common,
                     cwd=tmp_path)
    assert tracks.returncode == 0, tracks.stderr
    assert "embedded 6 image(s) as 3 track(s)" in tracks.stdout
    t = load_features(tmp_path / "t.npz")
    assert t.paths == ["track-0001", "track-0002", "track-0003"] and t.extra["track_sizes"].tolist() == [2, 2, 2]
    assert t.extra["cams"].tolist() == [UNKNOWN_CAMERA] * 3  # each track crosses two cameras
    expected = aggregate(g.features, ["track-" + p.split("/")[-1][:4] for p in g.paths])
    np.testing.assert_allclose(t.features, expected.features, atol=1e-6)

    ranked = run_cli("rank", "--query", "0001_c001_query.jpg", "--gallery", "g.npz", "--exclude-same-camera",
                     "--no-picture", "--json", *common, cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr
    result = json.loads(ranked.stdout)["results"][0]
    assert result["num_gallery"] == 4  # the two camera-1 images left out
    assert all("_c001_" not in m["path"] for m in result["matches"])
    folder = run_cli("rank", "--query", "0001_c001_query.jpg", "--gallery", "gallery", "--cameras", "1",
                     "--no-picture", *common, cwd=tmp_path)
    assert folder.returncode == 2 and "not the folder gallery" in folder.stderr
