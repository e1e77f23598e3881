"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as used for the published figures.

Same result as the reference algorithm (the seven steps in the package spec) for
k1=100, k2=15, lambda=0, without its N x N dense matrices (N = queries + gallery =
13,257 on VeRi-776, where the reference needs several 0.7 GB float32 and a 1.4 GB
int64 array; 138,517 on VERI-Wild's large test split, 77 GB per float32 matrix):

1. ``s = F @ F.T`` is computed in row blocks of float32 (``vehiclenet.retrieval.blas.gram_rows``:
   the same bits whatever ``block_rows`` and ``workers`` are); ``D = (2 - 2s)^2`` and the
   row is divided by the column maximum of D (D is symmetric, so that is the row's
   own maximum): that row of ``d`` is exactly a row of the reference's transposed,
   column-normalised distance, in float32 like the reference;
2. each block keeps only its top k1+1 neighbours, ordered like a *stable* argsort of the
   same float32 row, i.e. equal distances by index (the reference uses argpartition/argsort,
   whose tie order is unspecified). The lists come from a pluggable :data:`NeighbourSource`
   (default :func:`exact_neighbours`; a gallery index's search fits);
3. R(i), R_half(i) and the expansion rule are sparse boolean matrix algebra
   (mutual-neighbour mask ``M & M.T``; intersection sizes from ``R @ R_half.T``, by row blocks);
4. ``V`` is a CSR matrix; its values ``exp(-d)`` are gathered from a second blocked pass
   over whole rows of ``F @ F.T`` (the same float32 products and row maxima as pass 1);
5. local query expansion is a sparse product (rows averaged over the top k2), computed
   by row blocks straight into the query rows (CSR) and gallery rows (CSC) step 6 reads;
6. ``m = sum_c min(V[q, c], V[g, c])`` only over columns where both are non-zero:
   per query, the gallery non-zeros of its columns are gathered from the CSC rows
   and summed into a row-sized float64 accumulator (the reference's inverted
   index, vectorised; threads split the queries), a block of queries at a time;
7. lambda > 0 blends in the query rows of ``d``, recomputed for each block of queries.

:func:`re_rank_blocks` yields the result a block of queries at a time (for
:func:`vehiclenet.retrieval.metrics.evaluate_blocks`, which ranks and drops each), :func:`re_rank`
collects the blocks into the (Q, G) matrix: the same bits either way, for any
``block_rows`` and ``workers``. The hot loops of steps 1, 2 and 6 are C
(csrc/retrieval_kernels.c) with numpy formulations giving the same bits where no C
compiler is found.

Results agree with a dense transcription of the reference to ~1e-6 (float32
summation order differs).

Memory: the features (twice: the caller's and the stacked copy), ``workers`` blocks of
``block_rows`` x N float32 in the two blocked passes, the neighbour lists (N x (k1+1)
int32), V (about 95 non-zeros per row at k1=100) and the query-expanded V's query and
gallery rows (float32 + int32 per non-zero, ~1,340 per row on clustered synthetic
features at k1=100, k2=15), and one (block_rows, G) output block: O(N * k1 * k2), never
N x N or Q x G.

The two blocked O(N^2 d) passes (neighbours, weights) are most of the time; the measured time
and memory at VeRi and VERI-Wild scale are in docs/benchmarks.md (``benchmarks/eval_speed.py``).
"""
import ctypes
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
from scipy import sparse

from .blas import TILE_ROWS, gram_rows, one_blas_thread
from .blocks import collect

__all__ = ["re_rank", "re_rank_blocks", "exact_neighbours", "neighbour_counts", "NeighbourSource"]

LOG = logging.getLogger(__name__)

#: ``neighbours(feats, k) -> (N, k)`` integer indices into ``feats`` (N, dim): row i holds the
#: k items nearest to item i (normally i itself first), by ascending distance. Any distance
#: that orders like the cosine one on L2-normalised features will do (L2, inner product):
#: a gallery index's ``search(feats, k)[1]``. :func:`exact_neighbours` is the default.
NeighbourSource = Callable[[np.ndarray, int], np.ndarray]

# Rows per block of the neighbour and weight passes when the caller gives none: 512 (as
# before) while a block of N float32 distances and N int64 argpartition indices stays under
# ~400 MB, else 256 (one BLAS tile) -- 430 MB per worker at N = 138,517 (VERI-Wild large).
_BLOCK_ELEMENTS = 1 << 25


def _check_features(name: str, feats: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(feats, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, dim), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


@functools.lru_cache(maxsize=None)
def _native_neighbour_kernels() -> Optional[Tuple[Callable, Callable]]:
    """``VnNormalisedRows`` and ``VnTopK`` from csrc/retrieval_kernels.c, or None where it
    cannot be built (the numpy formulations below give the same bits, slower)."""
    from ..native import retrieval_kernels

    library = retrieval_kernels()
    if library is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    norm, topk = library.VnNormalisedRows, library.VnTopK
    norm.argtypes, norm.restype = [p, i64, i64, p], None
    topk.argtypes, topk.restype = [p, i64, i64, i64, p], ctypes.c_int
    return norm, topk


def _row_distance(feats: np.ndarray, start: int, stop: int, native: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Rows start:stop of the normalised distance d, and the normalising maxima."""
    dist = gram_rows(feats, feats, start, stop)  # float32 s, the same bits for any block
    kernels = _native_neighbour_kernels() if native else None
    if kernels is not None:  # the same float32 steps, one row at a time in cache
        col_max = np.empty(dist.shape[0], dtype=np.float32)
        kernels[0](dist.ctypes.data, dist.shape[0], dist.shape[1], col_max.ctypes.data)
        return dist, col_max
    np.multiply(dist, -2.0, out=dist)
    np.add(dist, 2.0, out=dist)  # 2 - 2s, float32 as in the reference
    np.multiply(dist, dist, out=dist)
    col_max = dist.max(axis=1)
    np.divide(dist, col_max[:, None], out=dist)
    return dist, col_max


def _top_neighbours(dist: np.ndarray, k: int, native: bool = True) -> np.ndarray:
    """Indices of the k smallest entries per row, ordered like a stable argsort."""
    n = dist.shape[1]
    kernels = _native_neighbour_kernels() if native else None
    if kernels is not None and k <= n:  # a k-heap per row: one comparison for most items
        top = np.empty((dist.shape[0], k), dtype=np.int32)
        if kernels[1](np.ascontiguousarray(dist).ctypes.data, dist.shape[0], n, k, top.ctypes.data) != 0:
            raise MemoryError(f"re-ranking: no memory for a {k}-entry heap")
        return top
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


def _expanded_sets(top: np.ndarray, k1: int, block_rows: int = 2048) -> sparse.csr_matrix:
    """Binary CSR of the expanded k-reciprocal sets (steps 2 and 3).

    Row blocks bound the intermediate ``R @ R_half.T`` (up to |R| x |R_half| entries per
    row before the mask by R); the counts are integers, so blocking changes nothing.
    """
    n = top.shape[0]
    k_half = int(np.around(k1 / 2.0))
    r = _reciprocal(top[:, : k1 + 1], n)
    r_half = _reciprocal(top[:, : k_half + 1], n)
    r_half_t = r_half.T.tocsr()
    half_size = np.diff(r_half.indptr)
    parts = []
    for start in range(0, n, block_rows):
        rb = r[start : start + block_rows]
        # |R_half(j) & R(i)| for every j in R(i); zero overlaps can never qualify.
        overlap = (rb @ r_half_t).multiply(rb).tocoo()
        keep = overlap.data > (2.0 / 3.0) * half_size[overlap.col]
        cond = sparse.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.int32), (overlap.row[keep], overlap.col[keep])), shape=rb.shape
        )
        parts.append((rb + cond @ r_half).tocsr())
    expanded = sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((n, n), dtype=np.int32)
    expanded.sum_duplicates()
    expanded.sort_indices()
    expanded.data[:] = 1
    return expanded


