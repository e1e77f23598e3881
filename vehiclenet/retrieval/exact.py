"""Exact search: cosine distances between L2-normalised features, whole or in row blocks, the
``k`` nearest gallery rows of one query (:func:`nearest`), and of many queries at once with the
same rows (:func:`exact_top_k`). Every bit is fixed by the inputs (:mod:`.blas`)."""
import os
from typing import Iterator, Optional, Tuple

import numpy as np

from .blocks import ordered_map

__all__ = ["cosine_distance", "cosine_distance_blocks", "nearest", "exact_top_k", "max_norm", "padded"]

_SCORE_BYTES = 256 * 2 ** 20  # similarity block held at once by exact_top_k


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Ranking distance ``-s`` with ``s = query @ gallery.T`` (float32, shape (Q, G)).

    Features are expected L2-normalised, so ``s`` is the cosine similarity. The
    negation is exact, so ascending distance is exactly descending similarity
    (``1 - s`` or ``2 - 2s`` would round and could merge distinct similarities).
    Computed by :func:`vehiclenet.retrieval.blas.matmul_nt`: the same bits for any thread count.
    """
    from .blas import matmul_nt

    q = np.ascontiguousarray(query, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"feature shapes {q.shape} and {g.shape} do not match")
    dist = matmul_nt(q, g)
    np.negative(dist, out=dist)
    return dist


def cosine_distance_blocks(
    query: np.ndarray, gallery: np.ndarray, *, block_rows: int = 256, workers: Optional[int] = None
) -> Iterator[Tuple[int, np.ndarray]]:
    """:func:`cosine_distance` as ``(row_start, block)`` pairs of ``block_rows`` queries each, in order.

    Every block has the same bits as those rows of :func:`cosine_distance` (both use the
    256-row tiles of :func:`vehiclenet.retrieval.blas.gram_rows`; a ``block_rows`` that is a multiple
    of 256 wastes no work). Blocks are computed on ``workers`` threads (default: every
    core), at most ``workers`` ahead of the consumer, so memory stays at a few
    ``block_rows`` x num_gallery float32 blocks.
    """
    from .blas import gram_rows, one_blas_thread

    q = np.ascontiguousarray(query, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"feature shapes {q.shape} and {g.shape} do not match")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, not {block_rows}")

    def block(start: int) -> Tuple[int, np.ndarray]:
        dist = gram_rows(q, g, start, start + block_rows)
        np.negative(dist, out=dist)
        return start, dist

    def stream() -> Iterator[Tuple[int, np.ndarray]]:
        with one_blas_thread():
            yield from ordered_map(block, range(0, q.shape[0], block_rows), workers or os.cpu_count() or 1)

    return stream()


_NEAREST_TILE = 4096


def nearest(query: np.ndarray, gallery: np.ndarray, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances (1 - cos) of the ``k`` gallery rows closest to ``query``.

    Both are L2-normalised features (as :func:`extract_features` returns); equal
    distances keep gallery order.
    """
    from .blas import matmul_nt

    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    # Gallery rows as the tiled side: the same bits for any thread count, few BLAS calls.
    sims = matmul_nt(np.asarray(gallery, dtype=np.float32), q, tile_rows=_NEAREST_TILE).reshape(-1)
    order = np.argsort(-sims, kind="stable")[:k]
    return order, (1.0 - sims[order]).astype(np.float32)


