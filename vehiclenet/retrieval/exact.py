"""Exact search: cosine distances between L2-normalised features, whole or in row blocks, and the
``k`` nearest gallery rows of one query. Every bit is fixed by the inputs (:mod:`.blas`)."""
import os
from typing import Iterator, Optional, Tuple

import numpy as np

from .blocks import ordered_map

__all__ = ["cosine_distance", "cosine_distance_blocks", "nearest"]


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