def _weights(feats: np.ndarray, pattern: sparse.csr_matrix, block_rows: int, workers: int) -> sparse.csr_matrix:
    """V: exp(-d[i, j]) over each expanded set, normalised to sum 1 per row (float32).

    A second blocked pass over whole rows of ``F @ F.T``: an entry's bits come from the
    row's 256-row tile against all of F, and its normalising maximum is over the whole row,
    so the members' distances are not computed alone (that would change their last bits).
    """
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


def _expanded_rows(v: sparse.csr_matrix, top: np.ndarray, k2: int, start: int, stop: int) -> sparse.csr_matrix:
    """Rows start:stop of V after local query expansion (each row the mean of the rows of its
    top k2), indices sorted; V's own rows when k2 == 1. Row by row, so any cut gives the same bits."""
    if k2 == 1:
        rows = v[start:stop].tocsr()
    else:
        a = _neighbour_matrix(np.ascontiguousarray(top[start:stop, :k2]), v.shape[0]).astype(np.float32)
        rows = (a @ v).tocsr()
        rows.data /= np.float32(k2)  # mean over the k2 rows
    rows.sort_indices()
    return rows


def _gallery_csc(rows_of: Callable[[int, int], sparse.csr_matrix], start: int, stop: int, n: int,
                 block_rows: int = 4096) -> sparse.csc_matrix:
    """Rows start:stop of a matrix given by row blocks, as CSC (row indices ascending per
    column), without the whole CSR copy that ``.tocsc()`` would need beside it: one pass
    counts each column's entries, a second recomputes the blocks and copies each block's
    column segments (scipy's CSC of the block) into place behind the earlier blocks'."""
    counts = np.zeros(n, dtype=np.int64)
    for s in range(start, stop, block_rows):
        counts += np.bincount(rows_of(s, min(s + block_rows, stop)).indices, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    data = np.empty(int(indptr[-1]), dtype=np.float32)
    fill = indptr[:-1].copy()
    for s in range(start, stop, block_rows):
        block = rows_of(s, min(s + block_rows, stop)).tocsc()
        block.sort_indices()
        per_col = np.diff(block.indptr)
        col = np.repeat(np.arange(n), per_col)
        dest = fill[col] + (np.arange(block.nnz) - block.indptr[col])
        indices[dest] = block.indices + (s - start)
        data[dest] = block.data
        fill += per_col
    return sparse.csc_matrix((data, indices, indptr), shape=(stop - start, n))


def _jaccard_rows(vq: sparse.csr_matrix, vg: sparse.csc_matrix, lo: int, hi: int, out: np.ndarray) -> None:
    """numpy formulation of ``VnJaccardRows`` (csrc/retrieval_kernels.c), for where it cannot be
    built: query rows lo:hi into ``out`` (hi - lo, num_gallery)."""
    g_ptr = vg.indptr.astype(np.int64)
    g_count = np.diff(g_ptr)
    num_gallery = out.shape[1]
    for q in range(lo, hi):
        a0, a1 = vq.indptr[q], vq.indptr[q + 1]
        cols = vq.indices[a0:a1]
        counts = g_count[cols]
        total = int(counts.sum())
        if total == 0:
            out[q - lo] = 1.0
            continue
        # Gallery non-zeros of the query's columns, as one index array over vg's storage.
        idx = np.arange(total, dtype=np.int64)
        idx += np.repeat(g_ptr[cols] - (np.cumsum(counts) - counts), counts)
        mins = np.minimum(np.repeat(vq.data[a0:a1], counts), vg.data[idx])
        # A row-sized accumulator stays in cache, unlike one over a block of rows.
        m = np.bincount(vg.indices[idx], weights=mins, minlength=num_gallery).astype(np.float32)
        out[q - lo] = 1.0 - m / (np.float32(2.0) - m)


@functools.lru_cache(maxsize=None)
def _native_jaccard() -> Optional[Callable]:
    """``VnJaccardRows`` from csrc/retrieval_kernels.c, or None where it cannot be built."""
    from ..native import retrieval_kernels

    library = retrieval_kernels()
    if library is None:
        return None
    func = library.VnJaccardRows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    func.argtypes = [p, p, p, p, p, p, i64, i64, i64, p]
    func.restype = ctypes.c_int
    return func


def _native_rows(func: Callable, arrays: Tuple[np.ndarray, ...], lo: int, hi: int, out: np.ndarray) -> None:
    """Query rows lo:hi into ``out`` (hi - lo, num_gallery) with the C kernel."""
    # The kernel writes row q at out + q * num_gallery for q in [lo, hi): hand it the query
    # row pointers from lo on and rows 0..hi-lo, so that ``out`` need only hold the block.
    q_ptr = arrays[0].ctypes.data + lo * arrays[0].itemsize
    pointers = [q_ptr] + [a.ctypes.data for a in arrays[1:]]
    # ctypes releases the GIL, so threads calling this run in parallel.
    if func(*pointers, out.shape[1], 0, hi - lo, out.ctypes.data) != 0:
        raise MemoryError(f"re-ranking: no memory for a {out.shape[1]}-entry accumulator")


class _Jaccard:
    """1 - m / (2 - m) for query rows x gallery rows of V, m = sum_c min(V[q, c], V[g, c]),
    a block of queries at a time.

    Work is one (query, column, gallery) triple per pair of co-occurring non-zeros,
    the same as the reference's inverted index; threads split the queries (the C loop
    and numpy both release the GIL). ``native=False`` forces the numpy formulation.
    """

    def __init__(self, vq: sparse.csr_matrix, vg: sparse.csc_matrix, workers: int, native: bool = True) -> None:
        """``vq``: V's query rows (CSR, indices sorted); ``vg``: its gallery rows (CSC, sorted)."""
        self.vq, self.vg, self.workers = vq, vg, workers
        self.num_query, self.num_gallery = vq.shape[0], vg.shape[0]
        self.func = _native_jaccard() if native else None
        if self.func is not None:
            # The C signature's types; scipy would narrow int64 index arrays back to int32.
            self.arrays = tuple(np.ascontiguousarray(x, dtype=t) for m in (vq, vg)
                                for x, t in ((m.indptr, np.int64), (m.indices, np.int32), (m.data, np.float32)))

    @classmethod
    def of(cls, v: sparse.csr_matrix, num_query: int, workers: int, native: bool = True) -> "_Jaccard":
        vq = v[:num_query].tocsr()
        vq.sort_indices()
        vg = v[num_query:].tocsc()
        vg.sort_indices()
        return cls(vq, vg, workers, native)

    def _rows(self, lo: int, hi: int, out: np.ndarray) -> None:
        if self.func is not None:
            _native_rows(self.func, self.arrays, lo, hi, out)
        else:
            _jaccard_rows(self.vq, self.vg, lo, hi, out)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop, (stop - start, num_gallery) float32."""
        out = np.empty((stop - start, self.num_gallery), dtype=np.float32)
        chunk = 64
        if self.workers <= 1 or stop - start <= chunk:
            self._rows(start, stop, out)
            return out
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self._rows, s, min(s + chunk, stop), out[s - start : s - start + chunk])
                       for s in range(start, stop, chunk)]
            for fut in futures:
                fut.result()
        return out


def _jaccard(v: sparse.csr_matrix, num_query: int, workers: int, native: bool = True) -> np.ndarray:
    """The whole (num_query, num_gallery) Jaccard matrix of V (see :class:`_Jaccard`)."""
    return _Jaccard.of(v, num_query, workers, native).block(0, num_query)


def exact_neighbours(
    feats: np.ndarray, k: int, *, block_rows: Optional[int] = None, workers: Optional[int] = None
) -> np.ndarray:
    """The exact :data:`NeighbourSource`: (N, k) int32, row i the k items nearest to item i
    under the re-ranking's normalised distance, equal distances by index (a stable sort).

    Blocked over rows: memory is ``workers`` blocks of ``block_rows`` x N float32 distances
    and int64 partition indices, plus the (N, k) result.
    """
    feats = _check_features("feats", feats)
    n = feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} needs 1 <= k <= N = {n}")
    block_rows = _block_rows(block_rows, n)
    top = np.empty((n, k), dtype=np.int32)

    def neighbours(start: int) -> None:
        stop = min(start + block_rows, n)
        dist, _ = _row_distance(feats, start, stop)
        top[start:stop] = _top_neighbours(dist, k)

    # Row blocks are independent; BLAS, argpartition and the element-wise passes release
    # the GIL, so a thread per core overlaps them (at most `workers` blocks alive at once).
    with one_blas_thread():
        with ThreadPoolExecutor(max_workers=_workers(workers)) as pool:
            list(pool.map(neighbours, range(0, n, block_rows)))
    return top


def _block_rows(block_rows: Optional[int], n: int) -> int:
    if block_rows is None:
        return 512 if 512 * n <= _BLOCK_ELEMENTS else TILE_ROWS
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, not {block_rows}")
    return block_rows


def _workers(workers: Optional[int]) -> int:
    return max(1, workers if workers is not None else min(4, os.cpu_count() or 1))


def _checked_neighbours(top: np.ndarray, n: int, k: int) -> np.ndarray:
    """The neighbour source's answer as (N, k) int32; ValueError saying what is wrong with it."""
    arr = np.asarray(top)
    if arr.shape != (n, k):
        raise ValueError(f"neighbours(feats, {k}) returned shape {arr.shape}; expected ({n}, {k}): "
                         f"the {k} nearest items of each of the N = {n} query + gallery features")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"neighbours(feats, {k}) returned {arr.dtype} values; expected integer indices")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"neighbours(feats, {k}) returned indices outside 0..{n - 1} (an index with too "
                         f"few results pads with -1; search it with more probes or use an exact one)")
    srt = np.sort(arr, axis=1)
    dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
    if dup.size:
        raise ValueError(f"neighbours(feats, {k}) repeats an item within row {dup[0]}")
    return arr.astype(np.int32, copy=False)


