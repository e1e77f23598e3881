"""Retrieval results do not depend on how the work is cut, under every BLAS kernel
(whole matrices and the bounded-memory row-block paths alike).

Each case runs in a fresh interpreter with ``OPENBLAS_CORETYPE`` set (OpenBLAS reads it
when it is loaded; it steers numpy's and scipy's bundled OpenBLAS alike), and checks
there that the kernel asked for is the one that ran.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vehiclenet.retrieval.blas import gram_rows, matmul_nt, one_blas_thread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The kernel each OPENBLAS_CORETYPE selects needs these CPU features to run at all.
CORETYPES = {None: set(), "Prescott": {"pni"}, "Haswell": {"avx2", "fma"}, "SkylakeX": {"avx512f", "avx512bw"}}
# scipy's OpenBLAS (0.3.30) names its SSE fallback Katmai when asked for Prescott.
KERNEL_NAMES = {"Prescott": {"Prescott", "Katmai"}}

CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    from vehiclenet.retrieval.blas import evaluation_blas, matmul_nt
    from vehiclenet.retrieval.blocks import collect
    from vehiclenet.retrieval.exact import cosine_distance, nearest
    from vehiclenet.retrieval.metrics import evaluate, evaluate_features
    from vehiclenet.retrieval.rerank import re_rank, re_rank_blocks

    rng = np.random.default_rng(11)
    centres = rng.standard_normal((12, 512)).astype(np.float32)

    def clustered(n):
        ids = rng.integers(0, 12, n)
        f = centres[ids] + 4.0 * rng.standard_normal((n, 512)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), ids, rng.integers(0, 4, n)

    qf, qi, qc = clustered(150)
    gf, gi, gc = clustered(400)
    ref = re_rank(qf, gf, 30, 6, block_rows=7, workers=1)
    same = {}
    for rows, workers in [(1000, 3), (128, 2), (300, 2), (61, 4)]:
        same[f"re_rank block_rows={rows} workers={workers}"] = bool(
            np.array_equal(ref, re_rank(qf, gf, 30, 6, block_rows=rows, workers=workers)))
    dist = cosine_distance(qf, gf)
    for workers in (2, 5):
        same[f"matmul_nt workers={workers}"] = bool(np.array_equal(-dist, matmul_nt(qf, gf, workers=workers)))
    base = evaluate(ref, qi, gi, qc, gc, block_rows=7)
    for rows in (1, 64, 1000):
        other = evaluate(ref, qi, gi, qc, gc, block_rows=rows)
        same[f"evaluate block_rows={rows}"] = bool(
            np.array_equal(base.per_query_ap, other.per_query_ap) and np.array_equal(base.cmc, other.cmc))
    for rows, workers in [(256, 2), (45, 3)]:
        same[f"re_rank_blocks block_rows={rows} workers={workers}"] = bool(np.array_equal(
            ref, collect(re_rank_blocks(qf, gf, 30, 6, block_rows=rows, workers=workers), ref.shape)))
    plain = evaluate(dist, qi, gi, qc, gc)
    for rows in (1, 300):
        other = evaluate_features(qf, gf, qi, gi, qc, gc, block_rows=rows, workers=2)
        same[f"evaluate_features block_rows={rows}"] = bool(
            np.array_equal(plain.per_query_ap, other.per_query_ap) and np.array_equal(plain.cmc, other.cmc))
    order, d = nearest(qf[0], gf, k=20)
    order2, d2 = nearest(qf[0], gf, k=400)
    same["nearest k=20 vs k=400"] = bool(np.array_equal(order, order2[:20]) and np.array_equal(d, d2[:20]))
    print(json.dumps({
        "same": same,
        "kernel": evaluation_blas().get("architecture"),
        "max_err_vs_numpy": float(np.abs(-dist - qf @ gf.T).max()),
        "mAP": base.mAP,
    }))
    """
)


@pytest.mark.parametrize("coretype", list(CORETYPES), ids=lambda c: c or "unset")
def test_results_independent_of_blocks_and_workers_under_each_kernel(coretype):
    missing = CORETYPES[coretype] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}, which OpenBLAS's {coretype} kernel needs")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"] and all(got["same"].values()), got["same"]
    if coretype:
        assert got["kernel"] in KERNEL_NAMES.get(coretype, {coretype}), f"asked for {coretype}, scipy's OpenBLAS ran {got['kernel']}"
    assert got["max_err_vs_numpy"] < 1e-5
    assert 0.3 < got["mAP"] < 0.99  # a real ranking, neither random nor trivial


def test_gram_rows_any_range_equals_whole_product():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((333, 512)).astype(np.float32)
    b = rng.standard_normal((257, 512)).astype(np.float32)
    whole = matmul_nt(a, b, workers=1)
    with one_blas_thread():
        for start, stop in [(0, 333), (7, 8), (5, 200), (127, 129), (256, 333), (300, 1000)]:
            np.testing.assert_array_equal(gram_rows(a, b, start, stop), whole[start:min(stop, 333)])
    np.testing.assert_allclose(whole, a @ b.T, atol=2e-4, rtol=1e-5)


def test_one_blas_thread_restores_limits():
    from threadpoolctl import threadpool_info

    def threads():
        return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")

    before = threads()
    with one_blas_thread():
        assert all(n == 1 for _, n in threads())
        with one_blas_thread():
            pass
        assert all(n == 1 for _, n in threads())  # an inner exit does not lift the outer limit
    assert threads() == before


def test_matmul_nt_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dimension 4 vs 3"):
        matmul_nt(np.zeros((2, 4)), np.zeros((2, 3)))
