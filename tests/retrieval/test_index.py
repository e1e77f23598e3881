"""Gallery indexes (vehiclenet/retrieval/index.py) and `vehiclenet index` / `search` / `rank --gallery INDEX`,
on real files with real faiss; the command line as real subprocesses."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vehiclenet.errors import DataError
from vehiclenet.retrieval.exact import nearest
from vehiclenet.embedding.result import save_features
from vehiclenet.retrieval.index import GalleryIndex, build_index, load_index

from support.features import clustered, names, unit
from support.images import COLOURS, draw_vehicle
from support.processes import run_cli


# --------------------------------------------------------------------------- library


def test_exact_equals_nearest_for_batches_single_queries_and_ties(tmp_path):
    feats, ids, _ = clustered(9000, 64, seed=1)
    feats[5000] = feats[10]  # exact duplicates: ties broken by gallery order, as nearest does
    feats[8999] = feats[10]
    rng = np.random.default_rng(2)
    queries = np.concatenate([unit(feats[:40] + 0.05 * rng.standard_normal((40, 64))), feats[10:11]])
    index = GalleryIndex.build(feats, names(9000), ids=ids, cams=ids % 5)
    assert index.kind == "exact"  # auto: small gallery

    dist, rows = index.search(queries, 12)
    assert dist.shape == rows.shape == (41, 12) and rows.dtype == np.int64
    for q, d, r in zip(queries, dist, rows):
        ref_rows, ref_dist = nearest(q, feats, 12)
        assert r.tolist() == ref_rows.tolist()
        np.testing.assert_allclose(d, ref_dist, rtol=0, atol=1e-6)
        assert np.all(np.diff(d) >= 0)
    assert rows[-1][:3].tolist() == [10, 5000, 8999]
    for q in queries[:5]:  # one query alone: nearest's own product, the very same bits
        d1, r1 = index.search(q, 12)
        ref_rows, ref_dist = nearest(q, feats, 12)
        assert r1[0].tolist() == ref_rows.tolist() and d1[0].tobytes() == ref_dist.tobytes()

    out = index.save(tmp_path / "g.index")
    loaded = load_index(out)
    assert isinstance(loaded._store.vectors, np.memmap)  # memory-mapped, not read into memory
    assert (loaded.kind, loaded.count, loaded.dimension) == ("exact", 9000, 64)
    assert loaded.paths == names(9000) and loaded.path(8999) == "gallery/008999.jpg"
    assert loaded.ids.tolist() == ids.tolist() and loaded.cams.tolist() == (ids % 5).tolist()
    d2, r2 = loaded.search(queries, 12)
    assert r2.tolist() == rows.tolist() and d2.tobytes() == dist.tobytes()
    assert loaded.search(queries[:2], 20000)[1].shape == (2, 9000)  # k beyond the gallery: all rows
    np.testing.assert_array_equal(loaded.vectors(100, 103), feats[100:103])


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-flat", "hnsw-sq8"])
def test_approximate_recall_on_clustered_features_and_round_trip(tmp_path, kind):
    feats, _, centres = clustered(20000, 64, seed=3)
    rng = np.random.default_rng(4)
    queries = unit(centres[rng.integers(0, len(centres), 300)] + 0.8 * unit(rng.standard_normal((300, 64))))
    exact = GalleryIndex.build(feats, names(20000), kind="exact")
    approx = GalleryIndex.build(feats, names(20000), kind=kind, nprobe=32, ef_search=64)  # given: not tuned
    _, truth = exact.search(queries, 10)
    dist, rows = approx.search(queries, 10)
    # Identities spread evenly over 64-d (no coarser structure): a hard case for cells
    # (measured 0.91 for ivf at nprobe 32); search with more effort finds (almost) all.
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert recall >= 0.85, recall
    assert np.all(np.diff(dist, axis=1) >= -1e-6)
    if kind.startswith("ivf"):
        assert approx.params["nlist"] == 128  # the power of two nearest sqrt(20000)
        _, more = approx.search(queries, 10, nprobe=128)  # every cell
    else:
        assert approx.params["ef_search"] == 64
        _, more = approx.search(queries, 10, ef_search=400)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(more, truth)]) >= 0.98

    loaded = load_index(approx.save(tmp_path / "g.index"))
    assert loaded._store.keep_alive is not None  # faiss reads its codes from the memory-mapped file
    d2, r2 = loaded.search(queries, 10)
    assert r2.tolist() == rows.tolist()
    np.testing.assert_array_equal(d2, dist)
    self_dist, self_rows = loaded.search_self(5, batch=3000)
    assert self_rows.shape == (20000, 5)
    assert np.mean(self_rows[:, 0] == np.arange(20000)) > 0.95  # each row finds itself first
    decoded = loaded.vectors(0, 50)
    assert np.abs(decoded - feats[:50]).max() < (1e-6 if kind == "ivf-flat" else 0.02)


def test_add_equals_building_at_once_and_grows_a_mapped_ivf_index(tmp_path):
    feats, ids, _ = clustered(6000, 32, seed=5)
    whole = GalleryIndex.build(feats, names(6000), ids=ids, kind="exact")
    part = GalleryIndex.build(feats[:4000], names(4000), ids=ids[:4000], kind="exact")
    loaded = load_index(part.save(tmp_path / "e.index"))
    loaded.add(feats[4000:], names(2000, 4000), ids=ids[4000:])
    grown = load_index(loaded.save(tmp_path / "e.index"))
    q = feats[::97]
    assert grown.search(q, 7)[1].tolist() == whole.search(q, 7)[1].tolist()
    assert grown.paths == names(6000) and grown.ids.tolist() == ids.tolist()
    with pytest.raises(DataError, match="stores ids"):
        grown.add(feats[:3], names(3))  # ids for some rows only would misalign them
    with pytest.raises(DataError, match="32-d"):
        grown.add(np.full((2, 16), 0.25, np.float32), names(2))

    ivf = load_index(GalleryIndex.build(feats[:4000], names(4000), kind="ivf-flat").save(tmp_path / "i.index"))
    ivf.add(feats[4000:], names(2000, 4000))  # from a read-only map: copied into memory first
    ivf = load_index(ivf.save(tmp_path / "i.index"))
    assert ivf.count == 6000 and ivf.path(5999) == "gallery/005999.jpg"
    assert ivf.search(feats[5990:6000], 1, nprobe=ivf.params["nlist"])[1][:, 0].tolist() == list(range(5990, 6000))


class _FailingFile:
    """A file that fails like a full disk after ``limit`` bytes."""

    def __init__(self, fh, limit):
        self.fh, self.left = fh, limit

    def write(self, data):
        if len(data) > self.left:
            self.fh.write(bytes(data[:self.left]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import vehiclenet.retrieval.index as index_module

    feats, _, _ = clustered(3000, 32, seed=6)
    real = index_module._write_container
    monkeypatch.setattr(index_module, "_write_container",
                        lambda fh, manifest, parts: real(_FailingFile(fh, 50000), manifest, parts))
    out = tmp_path / "g.index"
    with pytest.raises(OSError):
        GalleryIndex.build(feats, names(3000)).save(out)
    assert not out.exists() and os.listdir(tmp_path) == []  # no final file, no temporary left

    monkeypatch.setattr(index_module, "_write_container", real)
    GalleryIndex.build(feats[:10], names(10)).save(out)
    before = out.read_bytes()
    monkeypatch.setattr(index_module, "_write_container",
                        lambda fh, manifest, parts: real(_FailingFile(fh, 50000), manifest, parts))
    with pytest.raises(OSError):
        GalleryIndex.build(feats, names(3000)).save(out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["g.index"]


def test_folder_of_features_files_is_read_in_sorted_order(tmp_path):
    feats, _, _ = clustered(300, 16, seed=7)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_features(shards / "b.npz", feats[100:], names(200, 100))
    save_features(shards / "a.npz", feats[:100], names(100))
    index = build_index([shards])
    assert index.paths == names(300) and index.sources == [str(shards / "a.npz"), str(shards / "b.npz")]



def test_chunk_folder_of_embed_out_dir_is_read_verified(tmp_path):
    """A folder written by `embed --out-dir` (here through the library, no network) is one
    source, in input order; a damaged chunk is refused, naming it."""
    from vehiclenet.embedding import shards
    from vehiclenet.embedding.result import FeatureResult

    feats, _, _ = clustered(10, 16, seed=9)
    paths = names(10)
    job = shards.ShardJob(images=10, inputs_sha256=shards.inputs_digest(paths), chunk_size=4, weights="sha256:00",
                          flip=True, precision="fp32", image_size=(384, 384), skip_bad=False, version="0")
    folder = tmp_path / "feats"
    shards.prepare_folder(folder, job)
    for chunk in range(job.chunks):
        a, b = job.chunk_range(chunk)
        shards._write_chunk(folder, job, chunk, paths[a:b], FeatureResult(feats[a:b], paths[a:b]))
    index = build_index([folder])
    assert index.paths == paths and index.sources == [str(folder)] and index.flip is True
    np.testing.assert_array_equal(index.vectors(0, 10), feats)

    with open(folder / shards.chunk_name(1), "r+b") as fh:  # one flipped byte in the middle chunk
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match=shards.chunk_name(1)):
        build_index([folder])

# --------------------------------------------------------------------------- command line


@pytest.fixture
def features_files(tmp_path):
    feats, ids, _ = clustered(400, 512, seed=8)
    save_features(tmp_path / "a.npz", feats[:250], names(250), flip=True, ids=ids[:250], cams=ids[:250] % 4)
    save_features(tmp_path / "b.npz", feats[250:], names(150, 250), flip=True, ids=ids[250:], cams=ids[250:] % 4)
    save_features(tmp_path / "q.npz", feats[[3, 300]], ["q3.jpg", "q300.jpg"])
    return tmp_path, feats, ids


def test_cli_build_add_search_json(features_files):
    tmp, feats, ids = features_files
    res = run_cli("index", "build", "a.npz", "--out", "g.index", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "250 features, 512-d, kind exact" in res.stdout
    res = run_cli("index", "add", "g.index", "b.npz", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "added 150 to g.index: 400 features" in res.stdout

    res = run_cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", "4", "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["kind"], out["count"], out["top_k"]) == ("exact", 400, 4)
    assert [r["query"] for r in out["results"]] == ["q3.jpg", "q300.jpg"]
    for r, row in zip(out["results"], (3, 300)):
        ref_rows, ref_dist = nearest(feats[row], feats, 4)
        assert [m["row"] for m in r["matches"]] == ref_rows.tolist()
        assert [m["rank"] for m in r["matches"]] == [1, 2, 3, 4]
        assert [m["path"] for m in r["matches"]] == [f"gallery/{i:06d}.jpg" for i in ref_rows]
        assert [m["distance"] for m in r["matches"]] == [float(d) for d in ref_dist]
        assert [m["id"] for m in r["matches"]] == ids[ref_rows].tolist()
        assert [m["cam"] for m in r["matches"]] == (ids[ref_rows] % 4).tolist()

    res = run_cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", "2", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "query q3.jpg: top 2 of 400 (exact index)" in res.stdout
    assert "   1  0.0000  gallery/000003.jpg" in res.stdout

    res = run_cli("index", "build", "a.npz", "b.npz", "--out", "i.index", "--kind", "ivf-sq8", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "kind ivf-sq8 (nlist 10, nprobe " in res.stdout  # 400 rows: at most 400/39 cells
    assert "search settings: nprobe " in res.stdout and "on 400 of its own rows" in res.stdout


def test_search_leaves_each_query_own_file_out_as_rank_does(features_files):
    from vehiclenet.retrieval.ranking import search_leaving_out

    tmp, feats, _ = features_files
    assert run_cli("index", "build", "a.npz", "--out", "g.index", cwd=tmp).returncode == 0
    # Queries that are gallery images: gallery/000003.jpg and gallery/000007.jpg themselves.
    save_features(tmp / "own.npz", feats[[3, 7]], names(1, 3) + names(1, 7))
    res = run_cli("search", "--index", "g.index", "--features", "own.npz", "--top-k", "3", "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    for r, row in zip(json.loads(res.stdout)["results"], (3, 7)):
        ref_rows, _ = nearest(feats[row], feats[:250], 4)
        assert ref_rows[0] == row and [m["row"] for m in r["matches"]] == ref_rows[1:].tolist()
    res = run_cli("search", "--index", "g.index", "--features", "own.npz", "--top-k", "3", "--keep-self", cwd=tmp)
    assert res.returncode == 0 and "   1  0.0000  gallery/000003.jpg" in res.stdout, res.stdout

    # A file held three times: the search widens until k other rows are found.
    index = GalleryIndex.build(np.concatenate([feats[:20], feats[[5, 5]]]), names(20) + names(1, 5) * 2)
    dist, rows, dropped = search_leaving_out(index, feats[[5, 6]], [names(1, 5)[0], None], 4)
    ref_rows, ref_dist = nearest(feats[5], np.delete(feats[:20], 5, axis=0), 4)
    assert rows[0].tolist() == [r + (r >= 5) for r in ref_rows.tolist()] and dropped.tolist() == [3, 0]
    np.testing.assert_allclose(dist[0], ref_dist, atol=1e-6)
    assert rows[1][0] == 6  # no name: nothing left out


def test_index_add_skips_paths_the_index_already_holds(features_files):
    tmp, feats, _ = features_files
    assert run_cli("index", "build", "a.npz", "--out", "g.index", cwd=tmp).returncode == 0
    res = run_cli("index", "add", "g.index", "a.npz", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "added 0 to g.index: 250 features" in res.stdout
    assert "250 of 250 added row(s) skipped: their paths are already in the index (gallery/000000.jpg" in res.stderr
    # Half known, half new, and one new path twice: only the new ones, once each.
    save_features(tmp / "mix.npz", feats[245:255], names(10, 245), flip=True, ids=np.arange(10),
                  cams=np.arange(10) % 4)
    save_features(tmp / "again.npz", feats[[260]], names(1, 250), flip=True, ids=[99], cams=[1])
    res = run_cli("index", "add", "g.index", "mix.npz", "again.npz", cwd=tmp)
    assert res.returncode == 0, res.stderr
    assert "added 5 to g.index: 255 features" in res.stdout and "6 of 11 added row(s) skipped" in res.stderr
    index = load_index(tmp / "g.index")
    assert index.paths == names(255) and index.ids[250:].tolist() == [5, 6, 7, 8, 9]
    np.testing.assert_array_equal(index.vectors(250, 255), feats[250:255])


def test_cli_refuses_foreign_damaged_and_mismatched_indexes(features_files):
    tmp, _, _ = features_files
    assert run_cli("index", "build", "a.npz", "b.npz", "--out", "g.index", cwd=tmp).returncode == 0
    good = (tmp / "g.index").read_bytes()

    def search(index, features="q.npz"):
        return run_cli("search", "--index", index, "--features", features, cwd=tmp)

    # Built by another vehiclenet version (a real build with the package reporting 0.9.0).
    old = run_cli("index", "build", "a.npz", "--out", "old.index", cwd=tmp,
                  python_prefix="import sys, vehiclenet\nvehiclenet.__version__ = '0.9.0'")
    assert old.returncode == 0, old.stderr
    res = search("old.index")
    assert res.returncode == 1
    assert "old.index: built by vehiclenet 0.9.0, this is vehiclenet 1.0.0" in res.stderr
    assert "rebuild it: vehiclenet index build a.npz --out old.index" in res.stderr

    save_features(tmp / "q256.npz", np.ones((1, 256), np.float32) / 16, ["q.jpg"])
    res = search("g.index", "q256.npz")
    assert res.returncode == 1 and "g.index: holds 512-d features, the queries are 256-d" in res.stderr

    (tmp / "cut.index").write_bytes(good[: len(good) // 2])
    res = search("cut.index")
    assert res.returncode == 1 and "cut.index: truncated" in res.stderr and "copy it again" in res.stderr

    damaged = bytearray(good)
    damaged[5000] ^= 0xFF  # inside the vectors
    (tmp / "bad.index").write_bytes(bytes(damaged))
    res = search("bad.index")
    assert res.returncode == 1 and "bad.index: damaged (part vectors does not match its sha256)" in res.stderr

    res = search("a.npz")
    assert res.returncode == 1 and "a.npz: not a vehiclenet gallery index (it is a features .npz" in res.stderr
    (tmp / "notes.txt").write_text("hello\n")
    res = search("notes.txt")
    assert res.returncode == 1 and "notes.txt: not a vehiclenet gallery index" in res.stderr
    res = search("missing.index")
    assert res.returncode == 1 and "missing.index: no such index file" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_usage_errors_and_outputs_checked_before_work(features_files):
    tmp, _, _ = features_files
    (tmp / "folder.index").mkdir()
    res = run_cli("index", "build", "a.npz", "--out", "folder.index", cwd=tmp)
    assert res.returncode == 2 and "--out 'folder.index' is a folder" in res.stderr
    res = run_cli("index", "build", "a.npz", "--out", "a.npz", cwd=tmp)
    assert res.returncode == 2 and "own input" in res.stderr
    res = run_cli("index", "build", "a.npz", "--out", "x.index", "--nlist", "0", cwd=tmp)
    assert res.returncode == 2 and "--nlist must be from 1 to 2147483647" in res.stderr and not (tmp / "x.index").exists()
    res = run_cli("index", "build", "missing.npz", "--out", "x.index", cwd=tmp)
    assert res.returncode == 1 and "missing.npz" in res.stderr and not (tmp / "x.index").exists()
    assert run_cli("index", "build", "a.npz", "--out", "g.index", cwd=tmp).returncode == 0
    res = run_cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", "0", cwd=tmp)
    assert res.returncode == 2 and "--top-k must be >= 1" in res.stderr
    res = run_cli("search", "--index", "g.index", "--features", "q.npz", "--no-flip", cwd=tmp)
    assert res.returncode == 2 and "apply to --query only" in res.stderr


@pytest.mark.slow
def test_rank_and_search_on_an_index_with_query_images(tmp_path, small_ckpt):
    """One network run per command: embed the gallery, then rank and search against its index;
    both leave the query (a gallery image) out of its matches, unless search is told --keep-self."""

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, vid in enumerate((1, 1, 2, 3)):
        draw_vehicle(COLOURS[vid], 10 + i).save(gallery / f"{vid:04d}_c00{i}_{i:08d}_0.jpg", quality=92)
    query = gallery / "0001_c000_00000000_0.jpg"  # in the gallery itself: rank leaves it out
    common = ["--checkpoint", small_ckpt, "--batch-size", "4"]
    res = run_cli("embed", gallery, "--out", "g.npz", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_cli("index", "build", "g.npz", "--out", "g.index", cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    res = run_cli("rank", "--query", query, "--gallery", "g.index", "--top-k", "5", "--no-picture", *common,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "top 3 of 3 gallery images" in res.stdout
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert len(lines) == 3 and query.name not in res.stdout.split("\n", 1)[1]
    assert sorted(Path(ln[2]).name for ln in lines) == sorted(p.name for p in gallery.iterdir() if p != query)

    res = run_cli("search", "--index", "g.index", "--query", query, "--top-k", "3", "--json", *common,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    matches = json.loads(res.stdout.strip().splitlines()[-1])["results"][0]["matches"]
    assert [m["path"] for m in matches] == [ln[2] for ln in lines]  # rank's three, in rank's order
    res = run_cli("search", "--index", "g.index", "--query", query, "--top-k", "2", "--json", "--keep-self",
                  *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    matches = json.loads(res.stdout.strip().splitlines()[-1])["results"][0]["matches"]
    assert matches[0]["path"] == str(query) and abs(matches[0]["distance"]) < 1e-5  # its own features


def test_command_line_offers_every_index_kind():
    from vehiclenet.cli._network import INDEX_KINDS
    from vehiclenet.retrieval.index import KINDS

    assert INDEX_KINDS == KINDS and INDEX_KINDS[0] == "auto"