def _check_parameters(q_feats: np.ndarray, g_feats: np.ndarray, k1: int, k2: int,
                      lambda_value: float) -> Tuple[np.ndarray, int, int, int]:
    """Query and gallery features stacked (N, dim) float32, the number of queries, and the
    k1, k2 used on them (:func:`neighbour_counts`)."""
    q = _check_features("q_feats", q_feats)
    g = _check_features("g_feats", g_feats)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dimensions differ: {q.shape[1]} vs {g.shape[1]}")
    feats = np.concatenate([q, g], axis=0)
    k1, k2 = neighbour_counts(k1, k2, feats.shape[0], note=True)
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value} must lie in [0, 1]")
    return feats, q.shape[0], k1, k2


def neighbour_counts(k1: int, k2: int, n: int, *, note: bool = False) -> Tuple[int, int]:
    """The ``(k1, k2)`` re-ranking uses on ``n`` items (queries + gallery).

    A k1 of ``n`` or more (the published 100 on fewer than 101 images) means every item is
    a neighbour of every other: it becomes ``n - 1`` and k2 at most ``k1 + 1``, logged when
    ``note``. Raises ValueError for k1 or k2 below 1, an explicit k2 above k1 + 1, or n < 2.
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1={k1} and k2={k2} must be at least 1")
    if n < 2:
        raise ValueError(f"re-ranking needs at least 2 items (queries + gallery), got {n}")
    if k1 < n:
        if k2 > k1 + 1:
            raise ValueError(f"k2={k2} needs 1 <= k2 <= k1 + 1 = {k1 + 1}")
        return k1, k2
    used = n - 1, min(k2, n)
    if note:
        LOG.warning("re-ranking %d items: k1=%d is not below their number, so k1=%d, k2=%d are used (the published "
                    "k1=100, k2=15 assume galleries of thousands)", n, k1, *used)
    return used


def re_rank_blocks(
    q_feats: np.ndarray,
    g_feats: np.ndarray,
    k1: int = 100,
    k2: int = 15,
    lambda_value: float = 0.0,
    *,
    block_rows: Optional[int] = None,
    workers: Optional[int] = None,
    neighbours: Optional[NeighbourSource] = None,
) -> Iterator[Tuple[int, np.ndarray]]:
    """:func:`re_rank` as ``(row_start, block)`` pairs of ``block_rows`` queries each, in
    order, without a (num_query, num_gallery) or N x N matrix in memory.

    Steps 1-5 (neighbour lists, expanded sets, V, query expansion) run when this is called;
    the Jaccard distances (and with ``lambda_value > 0`` the original distances) of each
    block are computed as the iterator reaches it, and dropped once the consumer lets go.
    Memory: the features, the neighbour lists (N x (k1 + 1) int32), V and its query and
    gallery copies (float32 + int32 per non-zero; O(N) times the expanded-set size times
    k2's overlap), ``workers`` blocks of ``block_rows`` x N in the blocked passes, and one
    output block. ``block_rows`` defaults to 512, or 256 when N > 65,536.

    ``neighbours``: where the k1 + 1 nearest items of each item come from
    (:data:`NeighbourSource`, called once as ``neighbours(feats, k1 + 1)`` on the stacked
    query + gallery features). Default :func:`exact_neighbours`. A source that returns the
    same lists (an exact index whose distances order like these, ties by index) gives
    bit-identical results; an approximate one gives approximate re-ranking.

    Every block is bit-identical to those rows of :func:`re_rank` for any ``block_rows``
    and ``workers``.
    """
    feats, num_query, k1, k2 = _check_parameters(q_feats, g_feats, k1, k2, lambda_value)
    n = feats.shape[0]
    block_rows = _block_rows(block_rows, n)
    workers = _workers(workers)
    if neighbours is None:
        top = exact_neighbours(feats, k1 + 1, block_rows=block_rows, workers=workers)
    else:
        top = _checked_neighbours(neighbours(feats, k1 + 1), n, k1 + 1)
    with one_blas_thread():
        v = _weights(feats, _expanded_sets(top, k1), block_rows, workers)
    # The query-expanded V is built straight into the Jaccard step's query rows (CSR) and
    # gallery rows (CSC): never whole, never in both layouts at once.
    def rows_of(start: int, stop: int) -> sparse.csr_matrix:
        return _expanded_rows(v, top, k2, start, stop)

    jaccard = _Jaccard(rows_of(0, num_query), _gallery_csc(rows_of, num_query, n, n), workers)
    del v, top
    # Only lambda > 0 needs the features again; otherwise the stacked copy goes now.
    return _final_blocks(jaccard, feats if lambda_value != 0.0 else None, lambda_value, block_rows)


def _final_blocks(jaccard: _Jaccard, feats: Optional[np.ndarray], lambda_value: float,
                  block_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
    num_query = jaccard.num_query
    for start in range(0, num_query, block_rows):
        stop = min(start + block_rows, num_query)
        final = jaccard.block(start, stop)
        if feats is not None:
            with one_blas_thread():
                original = _row_distance(feats, start, stop)[0][:, num_query:]
            final *= np.float32(1.0 - lambda_value)
            final += original * np.float32(lambda_value)
            del original
        yield start, final


def re_rank(
    q_feats: np.ndarray,
    g_feats: np.ndarray,
    k1: int = 100,
    k2: int = 15,
    lambda_value: float = 0.0,
    *,
    block_rows: int = 512,
    workers: Optional[int] = None,
    neighbours: Optional[NeighbourSource] = None,
) -> np.ndarray:
    """k-reciprocal re-ranked distance (num_query, num_gallery) float32; lower is closer.

    ``q_feats`` and ``g_feats`` are L2-normalised float32 features. Defaults are the
    published protocol (k1=100, k2=15, lambda=0: pure Jaccard distance). With N = queries +
    gallery, a k1 of N or more is lowered to N - 1 (and k2 to at most N), logged
    (:func:`neighbour_counts`); otherwise ``1 <= k2 <= k1 + 1``. The whole matrix of :func:`re_rank_blocks` (same arguments, same
    bits); for large problems use that, whose blocks can be ranked and dropped.
    """
    blocks = re_rank_blocks(q_feats, g_feats, k1, k2, lambda_value, block_rows=block_rows, workers=workers,
                            neighbours=neighbours)
    return collect(blocks, (np.shape(q_feats)[0], np.shape(g_feats)[0]))