def padded(dist: np.ndarray, rows: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """``dist``/``rows`` widened to ``k`` columns with inf / -1 (fewer rows were allowed)."""
    if dist.shape[1] == k:
        return dist, rows
    pad = k - dist.shape[1]
    return (np.concatenate([dist, np.full((len(dist), pad), np.inf, dtype=np.float32)], axis=1),
            np.concatenate([rows, np.full((len(rows), pad), -1, dtype=np.int64)], axis=1))


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, max_norm: float,
                  allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k with :func:`vehiclenet.retrieval.exact.nearest`'s rows, in its order.

    A batched product (one BLAS call per gallery tile for many queries) may sum a dot
    product in another order than ``nearest``'s one-query product. Both are within
    gamma_D * |q| * |x| of the true value for any summation order (gamma_D = D*u / (1 - D*u),
    u = 2^-24), so they differ by at most delta = 2 gamma_D |q| max|x|. Every row of the true
    top-k lies within 2 delta of the batched k-th best, and candidates more than 2 delta apart
    are in ``nearest``'s order. Runs of candidates closer than that (ties, near-ties) get
    ``nearest``'s bits (their tiles recomputed the way it computes them) and are re-sorted.
    Rows always equal ``nearest``'s; distances are its bits for a single query and for
    near-ties, else the batched product's (within delta, in practice the same or 1 ulp off).
    Rows outside ``allowed`` get similarity -inf, so they are never candidates.
    """
    from .blas import matmul_nt, one_blas_thread

    n, d = gallery.shape
    q_norm = np.linalg.norm(queries.astype(np.float64), axis=1)
    delta = 2.0 * _gamma(d) * q_norm * max_norm * 1.01 + 1e-30
    block = max(1, min(len(queries), _SCORE_BYTES // (4 * max(1, n))))
    dist = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    with one_blas_thread():  # once: entering costs ~1 ms (threadpoolctl looks the libraries up)
        for s in range(0, len(queries), block):
            sims = matmul_nt(gallery, queries[s:s + block], tile_rows=_NEAREST_TILE).T.copy()  # (block, N)
            if allowed is not None:
                sims[:, ~allowed] = -np.inf
            for j in range(sims.shape[0]):
                # One query alone is nearest's own product: its bits need no correction.
                margin = 2.0 * delta[s + j] if sims.shape[0] > 1 else 0.0
                dist[s + j], rows[s + j] = _top_k(gallery, queries[s + j], sims[j], k, margin, allowed)
    return dist, rows


def _gamma(d: int) -> float:
    u = 2.0 ** -24
    return d * u / (1.0 - d * u)


def max_norm(gallery: np.ndarray) -> float:
    """Largest row norm, read in blocks (a memory-mapped gallery is never copied whole)."""
    step = 65536
    return max(float(np.sqrt(np.max(np.einsum("ij,ij->i", gallery[i:i + step], gallery[i:i + step],
                                                 dtype=np.float64))))
               for i in range(0, len(gallery), step))


def _top_k(gallery: np.ndarray, query: np.ndarray, sims: np.ndarray, k: int, margin: float,
           allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of one query from its batched similarities ``sims`` (see :func:`exact_top_k`);
    ``margin`` 0 when ``sims`` already has ``nearest``'s bits; ``allowed`` rows only (the
    others' ``sims`` are -inf)."""
    n = len(sims)
    if np.isnan(sims).any() or (allowed is None and not np.isfinite(sims).all()):
        # NaN breaks the bound: nearest itself, over every allowed row
        keep = np.arange(n) if allowed is None else np.flatnonzero(allowed)
        order, dist = nearest(query, gallery[keep], k)
        return dist, keep[order].astype(np.int64)
    kth = float(np.partition(sims, n - k)[n - k])
    cand = np.flatnonzero(sims.astype(np.float64) >= kth - margin)
    cand = cand[np.lexsort((cand, -sims[cand]))]  # descending similarity, ties by row: nearest's stable order
    values = sims[cand]
    if margin > 0 and len(cand) > 1:
        # Runs of candidates less than margin apart may be ordered otherwise by nearest's bits:
        # those rows get nearest's bits and are re-sorted within their run.
        close = -np.diff(values.astype(np.float64)) <= margin
        starts = np.flatnonzero(np.concatenate([[True], ~close]))
        ends = np.concatenate([starts[1:], [len(cand)]])
        for a, b in zip(starts, ends):
            if b - a > 1 and a < k:
                exact = _nearest_sims(gallery, query, cand[a:b])
                order = np.lexsort((cand[a:b], -exact))
                cand[a:b], values[a:b] = cand[a:b][order], exact[order]
    return (1.0 - values[:k]).astype(np.float32), cand[:k].astype(np.int64)


def _nearest_sims(gallery: np.ndarray, query: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Similarities of rows ``cand`` with the bits :func:`vehiclenet.retrieval.exact.nearest` gives
    them: each row's whole tile, in one single-query product of ``nearest``'s shape.
    Call inside :func:`vehiclenet.retrieval.blas.one_blas_thread`, as ``nearest``'s product runs."""
    from .blas import gram_rows

    n = len(gallery)
    exact = np.empty(len(cand), dtype=np.float32)
    q = query.reshape(1, -1)
    for tile in np.unique(cand // _NEAREST_TILE):
        t0 = int(tile) * _NEAREST_TILE
        t1 = min(t0 + _NEAREST_TILE, n)
        tile_sims = gram_rows(gallery[t0:t1], q, 0, t1 - t0, tile_rows=_NEAREST_TILE)[:, 0]
        inside = (cand >= t0) & (cand < t1)
        exact[inside] = tile_sims[cand[inside] - t0]
    return exact
