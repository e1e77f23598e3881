"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as used for the published figures.

Same result as the reference algorithm (the seven steps in the package spec) for
k1=100, k2=15, lambda=0, but without its N x N dense matrices (N = queries +
gallery = 13,257 on VeRi-776, where the reference needs several 0.7 GB float32
and a 1.4 GB int64 array):

1. ``s = F @ F.T`` is computed in row blocks of float32 (``vehiclenet.blas.gram_rows``:
   the same bits whatever ``block_rows`` and ``workers`` are); ``D = (2 - 2s)^2`` and the
   row is divided by the column maximum of D (D is symmetric, so that is the row's
   own maximum): that row of ``d`` is exactly a row of the reference's transposed,
   column-normalised distance, in float32 like the reference;
2. each block keeps only its top k1+1 neighbours (``argpartition``, then ordered
   like a *stable* argsort of the same float32 row, i.e. equal distances by index;
   the reference uses argpartition/argsort whose tie order is unspecified);
3. R(i), R_half(i) and the expansion rule are sparse boolean matrix algebra
   (mutual-neighbour mask ``M & M.T``; intersection sizes from ``R @ R_half.T``);
4. ``V`` is a CSR matrix; its values ``exp(-d)`` are gathered from a second
   blocked pass over ``F @ F.T`` (the same float32 products as pass 1);
5. local query expansion is a sparse product (rows averaged over the top k2);
6. ``m = sum_c min(V[q, c], V[g, c])`` only over columns where both are non-zero:
   per query, the gallery non-zeros of its columns are gathered from a CSC copy
   of V and summed into a row-sized float64 accumulator (the reference's inverted
   index, vectorised; threads split the queries);
7. lambda > 0 blends in the query rows of ``d``.

Results agree with a dense transcription of the reference to ~1e-6 (float32
summation order differs).

Measured on the 2-core test machine at VeRi scale (1,678 + 11,579 synthetic 512-d
features clustered round 200 ids, k1=100, k2=15; ``benchmarks/eval_speed.py``):
6.2 s and 400 MB peak RSS for the whole process with tight clusters (noise 2.0),
12.2 s / 590 MB at noise 2.5 and 13.7 s / 550 MB at noise 3.0 (plain mAP 0.28),
136 MB of it Python + numpy + scipy + the features. The Jaccard step dominates and
grows with the number of co-occurring non-zeros of V (looser clusters, more).
Peak working memory is bounded by ``block_rows`` x N float32/int64 blocks in the
neighbour pass and by one query's co-occurring non-zeros per thread in the
Jaccard pass; the (Q, G) float32 result is 78 MB.
"""
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

import numpy as np
from scipy import sparse

from .blas import gram_rows, one_blas_thread

__all__ = ["re_rank"]


def _check_features(name: str, feats: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(feats, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, dim), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _row_distance(feats: np.ndarray, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows start:stop of the normalised distance d, and the normalising maxima."""
    dist = gram_rows(feats, feats, start, stop)  # float32 s, the same bits for any block
    np.multiply(dist, -2.0, out=dist)
    np.add(dist, 2.0, out=dist)  # 2 - 2s, float32 as in the reference
    np.multiply(dist, dist, out=dist)
    col_max = dist.max(axis=1)
    np.divide(dist, col_max[:, None], out=dist)
    return dist, col_max


