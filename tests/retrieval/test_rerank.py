"""Re-ranking against a direct, unoptimised transcription of the seven published steps."""
import numpy as np
import pytest

from vehiclenet.retrieval.metrics import evaluate, evaluate_blocks
from vehiclenet.retrieval.rerank import neighbour_counts, re_rank


def direct_rerank(qf, gf, k1, k2, lam):
    """Dense transcription of the spec's seven steps; float32 like re_rank, stable argsort."""
    feats = np.concatenate([qf, gf]).astype(np.float32)
    nq, n = len(qf), len(feats)
    s = feats @ feats.T
    dist = np.power(2.0 - 2 * s, 2).astype(np.float32)                       # step 1
    dist = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):                                                      # step 2
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    v = np.zeros_like(dist)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = r
        for j in r:                                                            # step 3
            r_half = reciprocal(j, int(np.around(k1 / 2)))
            if len(np.intersect1d(r_half, r)) > 2.0 / 3 * len(r_half):
                expanded = np.append(expanded, r_half)
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])                                    # step 4
        v[i, expanded] = weight / np.sum(weight)
    if k2 != 1:                                                                # step 5
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):                                                        # step 6
        m = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - m / (2.0 - m)
    final = jaccard * (1 - lam) + dist[:nq] * lam                             # step 7
    return final[:, nq:]


def clustered(rng, n, num_ids=8, dim=16, noise=0.8):
    ids = rng.integers(0, num_ids, n)
    centres = np.random.default_rng(99).standard_normal((num_ids, dim))
    f = (centres[ids] + noise * rng.standard_normal((n, dim))).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True), ids


@pytest.mark.parametrize(
    "nq,ng,k1,k2,lam",
    [(20, 60, 20, 6, 0.0), (30, 150, 20, 6, 0.3), (7, 50, 5, 1, 0.0), (12, 40, 7, 8, 1.0)],
)
def test_matches_direct_transcription(nq, ng, k1, k2, lam):
    rng = np.random.default_rng(nq * 1000 + ng)
    qf, qi = clustered(rng, nq)
    gf, gi = clustered(rng, ng)
    got = re_rank(qf, gf, k1, k2, lam, block_rows=17, workers=2)
    want = direct_rerank(qf, gf, k1, k2, lam)
    assert got.dtype == np.float32 and got.shape == (nq, ng)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The re-ranking actually changed something (not a trivial all-ones matrix).
    assert got.min() < 0.9
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    a = evaluate(got, qi, gi, qc, gc)
    b = evaluate(want, qi, gi, qc, gc)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-9) and np.array_equal(a.cmc, b.cmc)


def test_published_defaults_on_300_items():
    rng = np.random.default_rng(3)
    qf, _ = clustered(rng, 40, num_ids=6, dim=32)
    gf, _ = clustered(rng, 260, num_ids=6, dim=32)
    got = re_rank(qf, gf)  # k1=100, k2=15, lambda=0
    np.testing.assert_allclose(got, direct_rerank(qf, gf, 100, 15, 0.0), atol=1e-5, rtol=0)


def test_exact_ties_follow_stable_order():
    # Features in {0, +-0.5} with four non-zeros: unit norm and exact dot products,
    # so many distances tie exactly and the neighbour sets depend on the tie rule.
    rng = np.random.default_rng(5)

    def quantised(n):
        f = np.zeros((n, 8), dtype=np.float32)
        for row in f:
            row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return f

    qf, gf = quantised(15), quantised(80)
    gf[10] = gf[3]  # an exact duplicate
    got = re_rank(qf, gf, 20, 6, 0.2, block_rows=13, workers=1)
    np.testing.assert_allclose(got, direct_rerank(qf, gf, 20, 6, 0.2), atol=1e-5, rtol=0)


def test_block_and_thread_settings_do_not_change_result():
    rng = np.random.default_rng(11)
    qf, _ = clustered(rng, 70)
    gf, _ = clustered(rng, 90)
    a = re_rank(qf, gf, 20, 6, block_rows=7, workers=1)
    b = re_rank(qf, gf, 20, 6, block_rows=1000, workers=3)
    np.testing.assert_array_equal(a, b)


