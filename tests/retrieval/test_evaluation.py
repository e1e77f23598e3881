"""Metrics on hand-worked cases, against a per-query reference loop, and the VeRi reader."""
import os

import numpy as np
import pytest

from vehiclenet.retrieval import metrics as evaluation
from vehiclenet.errors import DataError
from vehiclenet.retrieval.exact import cosine_distance, cosine_distance_blocks
from vehiclenet.retrieval.metrics import evaluate
from vehiclenet.datasets.veri import parse_veri_name, read_veri, read_veri_split


def naive(dist, qi, gi, qc, gc, ap="trapezoid", max_rank=10):
    """Straight per-query transcription of the protocol (stable sort, junk removed)."""
    num_q, num_g = dist.shape
    aps, cmc, inp, valid = [], np.zeros(max(num_g, max_rank)), 0.0, 0
    for q in range(num_q):
        order = np.argsort(dist[q], kind="stable")
        junk = ((gi == qi[q]) & (gc == qc[q])) | (gi == -1)
        order = [j for j in order if not junk[j]]
        hits = [k for k, j in enumerate(order) if gi[j] == qi[q]]
        if not hits:
            aps.append(0.0)
            continue
        valid += 1
        total = 0.0
        for i, p in enumerate(hits):
            precision = (i + 1) / (p + 1)
            old = 1.0 if p == 0 else i / p
            total += (old + precision) / 2 if ap == "trapezoid" else precision
        aps.append(total / len(hits))
        cmc[hits[0]:] += 1
        inp += len(hits) / (hits[-1] + 1)
    return float(np.mean(aps)), cmc[:max_rank] / num_q, inp / num_q, valid


def test_hand_worked_junk_and_trapezoid():
    # One query: id 1, camera 0. Gallery (index: id/cam, distance):
    #   0: 1/0 d=0.1 -> junk (same id and camera)
    #   1: 2/1 d=0.2 -> miss
    #   2: 1/1 d=0.3 -> hit
    #   3: -1/2 d=0.05 -> junk (label -1)
    #   4: 3/1 d=0.4 -> miss
    #   5: 1/2 d=0.5 -> hit
    # Ranking without junk: [1 miss, 2 hit, 4 miss, 5 hit] -> hits at positions 1 and 3.
    # Trapezoid: hit 0: old = 0/1 = 0, prec = 1/2 -> 0.25; hit 1: old = 1/3, prec = 2/4 -> 5/12.
    # AP = (0.25 + 5/12) / 2 = 1/3. Standard AP = (1/2 + 2/4) / 2 = 0.5.
    # CMC: first hit at position 1 -> rank1 0, rank2.. 1. mINP = 2 / (3 + 1) = 0.5.
    dist = np.array([[0.1, 0.2, 0.3, 0.05, 0.4, 0.5]], dtype=np.float32)
    gi, gc = np.array([1, 2, 1, -1, 3, 1]), np.array([0, 1, 1, 2, 1, 2])
    res = evaluate(dist, [1], gi, [0], gc)
    assert res.mAP == pytest.approx(1 / 3)
    assert res.cmc[0] == 0.0 and res.cmc[1] == 1.0 and res.rank(10) == 1.0
    assert res.mINP == pytest.approx(0.5)
    assert res.num_valid_query == 1
    assert evaluate(dist, [1], gi, [0], gc, ap="standard").mAP == pytest.approx(0.5)


def test_first_hit_uses_old_precision_one_and_invalid_query_counts():
    # Query A (id 1, cam 0): gallery [1/1 hit d=0.1, 2/1 miss d=0.2, 1/2 hit d=0.3]:
    #   hit 0 at position 0: old = 1 (reference rule), prec 1 -> 1; hit 1 at position 2:
    #   old = 1/2, prec = 2/3 -> 7/12. AP = (1 + 7/12) / 2 = 19/24.
    # Query B (id 9, cam 0): no gallery item has id 9 -> no valid match, adds 0.
    # mAP = (19/24 + 0) / 2 = 19/48; rank1 = 1/2; num_valid_query = 1.
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    res = evaluate(dist, [1, 9], [1, 2, 1], [0, 0], [1, 1, 2])
    assert res.mAP == pytest.approx(19 / 48)
    assert res.rank(1) == 0.5 and res.rank(5) == 0.5
    assert res.num_query == 2 and res.num_valid_query == 1
    # mINP: query A = 2 hits / (last 0-based position 2 + 1) = 2/3, divided by both queries.
    assert res.mINP == pytest.approx(1 / 3)


def test_ties_break_by_gallery_index():
    # All distances equal: the order is the gallery index. Query id 1 cam 0,
    # gallery ids [2, 1, 2, 1] cams [1, 1, 1, 1]: hits at positions 1 and 3.
    # Trapezoid AP = (0.25 + 5/12) / 2 = 1/3 (as in the first case).
    dist = np.zeros((1, 4), dtype=np.float32)
    res = evaluate(dist, [1], [2, 1, 2, 1], [0], [1, 1, 1, 1])
    assert res.mAP == pytest.approx(1 / 3)
    assert res.rank(1) == 0.0 and res.rank(2) == 1.0
    # Moving the hits to the front indices moves them up.
    res = evaluate(dist, [1], [1, 1, 2, 2], [0], [1, 1, 1, 1])
    assert res.mAP == pytest.approx(1.0)


