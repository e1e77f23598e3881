"""Ranking a gallery for one query image, as ``vehiclenet rank`` prints and draws it.

:func:`rank_gallery` orders gallery features by cosine distance to a query's features
(:func:`vehiclenet.features.nearest`), leaving the query's own file out of its gallery;
:func:`veri_id` (from :mod:`vehiclenet.evaluation`) reads the vehicle id a VeRi-776 file name
carries, for same-id marks.
"""
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .errors import DataError
from .evaluation import veri_id
from .features import FeatureResult, nearest

__all__ = ["Ranking", "rank_gallery", "rank_index", "veri_id"]

# Warnings carry the package's name, as ``vehiclenet rank`` has always printed them.
LOG = logging.getLogger("vehiclenet")


@dataclass
class Ranking:
    """The closest gallery images, best first, with their distances (1 - cos) and the gallery's size."""

    paths: List[str]
    distances: List[float]
    num_gallery: int  # gallery images ranked, the query's own file left out


def rank_gallery(query: np.ndarray, gallery: FeatureResult, k: int, *, leave_out: Optional[str] = None,
                 source: str = "gallery") -> Ranking:
    """The ``k`` gallery images closest to ``query`` (one L2-normalised feature row).

    ``leave_out`` is the query's file: the same file in the gallery (by real path) would
    be a perfect first match, so it is not ranked. ``source`` names the gallery in errors.
    Raises DataError when the widths differ or no other gallery image is left; warns when
    features that are not finite make distances NaN.
    """
    if gallery.features.shape[1] != query.shape[0]:
        raise DataError(f"{source}: features are {gallery.features.shape[1]}-d, the network gives "
                        f"{query.shape[0]}-d")
    left_out = os.path.realpath(leave_out) if leave_out is not None else None
    keep = [i for i, p in enumerate(gallery.paths) if os.path.realpath(p) != left_out]
    if not keep:
        raise DataError(f"{source}: no gallery image besides the query")
    feats = gallery.features[keep]
    paths = [gallery.paths[i] for i in keep]
    _warn_nan_distances(query, feats, paths)
    order, distances = nearest(query, feats, k)
    return Ranking([paths[i] for i in order], [float(d) for d in distances], len(paths))


def rank_index(query: np.ndarray, index, k: int, *, leave_out: Optional[str] = None) -> Ranking:
    """The ``k`` rows of a :class:`vehiclenet.index.GalleryIndex` closest to ``query``.

    ``leave_out`` (the query's file, by real path) is dropped where it turns up among the
    nearest rows, which is where its own features put it; ``num_gallery`` counts the rows
    ranked, those dropped left out. Raises DataError when the widths differ (naming the index).
    """
    left_out = os.path.realpath(leave_out) if leave_out is not None else None
    want = k + 1
    while True:
        dist, rows = index.search(query.reshape(1, -1), want)
        kept = [(int(r), float(d)) for r, d in zip(rows[0], dist[0])
                if r >= 0 and (left_out is None or os.path.realpath(index.path(r)) != left_out)]
        dropped = int(np.count_nonzero(rows[0] >= 0)) - len(kept)
        if len(kept) >= k or want >= len(index):
            break
        want = min(len(index), 2 * want)  # the query's file is in the index several times
    if not kept:
        raise DataError(f"{index.source or 'gallery index'}: no gallery image besides the query")
    kept = kept[:k]
    return Ranking([index.path(r) for r, _ in kept], [d for _, d in kept], len(index) - dropped)


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
