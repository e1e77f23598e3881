"""Ranking a gallery for one query image, as ``vehiclenet rank`` prints and draws it.

:func:`rank_gallery` orders gallery features by cosine distance to a query's features
(:func:`vehiclenet.retrieval.exact.nearest`), leaving the query's own file out of its gallery;
:func:`veri_id` (from :mod:`vehiclenet.retrieval.metrics`) reads the vehicle id a VeRi-776 file name
carries, for same-id marks.
"""
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..datasets.veri import veri_id
from ..embedding.result import FeatureResult
from .exact import nearest

__all__ = ["Ranking", "rank_gallery", "rank_index", "search_filtered", "search_leaving_out", "veri_id"]

# Warnings carry the package's name, as ``vehiclenet rank`` has always printed them.
LOG = logging.getLogger("vehiclenet")


@dataclass
class Ranking:
    """The closest gallery images, best first, with their distances (1 - cos) and the gallery's size."""

    paths: List[str]
    distances: List[float]
    num_gallery: int  # gallery images ranked, the query's own file left out


def rank_gallery(query: np.ndarray, gallery: FeatureResult, k: int, *, leave_out: Optional[str] = None,
                 source: str = "gallery", allowed: Optional[np.ndarray] = None) -> Ranking:
    """The ``k`` gallery images closest to ``query`` (one L2-normalised feature row).

    ``leave_out`` is the query's file: the same file in the gallery (by real path) would
    be a perfect first match, so it is not ranked. ``allowed`` (a boolean per gallery row, from
    a :class:`vehiclenet.retrieval.filters.RowFilter`) keeps only those rows. ``source`` names the gallery in errors.
    Raises DataError when the widths differ or no other gallery image is left; warns when
    features that are not finite make distances NaN.
    """
    if gallery.features.shape[1] != query.shape[0]:
        raise DataError(f"{source}: features are {gallery.features.shape[1]}-d, the network gives "
                        f"{query.shape[0]}-d")
    left_out = os.path.realpath(leave_out) if leave_out is not None else None
    keep = [i for i, p in enumerate(gallery.paths)
            if os.path.realpath(p) != left_out and (allowed is None or allowed[i])]
    if not keep:
        raise DataError(f"{source}: no gallery image besides the query"
                        + ("" if allowed is None else " passes the filters"))
    feats = gallery.features[keep]
    paths = [gallery.paths[i] for i in keep]
    _warn_nan_distances(query, feats, paths)
    order, distances = nearest(query, feats, k)
    return Ranking([paths[i] for i in order], [float(d) for d in distances], len(paths))


def rank_index(query: np.ndarray, index, k: int, *, leave_out: Optional[str] = None,
               allowed: Optional[np.ndarray] = None) -> Ranking:
    """The ``k`` rows of a :class:`vehiclenet.retrieval.index.GalleryIndex` closest to ``query``.

    ``leave_out`` (the query's file, by real path) is dropped where it turns up among the
    nearest rows, which is where its own features put it; ``allowed`` restricts the search to
    those rows (inside the index); ``num_gallery`` counts the rows ranked, those dropped left
    out. Raises DataError when the widths differ (naming the index).
    """
    dist, rows, dropped = search_leaving_out(index, query.reshape(1, -1), [leave_out], k, allowed=allowed)
    kept = [(int(r), float(d)) for r, d in zip(rows[0], dist[0]) if r >= 0]
    if not kept:
        raise DataError(f"{index.source or 'gallery index'}: no gallery image besides the query"
                        + ("" if allowed is None else " passes the filters"))
    total = len(index) if allowed is None else int(np.count_nonzero(allowed))
    return Ranking([index.path(r) for r, _ in kept], [d for _, d in kept], total - int(dropped[0]))


def search_filtered(index, queries: np.ndarray, names: Sequence[Optional[str]], k: int, row_filter: Any = None,
                    query_cams: Optional[Sequence[int]] = None, *, keep_self: bool = False,
                    **params: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`search_leaving_out` (or, ``keep_self``, a plain search) of the rows that pass
    ``row_filter`` (a :class:`vehiclenet.retrieval.filters.RowFilter`; ``query_cams`` for its
    query-camera rule), applied inside the index. Returns distances, rows and, per query, how
    many gallery rows it was searched among."""
    n = len(index)
    k = min(int(k), n)
    groups = ([(np.arange(len(queries)), None)] if not row_filter else
              row_filter.groups(index.columns(), n, query_cams, len(queries), index.source or "the gallery index"))
    dist = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    among = np.zeros(len(queries), dtype=np.int64)
    for members, mask in groups:
        if keep_self:
            dist[members], rows[members] = index.search(queries[members], k, allowed=mask, **params)
            dropped = 0
        else:
            dist[members], rows[members], dropped = search_leaving_out(
                index, queries[members], [names[i] for i in members], k, allowed=mask, **params)
        among[members] = (n if mask is None else int(np.count_nonzero(mask))) - dropped
    return dist, rows, among


def search_leaving_out(index, queries: np.ndarray, names: Sequence[Optional[str]], k: int,
                       **params: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`GalleryIndex.search` of ``queries`` with each query's own file (``names[i]``, by
    real path; None: none) left out, as ``rank`` leaves it out of its gallery.

    Returns (Q, min(k, N)) distances and rows (-1 and inf where fewer are left) and, per
    query, how many of the index's rows were its own file and dropped. The search widens
    (doubling) for the queries whose file the index holds several times.
    """
    k = min(int(k), len(index))
    dist_out = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows_out = np.full((len(queries), k), -1, dtype=np.int64)
    dropped = np.zeros(len(queries), dtype=np.int64)
    own = [None if n is None else os.path.realpath(n) for n in names]
    todo, want = np.arange(len(queries)), min(k + 1, len(index))
    while todo.size:
        dist, rows = index.search(queries[todo], want, **params)
        again = []
        for q, d_row, r_row in zip(todo, dist, rows):
            kept = [(r, d) for r, d in zip(r_row, d_row) if r >= 0 and not _is_own(index, r, own[q])]
            found = int(np.count_nonzero(r_row >= 0))
            if len(kept) < k and found == want < len(index):
                again.append(q)  # its own file took more places than one: search wider
                continue
            dropped[q] = found - len(kept)
            kept = kept[:k]
            rows_out[q, :len(kept)] = [r for r, _ in kept]
            dist_out[q, :len(kept)] = [d for _, d in kept]
        todo, want = np.asarray(again, dtype=np.int64), min(len(index), 2 * want)
    return dist_out, rows_out, dropped


def _is_own(index, row: int, own: Optional[str]) -> bool:
    return own is not None and os.path.realpath(index.path(int(row))) == own


def _warn_nan_distances(query: np.ndarray, gallery: np.ndarray, paths: List[str]) -> None:
    """Warn when features that are not finite make distances NaN (they rank last, meaningless)."""
    if not np.isfinite(query).all():
        LOG.warning("the query's features are NaN or infinite: every distance is nan and the order means nothing; "
                    "check the weights (--checkpoint)")
        return
    bad = np.flatnonzero(~np.isfinite(gallery).all(axis=1))
    if bad.size:
        shown = ", ".join(paths[i] for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        LOG.warning("%d of %d gallery images have NaN or infinite features (%s): their distances are nan and they "
                    "rank last; embed them again", bad.size, len(paths), shown)