def test_query_label_minus_one_has_no_match():
    res = evaluate(np.zeros((1, 3)), [-1], [-1, -1, 2], [0], [1, 2, 1])
    assert res.num_valid_query == 0 and res.mAP == 0.0 and res.rank(1) == 0.0


@pytest.mark.parametrize("native,fraction", [(True, 0.1), (False, 0.0), (False, 1.0)],
                         ids=["compiled", "numpy-whole-rows", "numpy-candidates"])
@pytest.mark.parametrize("ap", ["trapezoid", "standard"])
def test_matches_per_query_loop_on_random_data(monkeypatch, native, fraction, ap):
    # The compiled kernel, and numpy's two paths: fraction 0 forces the whole-row sort, 1 the
    # candidate-only one.
    assert evaluation._native_hit_positions() is not None, "the compiled kernel did not build here"
    monkeypatch.setattr(evaluation, "_SPARSE_FRACTION", fraction)
    rng = np.random.default_rng(7)
    for trial in range(25):
        nq, ng, nid = rng.integers(1, 25), rng.integers(1, 70), rng.integers(1, 7)
        qi, gi = rng.integers(-1, nid, nq), rng.integers(-1, nid, ng)
        qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
        # Odd trials: small integers, so there are many ties.
        dist = rng.integers(0, 4, (nq, ng)).astype(np.float32) if trial % 2 else rng.random((nq, ng))
        res = evaluate(dist, qi, gi, qc, gc, ap=ap, block_rows=5, native=native)
        m, cmc, inp, valid = naive(dist, qi, gi, qc, gc, ap)
        assert res.mAP == pytest.approx(m, abs=1e-12)
        np.testing.assert_allclose(res.cmc[:10], cmc, atol=1e-12)
        assert res.mINP == pytest.approx(inp, abs=1e-12)
        assert res.num_valid_query == valid


def test_to_dict_and_bad_input():
    res = evaluate(np.array([[0.0, 1.0]]), [1], [1, 2], [0], [1, 1])
    d = res.to_dict()
    assert d["mAP"] == 1.0 and d["rank1"] == 1.0 and d["num_query"] == 1 and len(d["cmc"]) == 10
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.array([[np.nan, 1.0]]), [1], [1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="g_ids"):
        evaluate(np.zeros((1, 2)), [1], [1], [0], [1, 1])


def test_cosine_distance_orders_by_similarity():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    d = cosine_distance(q, g)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(np.argsort(d[0], kind="stable"), [1, 2, 0])
    assert d[0, 1] == -1.0


def _clustered_problem(seed, nq=150, ng=700, dim=24):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))

    def make(n):
        ids = rng.integers(0, 30, n)
        f = (centres[ids] + 1.2 * rng.standard_normal((n, dim))).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), ids, rng.integers(0, 4, n)

    qf, qi, qc = make(nq)
    gf, gi, gc = make(ng)
    gi[rng.random(ng) < 0.05] = -1  # unlabelled gallery items are junk
    return qf, qi, qc, gf, gi, gc


def _same(a, b):
    return (np.array_equal(a.per_query_ap, b.per_query_ap) and np.array_equal(a.cmc, b.cmc)
            and a.mAP == b.mAP and a.mINP == b.mINP and a.num_valid_query == b.num_valid_query)


@pytest.mark.parametrize("ap", ["trapezoid", "standard"])
def test_evaluate_features_is_bit_identical_to_the_whole_matrix(ap):
    qf, qi, qc, gf, gi, gc = _clustered_problem(1)
    whole = evaluate(cosine_distance(qf, gf), qi, gi, qc, gc, ap=ap)
    assert 0.2 < whole.mAP < 0.99
    for rows, workers in [(1, 1), (7, 2), (256, 3), (1000, 2)]:
        got = evaluation.evaluate_features(qf, gf, qi, gi, qc, gc, ap=ap, block_rows=rows, workers=workers)
        assert _same(got, whole), (rows, workers)
    # And with the numpy ranking instead of the compiled kernel.
    assert _same(evaluation.evaluate_features(qf, gf, qi, gi, qc, gc, ap=ap, block_rows=64, native=False), whole)


def test_cosine_distance_blocks_are_rows_of_cosine_distance():
    qf, _, _, gf, _, _ = _clustered_problem(2, nq=300)
    whole = cosine_distance(qf, gf)
    blocks = list(cosine_distance_blocks(qf, gf, block_rows=70, workers=3))
    assert [s for s, _ in blocks] == list(range(0, 300, 70))
    assert all(b.shape[0] <= 70 and b.shape[1] == len(gf) for _, b in blocks)  # never more than a block
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), whole)