def test_parameter_checks():
    f = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="k1"):
        re_rank(f[:2], f[2:], k1=0)
    with pytest.raises(ValueError, match="k2"):
        re_rank(f[:2], f[2:], k1=2, k2=4)
    with pytest.raises(ValueError, match="NaN"):
        re_rank(np.full((1, 4), np.nan, np.float32), f, k1=2, k2=2)


def test_the_published_k1_on_a_small_set_is_lowered_to_the_data_and_said(caplog):
    """docs/python-api.md's re_rank(q, g) on fewer than 101 images: k1 becomes N - 1 (every item a
    neighbour), k2 at most N, with a warning; the result is re-ranking with those values."""
    rng = np.random.default_rng(5)
    qf, _ = clustered(rng, 12)
    gf, _ = clustered(rng, 30)
    with caplog.at_level("WARNING", logger="vehiclenet.retrieval.rerank"):
        got = re_rank(qf, gf)  # k1=100, k2=15
    assert "re-ranking 42 items: k1=100 is not below their number, so k1=41, k2=15 are used" in caplog.text
    np.testing.assert_array_equal(got, re_rank(qf, gf, 41, 15))
    assert neighbour_counts(100, 60, 42) == (41, 42) and neighbour_counts(20, 6, 42) == (20, 6)


def test_compiled_and_numpy_jaccard_are_bit_identical():
    from scipy import sparse

    from vehiclenet.retrieval import rerank

    assert rerank._native_jaccard() is not None, "the C Jaccard kernel did not build here"
    rng = np.random.default_rng(8)
    v = sparse.random(300, 300, density=0.08, format="csr", dtype=np.float32, random_state=rng)
    v.data[rng.random(v.nnz) < 0.3] = np.float32(0.25)  # exact ties between query and gallery values
    v = v.tolil()
    v[5, :] = 0  # a query with no non-zeros, and one sharing no column with the gallery
    v[6, :] = 0
    v[:, 299] = 0
    v[6, 299] = 0.5
    v = v.tocsr()
    for num_query, workers in [(70, 1), (130, 3)]:
        native = rerank._jaccard(v, num_query, workers)
        plain = rerank._jaccard(v, num_query, workers, native=False)
        np.testing.assert_array_equal(native, plain)
        assert native[5].tolist() == [1.0] * (300 - num_query) and native[6].min() == 1.0
        assert native.min() < 0.95


def test_without_a_c_compiler_the_numpy_path_gives_the_same_result(monkeypatch, caplog):
    import logging

    from vehiclenet import native
    from vehiclenet.retrieval import rerank

    rng = np.random.default_rng(12)
    qf, _ = clustered(rng, 30)
    gf, _ = clustered(rng, 90)
    with_c = re_rank(qf, gf, 20, 6)
    monkeypatch.setenv("CC", "no-such-cc")
    native.retrieval_kernels.cache_clear()
    rerank._native_jaccard.cache_clear()
    rerank._native_neighbour_kernels.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="vehiclenet.native"):
            assert rerank._native_jaccard() is None and rerank._native_neighbour_kernels() is None
            np.testing.assert_array_equal(re_rank(qf, gf, 20, 6), with_c)
        assert "no C compiler 'no-such-cc'" in caplog.text
    finally:
        native.retrieval_kernels.cache_clear()
        rerank._native_jaccard.cache_clear()
        rerank._native_neighbour_kernels.cache_clear()


# --------------------------------------------------------------------------- bounded memory