def _top_neighbours(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries per row, ordered like a stable argsort."""
    n = dist.shape[1]
    if k >= n:
        return np.argsort(dist, axis=1, kind="stable")[:, :k]
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # index order, so the stable sort below breaks ties by index
    vals = np.take_along_axis(dist, part, axis=1)
    top = np.take_along_axis(part, np.argsort(vals, axis=1, kind="stable"), axis=1)
    # argpartition picks arbitrary members of a tie at the k-th value; redo such rows.
    kth = vals.max(axis=1)
    n_eq_row = np.count_nonzero(dist == kth[:, None], axis=1)
    n_eq_top = np.count_nonzero(vals == kth[:, None], axis=1)
    for r in np.flatnonzero(n_eq_row > n_eq_top):
        top[r] = np.argsort(dist[r], kind="stable")[:k]
    return top


def _neighbour_matrix(top: np.ndarray, n: int) -> sparse.csr_matrix:
    rows, k = top.shape
    indptr = np.arange(0, rows * k + 1, k, dtype=np.int64)
    data = np.ones(rows * k, dtype=np.int32)
    return sparse.csr_matrix((data, top.ravel().astype(np.int32), indptr), shape=(rows, n))


def _reciprocal(top: np.ndarray, n: int) -> sparse.csr_matrix:
    """R[i, j] = 1 iff j is among i's neighbours and i among j's (k-reciprocal set)."""
    m = _neighbour_matrix(top, n)
    r = m.multiply(m.T).tocsr()
    r.sort_indices()
    return r


def _expanded_sets(top: np.ndarray, k1: int) -> sparse.csr_matrix:
    """Binary CSR of the expanded k-reciprocal sets (steps 2 and 3)."""
    n = top.shape[0]
    k_half = int(np.around(k1 / 2.0))
    r = _reciprocal(top[:, : k1 + 1], n)
    r_half = _reciprocal(top[:, : k_half + 1], n)
    half_size = np.diff(r_half.indptr)
    # |R_half(j) & R(i)| for every j in R(i); zero overlaps can never qualify.
    overlap = (r @ r_half.T).multiply(r).tocoo()
    keep = overlap.data > (2.0 / 3.0) * half_size[overlap.col]
    cond = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (overlap.row[keep], overlap.col[keep])), shape=(n, n)
    )
    expanded = (r + cond @ r_half).tocsr()
    expanded.sum_duplicates()
    expanded.sort_indices()
    expanded.data[:] = 1
    return expanded


def _weights(
    feats: np.ndarray, pattern: sparse.csr_matrix, col_max: np.ndarray, block_rows: int, workers: int
) -> sparse.csr_matrix:
    """V: exp(-d[i, j]) over each expanded set, normalised to sum 1 per row (float32)."""
    n = feats.shape[0]
    data = np.empty(pattern.nnz, dtype=np.float32)
    indptr, indices = pattern.indptr, pattern.indices

    def gather(start: int) -> None:
        stop = min(start + block_rows, n)
        dist, _ = _row_distance(feats, start, stop)
        lo, hi = indptr[start], indptr[stop]
        local_rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
        data[lo:hi] = dist[local_rows, indices[lo:hi]]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(gather, range(0, n, block_rows)))
    np.negative(data, out=data)
    np.exp(data, out=data)
    sizes = np.diff(indptr)
    nonempty = sizes > 0  # an empty set leaves its row of V zero, as in the reference
    sums = np.ones(n, dtype=np.float32)
    if data.size:
        sums[nonempty] = np.add.reduceat(data, indptr[:-1][nonempty])
    data /= np.repeat(sums, sizes)
    return sparse.csr_matrix((data, indices.copy(), indptr.copy()), shape=(n, n))


def _query_expansion(v: sparse.csr_matrix, top: np.ndarray, k2: int) -> sparse.csr_matrix:
    n = v.shape[0]
    a = _neighbour_matrix(np.ascontiguousarray(top[:, :k2]), n).astype(np.float32)
    v_qe = (a @ v).tocsr()
    v_qe.data /= np.float32(k2)  # mean over the k2 rows
    v_qe.sort_indices()
    return v_qe


def _jaccard_rows(vq: sparse.csr_matrix, vg: sparse.csc_matrix, lo: int, hi: int, out: np.ndarray) -> None:
    """numpy formulation of ``VnJaccardRows`` (csrc/retrieval_kernels.c), for where it cannot be built."""
    g_ptr = vg.indptr.astype(np.int64)
    g_count = np.diff(g_ptr)
    num_gallery = out.shape[1]
    for q in range(lo, hi):
        a0, a1 = vq.indptr[q], vq.indptr[q + 1]
        cols = vq.indices[a0:a1]
        counts = g_count[cols]
        total = int(counts.sum())
        if total == 0:
            out[q] = 1.0
            continue
        # Gallery non-zeros of the query's columns, as one index array over vg's storage.
        idx = np.arange(total, dtype=np.int64)
        idx += np.repeat(g_ptr[cols] - (np.cumsum(counts) - counts), counts)
        mins = np.minimum(np.repeat(vq.data[a0:a1], counts), vg.data[idx])
        # A row-sized accumulator stays in cache, unlike one over a block of rows.
        m = np.bincount(vg.indices[idx], weights=mins, minlength=num_gallery).astype(np.float32)
        out[q] = 1.0 - m / (np.float32(2.0) - m)


@functools.lru_cache(maxsize=None)
def _native_jaccard() -> Optional[Callable]:
    """``VnJaccardRows`` from csrc/retrieval_kernels.c, or None where it cannot be built."""
    from .native import retrieval_kernels

    library = retrieval_kernels()
    if library is None:
        return None
    func = library.VnJaccardRows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    func.argtypes = [p, p, p, p, p, p, i64, i64, i64, p]
    func.restype = ctypes.c_int
    return func


def _native_rows(func: Callable, arrays: Tuple[np.ndarray, ...], num_gallery: int, lo: int, hi: int,
                 out: np.ndarray) -> None:
    # ctypes releases the GIL, so threads calling this run in parallel.
    if func(*(a.ctypes.data for a in arrays), num_gallery, lo, hi, out.ctypes.data) != 0:
        raise MemoryError(f"re-ranking: no memory for a {num_gallery}-entry accumulator")


def _jaccard(v: sparse.csr_matrix, num_query: int, workers: int, native: bool = True) -> np.ndarray:
    """1 - m / (2 - m) for query rows x gallery rows, m = sum_c min(V[q, c], V[g, c]).

    Work is one (query, column, gallery) triple per pair of co-occurring non-zeros,
    the same as the reference's inverted index; threads split the queries (the C loop
    and numpy both release the GIL). ``native=False`` forces the numpy formulation.
    """
    n = v.shape[0]
    vq = v[:num_query].tocsr()
    vq.sort_indices()
    vg = v[num_query:].tocsc()
    vg.sort_indices()
    out = np.empty((num_query, n - num_query), dtype=np.float32)
    func = _native_jaccard() if native else None
    if func is not None:
        # The C signature's types; scipy would narrow int64 index arrays back to int32.
        arrays = tuple(np.ascontiguousarray(x, dtype=t) for m in (vq, vg)
                       for x, t in ((m.indptr, np.int64), (m.indices, np.int32), (m.data, np.float32)))

        def rows(lo: int, hi: int) -> None:
            _native_rows(func, arrays, out.shape[1], lo, hi, out)
    else:

        def rows(lo: int, hi: int) -> None:
            _jaccard_rows(vq, vg, lo, hi, out)

    chunk = 64
    if workers <= 1 or num_query <= chunk:
        rows(0, num_query)
        return out
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(rows, s, min(s + chunk, num_query)) for s in range(0, num_query, chunk)]
        for fut in futures:
            fut.result()
    return out


def re_rank(
    q_feats: np.ndarray,
    g_feats: np.ndarray,
    k1: int = 100,
    k2: int = 15,
    lambda_value: float = 0.0,
    *,
    block_rows: int = 512,
    workers: Optional[int] = None,
) -> np.ndarray:
    """k-reciprocal re-ranked distance (num_query, num_gallery) float32; lower is closer.

    ``q_feats`` and ``g_feats`` are L2-normalised float32 features. Defaults are the
    published protocol (k1=100, k2=15, lambda=0: pure Jaccard distance). Needs
    ``1 <= k1 < N`` and ``1 <= k2 <= k1 + 1`` with N = queries + gallery, as the
    reference does.
    """
    q = _check_features("q_feats", q_feats)
    g = _check_features("g_feats", g_feats)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dimensions differ: {q.shape[1]} vs {g.shape[1]}")
    num_query = q.shape[0]
    feats = np.concatenate([q, g], axis=0)
    n = feats.shape[0]
    if not 1 <= k1 < n:
        raise ValueError(f"k1={k1} needs 1 <= k1 < N = {n} (queries + gallery)")
    if not 1 <= k2 <= k1 + 1:
        raise ValueError(f"k2={k2} needs 1 <= k2 <= k1 + 1 = {k1 + 1}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value} must lie in [0, 1]")

    top = np.empty((n, k1 + 1), dtype=np.int32)
    col_max = np.empty(n, dtype=np.float32)
    original: Optional[np.ndarray] = None
    if lambda_value != 0.0:
        original = np.empty((num_query, n - num_query), dtype=np.float32)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)

    def neighbours(start: int) -> None:
        stop = min(start + block_rows, n)
        dist, col_max[start:stop] = _row_distance(feats, start, stop)
        top[start:stop] = _top_neighbours(dist, k1 + 1)
        if original is not None and start < num_query:
            qs = min(stop, num_query)
            original[start:qs] = dist[: qs - start, num_query:]

    # Row blocks are independent; BLAS, argpartition and the element-wise passes release
    # the GIL, so a thread per core overlaps them (at most `workers` blocks alive at once).
    with one_blas_thread():
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(neighbours, range(0, n, block_rows)))
        pattern = _expanded_sets(top, k1)
        v = _weights(feats, pattern, col_max, block_rows, workers)
    del pattern
    if k2 != 1:
        v = _query_expansion(v, top, k2)
    final = _jaccard(v, num_query, workers)
    if original is not None:
        final *= np.float32(1.0 - lambda_value)
        final += original * np.float32(lambda_value)
    return final