def test_evaluate_blocks_takes_blocks_in_any_order_and_checks_them():
    qf, qi, qc, gf, gi, gc = _clustered_problem(3, nq=50, ng=200)
    dist = cosine_distance(qf, gf)
    whole = evaluate(dist, qi, gi, qc, gc)
    shuffled = [(s, dist[s : s + 9]) for s in range(0, 50, 9)][::-1]
    assert _same(evaluation.evaluate_blocks(shuffled, qi, gi, qc, gc, block_rows=4), whole)
    with pytest.raises(ValueError, match="row 45 is missing"):
        evaluation.evaluate_blocks(shuffled[1:], qi, gi, qc, gc)
    with pytest.raises(ValueError, match="overlap"):
        evaluation.evaluate_blocks(shuffled + [(3, dist[3:5])], qi, gi, qc, gc)
    with pytest.raises(ValueError, match="shape"):
        evaluation.evaluate_blocks([(0, dist[:, :-1])], qi, gi, qc, gc)
    bad = dist.copy()
    bad[20, 3] = np.nan
    with pytest.raises(ValueError, match="queries 18:27 contain NaN"):
        evaluation.evaluate_blocks([(s, bad[s : s + 9]) for s in range(0, 50, 9)], qi, gi, qc, gc)


def test_parse_veri_name():
    assert parse_veri_name("0002_c002_00030600_0.jpg") == (2, 2)
    assert parse_veri_name("/x/image_test/0776_c020_00001_1.JPG") == (776, 20)
    with pytest.raises(DataError, match="cannot parse"):
        parse_veri_name("car_12.jpg")
    # Image extensions are the package's one list (fileio.IMAGE_EXTENSIONS), not the regex's own.
    assert parse_veri_name("0002_c002_00030600_0.webp") == (2, 2)
    with pytest.raises(DataError, match="cannot parse"):
        parse_veri_name("0002_c002_00030600_0.txt")


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\xff\xd8")


def test_read_veri_from_folders(tmp_path):
    for name in ("0002_c002_00030600_0.jpg", "0005_c011_1_0.jpg"):
        _touch(str(tmp_path / "image_query" / name))
    for name in ("0002_c003_1_0.jpg", "0005_c001_1_0.jpg", "0007_c020_1_0.jpg"):
        _touch(str(tmp_path / "image_test" / name))
    (tmp_path / "image_test" / "readme.txt").write_text("not an image")
    query, gallery = read_veri(str(tmp_path))
    assert [os.path.basename(p) for p in query.paths] == ["0002_c002_00030600_0.jpg", "0005_c011_1_0.jpg"]
    assert query.ids.tolist() == [2, 5] and query.cams.tolist() == [2, 11]
    assert gallery.ids.tolist() == [2, 5, 7] and gallery.cams.tolist() == [3, 1, 20]
    assert len(gallery) == 3


def test_read_veri_list_files(tmp_path):
    for name in ("0002_c002_1_0.jpg", "0009_c004_1_0.jpg"):
        _touch(str(tmp_path / "image_query" / name))
    # Full form: file id camera (labels win over the name); bare names are parsed.
    (tmp_path / "name_query.txt").write_text("0009_c004_1_0.jpg 42 7\n\n0002_c002_1_0.jpg\n")
    split = read_veri_split(str(tmp_path), "query")
    assert split.ids.tolist() == [42, 2] and split.cams.tolist() == [7, 2]
    assert split.paths[0].endswith(os.path.join("image_query", "0009_c004_1_0.jpg"))
    (tmp_path / "name_query.txt").write_text("0002_c002_1_0.jpg\nmissing_c1.jpg\n")
    with pytest.raises(DataError, match="name_query.txt, line 2"):
        read_veri_split(str(tmp_path), "query")
    (tmp_path / "name_query.txt").write_text("0003_c002_1_0.jpg\n")
    with pytest.raises(DataError, match="do not exist"):
        read_veri_split(str(tmp_path), "query")


def test_read_veri_errors(tmp_path):
    with pytest.raises(DataError, match="image_query"):
        read_veri(str(tmp_path))
    _touch(str(tmp_path / "image_query" / "bad.jpg"))
    with pytest.raises(DataError, match="bad.jpg"):
        read_veri_split(str(tmp_path), "query")
    with pytest.raises(DataError, match="not a directory"):
        read_veri(str(tmp_path / "nope"))


def test_compiled_and_numpy_rankings_are_identical_at_scale():
    # 300 x 4000 with exact ties (distances rounded to 1/64) and junk; float32 and float64.
    rng = np.random.default_rng(21)
    qi, gi = rng.integers(0, 40, 300), rng.integers(-1, 40, 4000)
    qc, gc = rng.integers(0, 5, 300), rng.integers(0, 5, 4000)
    dist = np.round(rng.random((300, 4000)) * 64) / 64
    dist[qi[:, None] == gi[None, :]] -= 0.3  # hits spread through the ranking, not all first
    for x in (dist.astype(np.float32), dist):
        a = evaluate(x, qi, gi, qc, gc)
        b = evaluate(x, qi, gi, qc, gc, native=False)
        np.testing.assert_array_equal(a.per_query_ap, b.per_query_ap)
        np.testing.assert_array_equal(a.cmc, b.cmc)
        assert a.mINP == b.mINP and 0.05 < a.mAP < 0.95