def _some_problem(seed, nq=60, ng=240, dim=16, num_ids=12):
    rng = np.random.default_rng(seed)
    qf, qi = clustered(rng, nq, num_ids=num_ids, dim=dim)
    gf, gi = clustered(rng, ng, num_ids=num_ids, dim=dim)
    return qf, qi, rng.integers(0, 3, nq), gf, gi, rng.integers(0, 3, ng)


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.0), (30, 1, 0.0), (15, 8, 0.4)])
def test_blocks_are_bit_identical_to_re_rank_for_any_cut(k1, k2, lam):
    from vehiclenet.retrieval.blocks import collect
    from vehiclenet.retrieval.rerank import re_rank_blocks

    qf, qi, qc, gf, gi, gc = _some_problem(k1 + k2)
    whole = re_rank(qf, gf, k1, k2, lam)
    assert whole.min() < 0.9
    for rows, workers in [(7, 1), (32, 2), (61, 3), (1000, 2)]:
        blocks = list(re_rank_blocks(qf, gf, k1, k2, lam, block_rows=rows, workers=workers))
        assert [s for s, _ in blocks] == list(range(0, len(qf), rows))
        assert all(b.shape[0] <= rows and b.shape[1] == len(gf) and b.dtype == np.float32 for _, b in blocks)
        np.testing.assert_array_equal(collect(blocks, whole.shape), whole)
        streamed = evaluate_blocks(iter(blocks), qi, gi, qc, gc)
        full = evaluate(whole, qi, gi, qc, gc)
        np.testing.assert_array_equal(streamed.per_query_ap, full.per_query_ap)
        assert streamed.mAP == full.mAP and streamed.mINP == full.mINP and np.array_equal(streamed.cmc, full.cmc)


def test_an_exact_neighbour_source_gives_identical_results():
    from vehiclenet.retrieval import rerank

    qf, _, _, gf, _, _ = _some_problem(21)
    calls = []

    def dense_stable_argsort(feats, k):  # the whole N x N at once, numpy's sort: another route to the lists
        calls.append(k)
        dist, _ = rerank._row_distance(feats, 0, len(feats), native=False)
        return np.argsort(dist, axis=1, kind="stable")[:, :k]

    want = re_rank(qf, gf, 25, 6, 0.2)
    np.testing.assert_array_equal(re_rank(qf, gf, 25, 6, 0.2, neighbours=dense_stable_argsort), want)
    assert calls == [26]


def test_faiss_exact_index_as_the_neighbour_source():
    import faiss

    from vehiclenet.retrieval.rerank import exact_neighbours

    def flat_index(feats, k):  # what a gallery index's search(feats, k) gives: indices by ascending L2
        index = faiss.IndexFlatL2(feats.shape[1])
        index.add(feats)
        return index.search(feats, k)[1]

    qf, _, _, gf, _, _ = _some_problem(22, dim=32)
    feats = np.concatenate([qf, gf])
    # Continuous features: no near-ties, so faiss's own rounding picks the same lists.
    np.testing.assert_array_equal(flat_index(feats, 31), exact_neighbours(feats, 31))
    np.testing.assert_array_equal(re_rank(qf, gf, 30, 6, neighbours=flat_index), re_rank(qf, gf, 30, 6))

    def approximate(feats, k):  # an approximate source: the exact lists with the k-th neighbour swapped
        top = flat_index(feats, k + 1)
        return np.concatenate([top[:, : k - 1], top[:, k:]], axis=1)

    approx = re_rank(qf, gf, 30, 6, neighbours=approximate)
    exact = re_rank(qf, gf, 30, 6)
    assert not np.array_equal(approx, exact) and np.abs(approx - exact).max() < 0.2


@pytest.mark.parametrize("bad,message", [
    (lambda f, k: np.zeros((len(f), k - 1), dtype=np.int64), "shape"),
    (lambda f, k: np.full((len(f), k), -1), "outside"),
    (lambda f, k: np.tile(np.arange(k), (len(f), 1)).astype(np.float32), "integer"),
    (lambda f, k: np.tile(np.r_[0, np.arange(k - 1)], (len(f), 1)), "repeats"),
])
def test_a_bad_neighbour_source_is_named(bad, message):
    qf, _, _, gf, _, _ = _some_problem(23, nq=5, ng=30)
    with pytest.raises(ValueError, match=f"neighbours.*{message}|{message}.*neighbours"):
        re_rank(qf, gf, 10, 4, neighbours=bad)


