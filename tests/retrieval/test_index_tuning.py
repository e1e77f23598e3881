"""Self-tuned gallery indexes (vehiclenet/retrieval/index_tuning.py): the search effort chosen on the
gallery's own rows reaches the target on new queries, auto falls back to exact where ivf-sq8
cannot, `index add` re-checks, and the command line records and shows it. Real faiss, real
files, the command line as real subprocesses."""
import json
import logging

import numpy as np
import pytest

from vehiclenet.errors import DataError, UsageError
from vehiclenet.embedding.result import save_features
from vehiclenet.retrieval.index import GalleryIndex, load_index
from vehiclenet.retrieval.index_tuning import Tuning, exact_truth, ladder

from support.features import names, unit
from support.processes import run_cli


def identities(n: int, d: int, seed: int, spread: float = 3.0, per_id: int = 20, queries: int = 0):
    """Gallery rows (and new images of gallery identities as queries) shaped like
    benchmarks/index_speed.py's: identities around n/1000 models; spread 3 leaves no coarser
    structure (the hard case), 1.5 groups identities by model."""
    rng = np.random.default_rng(seed)
    models = unit(rng.standard_normal((max(1, n // 1000), d)))
    centres = unit(models[rng.integers(0, len(models), n // per_id)] + spread * unit(rng.standard_normal((n // per_id, d))))

    def images(count: int) -> np.ndarray:
        return unit(centres[rng.integers(0, len(centres), count)] + 0.9 * unit(rng.standard_normal((count, d))))

    return images(n), images(queries)


def recall_at_10(index: GalleryIndex, gallery: np.ndarray, queries: np.ndarray, **params) -> float:
    truth = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    rows = index.search(queries, 10, **params)[1]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))


def test_ladder_and_exact_truth_leave_the_query_out():
    assert ladder(1, 64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert ladder(11, 40) == [12, 16, 24, 32, 40] and ladder(65, 64) == []
    rng = np.random.default_rng(0)
    rows_ = unit(rng.standard_normal((300, 8)))
    query_rows = np.array([0, 5, 299])
    truth, _ = exact_truth(rows_[query_rows], query_rows, lambda a, b: rows_[a:b], 300, 4)
    for q, found in zip(query_rows, truth):
        sims = rows_ @ rows_[q]
        sims[q] = -np.inf
        assert sorted(found.tolist()) == sorted(np.argsort(-sims)[:4].tolist())


def test_auto_tunes_nprobe_so_that_new_queries_reach_the_target(tmp_path):
    gallery, queries = identities(60_000, 32, seed=1, queries=1000)
    # ivf-sq8 by name: auto would also weigh one query's time against exact search's (timing, not numerics)
    index = GalleryIndex.build(gallery, names(60_000), kind="ivf-sq8")
    tuning = index.tuning
    assert index.kind == "ivf-sq8" and tuning.param == "nprobe" and tuning.reached
    assert index.params["nprobe"] == tuning.value and tuning.recall_low >= 0.95 and tuning.queries == 2000
    # The choice holds on queries the tuning never saw, and is not larger than it needs to be.
    assert recall_at_10(index, gallery, queries) >= 0.94
    assert recall_at_10(index, gallery, queries, nprobe=max(1, tuning.value // 2)) < 0.95
    assert tuning.tried[-1][0] >= tuning.value and all(r < 0.95 for v, r in tuning.tried if v < tuning.value // 2)

    loaded = load_index(index.save(tmp_path / "g.index"))
    assert loaded.tuning == tuning and loaded.params == index.params
    assert loaded.search(queries[:50], 10)[1].tolist() == index.search(queries[:50], 10)[1].tolist()


def test_auto_falls_back_to_exact_where_ivf_cannot_reach_the_target(caplog):
    gallery, queries = identities(52_000, 16, seed=2, queries=20)
    with caplog.at_level(logging.WARNING, logger="vehiclenet.retrieval.index"):
        index = GalleryIndex.build(gallery, names(52_000), target_recall=1.0, tune_queries=200)
    assert index.kind == "exact" and index.params == {} and index.tuning.param is None
    assert "cannot meet recall@10 1" in index.tuning.note and "the index is exact instead" in caplog.text
    assert recall_at_10(index, gallery, queries) == 1.0

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vehiclenet.retrieval.index"):
        ivf = GalleryIndex.build(gallery, names(52_000), kind="ivf-sq8", target_recall=1.0, tune_queries=200)
    assert ivf.kind == "ivf-sq8" and not ivf.tuning.reached  # asked for by name: kept, with a warning
    assert ivf.params["nprobe"] == ivf.params["nlist"] == ivf.tuning.value  # the largest setting tried
    assert "below the target 1" in caplog.text and "--kind exact" in caplog.text


def test_add_rechecks_the_added_rows_and_raises_the_setting_where_they_need_it(caplog):
    gallery, similar = identities(8000, 32, seed=3, spread=1.5, queries=1000)  # new images, same identities
    index = GalleryIndex.build(gallery, names(8000), kind="ivf-sq8", tune_queries=400)
    first = index.tuning.value
    index.add(similar[:50], names(50, start=8000))  # too few to measure: the record stays the build's
    assert index.tuning.note == "" and index.params["nprobe"] == first
    index.add(similar[50:], names(950, start=8050))
    assert index.params["nprobe"] >= first and index.tuning.note.startswith("checked on the rows added last")
    assert index.tuning.queries == 400 == index.tuning.sample and index.tuning.exact_query_ms is None
    # Rows spread evenly over the sphere, unlike anything the cells were trained on.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vehiclenet.retrieval.index"):
        index.add(unit(np.random.default_rng(4).standard_normal((3000, 32))), names(3000, start=9000))
    raised = index.params["nprobe"]
    assert raised > index.tuning.tried[0][0] and index.tuning.tried[0][0] >= first
    assert f"fell below 0.95 at nprobe" in caplog.text and f"searches now use nprobe {raised}" in caplog.text


def test_a_given_setting_is_measured_not_changed(caplog):
    gallery, _ = identities(8000, 32, seed=5)
    with caplog.at_level(logging.WARNING, logger="vehiclenet.retrieval.index"):
        index = GalleryIndex.build(gallery, names(8000), kind="ivf-sq8", nprobe=2, tune_queries=300)
    assert index.params["nprobe"] == 2 and index.tuning.fixed and not index.tuning.reached
    assert "omit --nprobe/--ef-search" in caplog.text
    index.add(unit(np.random.default_rng(6).standard_normal((500, 32))), names(500, start=8000))
    assert index.params["nprobe"] == 2 and index.tuning.value == 2 and index.tuning.fixed


def test_hnsw_tunes_ef_search(tmp_path):
    gallery, queries = identities(8000, 32, seed=7, queries=300)
    index = GalleryIndex.build(gallery, names(8000), kind="hnsw-sq8", tune_queries=500)
    assert index.tuning.param == "ef_search" and index.tuning.reached
    assert index.params["ef_search"] == index.tuning.value >= 11
    assert recall_at_10(index, gallery, queries) >= 0.93


def test_a_damaged_tuning_record_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Tuning.from_json({"target": 2.0, "k": 10})
    with pytest.raises(ValueError):
        Tuning.from_json({"target": 0.95, "k": 10, "param": "nprobe", "value": 0})
    with pytest.raises(UsageError, match="target recall"):
        GalleryIndex.build(unit(np.ones((3, 4))), names(3), target_recall=1.5)
    index = GalleryIndex.build(identities(2000, 16, seed=8)[0], names(2000), kind="ivf-flat", tune_queries=100)
    index._meta.tuning = {**index._meta.tuning, "recall": 7}
    out = index.save(tmp_path / "bad.index")
    with pytest.raises(DataError, match=r"bad\.index: damaged .*tuning"):
        load_index(out)


def test_cli_builds_tuned_shows_it_and_searches_with_it(tmp_path):
    gallery, queries = identities(6000, 32, seed=9, queries=30)
    save_features(tmp_path / "g.npz", gallery, names(6000))
    save_features(tmp_path / "q.npz", queries, [f"q/{i}.jpg" for i in range(30)])
    built = run_cli("index", "build", "g.npz", "--out", "g.index", "--kind", "ivf-sq8", "--tune-queries", "300",
                    "--json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    tuning = result["tuning"]
    assert tuning["param"] == "nprobe" and tuning["reached"] and tuning["queries"] == 300
    assert result["params"]["nprobe"] == tuning["value"] and tuning["recall_low"] >= 0.95

    info = run_cli("index", "info", "g.index", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["tuning"] == tuning
    text = run_cli("index", "info", "g.index", cwd=tmp_path)
    assert f"nprobe {tuning['value']}: recall@10" in text.stdout and "reaches the target 0.95" in text.stdout

    found = run_cli("search", "--index", "g.index", "--features", "q.npz", "--json", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    rows = [[m["row"] for m in r["matches"]] for r in json.loads(found.stdout)["results"]]
    assert rows == load_index(tmp_path / "g.index").search(queries, 10, nprobe=tuning["value"])[1].tolist()

    plain = run_cli("index", "build", "g.npz", "--out", "fixed.index", "--kind", "ivf-sq8", "--no-tune",
                    cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "nprobe 64" in plain.stdout and load_index(tmp_path / "fixed.index").tuning is None
    assert "not tuned" in run_cli("index", "info", "fixed.index", cwd=tmp_path).stdout

    for bad in (["--target-recall", "0"], ["--target-recall", "1.5"], ["--target-recall", "nan"],
                ["--tune-queries", "0"], ["--no-tune", "--target-recall", "0.9"]):
        res = run_cli("index", "build", "g.npz", "--out", "x.index", *bad, cwd=tmp_path)
        assert res.returncode == 2 and "error:" in res.stderr, (bad, res.stderr)
        assert not (tmp_path / "x.index").exists()


def test_hnsw_index_grows_after_a_reload_and_old_rows_keep_their_numbers(tmp_path):
    gallery, more = identities(4000, 16, seed=10, queries=400)
    index = GalleryIndex.build(gallery, names(4000), kind="hnsw-sq8", tune_queries=300)
    loaded = load_index(index.save(tmp_path / "h.index"))  # memory-mapped, then copied to grow
    loaded.add(more, names(400, start=4000))
    grown = load_index(loaded.save(tmp_path / "h.index"))
    assert grown.count == 4400 and grown.tuning.note.startswith("checked on the rows added last")
    found = grown.search(np.concatenate([gallery[:20], more[:20]]), 1)[1][:, 0]
    assert found.tolist() == list(range(20)) + list(range(4000, 4020))  # each row finds itself, by its number
