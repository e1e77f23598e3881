"""Re-ranking against a direct, unoptimised transcription of the seven published steps."""
import numpy as np
import pytest

from vehiclenet.evaluation import evaluate
from vehiclenet.rerank import re_rank


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
        re_rank(f[:2], f[2:], k1=4)
    with pytest.raises(ValueError, match="k2"):
        re_rank(f[:2], f[2:], k1=2, k2=4)
    with pytest.raises(ValueError, match="NaN"):
        re_rank(np.full((1, 4), np.nan, np.float32), f, k1=2, k2=2)


def test_compiled_and_numpy_jaccard_are_bit_identical():
    from scipy import sparse

    from vehiclenet import rerank

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

    from vehiclenet import native, rerank

    rng = np.random.default_rng(12)
    qf, _ = clustered(rng, 30)
    gf, _ = clustered(rng, 90)
    with_c = re_rank(qf, gf, 20, 6)
    monkeypatch.setenv("CC", "no-such-cc")
    native.retrieval_kernels.cache_clear()
    rerank._native_jaccard.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="vehiclenet.native"):
            assert rerank._native_jaccard() is None
            np.testing.assert_array_equal(re_rank(qf, gf, 20, 6), with_c)
        assert "no C compiler 'no-such-cc'" in caplog.text
    finally:
        native.retrieval_kernels.cache_clear()
        rerank._native_jaccard.cache_clear()