def test_bounded_path_never_holds_a_query_x_gallery_or_n_x_n_matrix():
    import tracemalloc

    from vehiclenet.retrieval.rerank import re_rank_blocks

    rng = np.random.default_rng(4)
    qf, qi = clustered(rng, 1500, num_ids=150, dim=32)
    gf, gi = clustered(rng, 4500, num_ids=150, dim=32)
    qc, gc = rng.integers(0, 5, 1500), rng.integers(0, 5, 4500)
    whole_qg = 1500 * 4500 * 4  # 27 MB of float32; N x N would be 144 MB
    re_rank(qf[:50], gf[:200], 20, 6)  # builds and loads the C kernels outside the measurement

    def peak(run):
        tracemalloc.start()
        try:
            result = run()
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    bounded, bounded_peak = peak(lambda: evaluate_blocks(
        re_rank_blocks(qf, gf, 20, 6, block_rows=256, workers=2), qi, gi, qc, gc, workers=2))
    full, full_peak = peak(lambda: evaluate(re_rank(qf, gf, 20, 6, block_rows=256, workers=2), qi, gi, qc, gc))
    assert np.array_equal(bounded.per_query_ap, full.per_query_ap)
    assert full_peak > whole_qg  # the measurement sees a whole matrix when there is one
    assert bounded_peak < 0.75 * whole_qg, (bounded_peak, full_peak)


def test_compiled_and_numpy_neighbour_passes_are_bit_identical():
    from vehiclenet.retrieval import rerank
    from vehiclenet.retrieval.blas import one_blas_thread

    assert rerank._native_neighbour_kernels() is not None, "the C kernels did not build here"
    rng = np.random.default_rng(9)
    f = np.zeros((300, 8), dtype=np.float32)  # {0, +-0.5} features: exact products, many exact ties
    for row in f:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    f[17] = f[3]
    g, _ = clustered(rng, 300, dim=16)
    for feats, ties in ((f, True), (g, False)):
        with one_blas_thread():
            d_c, m_c = rerank._row_distance(feats, 0, 300)
            d_n, m_n = rerank._row_distance(feats, 0, 300, native=False)
        np.testing.assert_array_equal(d_c, d_n)
        np.testing.assert_array_equal(m_c, m_n)
        for k in (1, 21, 299, 300):
            np.testing.assert_array_equal(rerank._top_neighbours(d_c, k), rerank._top_neighbours(d_n, k, native=False))
        distinct = np.mean([np.unique(row).size for row in d_c])
        assert (distinct < 30) == ties  # the quantised rows had ties to break, the others none


def test_gallery_rows_built_as_csc_by_blocks_equal_scipy_tocsc():
    from scipy import sparse

    from vehiclenet.retrieval import rerank

    v = sparse.random(500, 400, density=0.05, format="csr", dtype=np.float32, random_state=1)
    for rows in (1, 37, 4096):
        got = rerank._gallery_csc(lambda s, e: v[s:e], 120, 500, 400, block_rows=rows)
        want = v[120:].tocsc()
        want.sort_indices()
        for attr in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(got, attr), getattr(want, attr))


def test_gallery_index_as_the_neighbour_source():
    """vehiclenet.retrieval.index.index_neighbours: the exact kind gives today's re-ranking bit for bit;
    an ivf kind gives approximate re-ranking, close in its figures."""
    from vehiclenet.retrieval.index import index_neighbours

    qf, qi, qc, gf, gi, gc = _some_problem(24, nq=60, ng=900, dim=32)
    exact = re_rank(qf, gf, 20, 6)
    np.testing.assert_array_equal(re_rank(qf, gf, 20, 6, neighbours=index_neighbours("exact")), exact)
    approx = re_rank(qf, gf, 20, 6, neighbours=index_neighbours("ivf-sq8", nlist=24, nprobe=3))
    assert approx.shape == exact.shape and not np.array_equal(approx, exact)  # really approximate
    assert abs(evaluate(approx, qi, gi, qc, gc).mAP - evaluate(exact, qi, gi, qc, gc).mAP) < 0.05
    with pytest.raises(ValueError, match="found fewer than 21 neighbours .* search more cells"):
        re_rank(qf, gf, 20, 6, neighbours=index_neighbours("ivf-sq8", nlist=24, nprobe=1))
    with pytest.raises(Exception, match="neighbour index kind 'auto'"):
        index_neighbours("auto")
