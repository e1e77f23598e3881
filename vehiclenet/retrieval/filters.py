"""Which gallery rows a search may return: some cameras, a time window, tags, not the query's camera.

A :class:`RowFilter` turns the gallery's metadata columns (:mod:`vehiclenet.embedding.metadata`) into
a boolean mask per group of queries (:meth:`RowFilter.groups`): one mask for all queries, or
one per query camera with ``exclude_same_camera``. The search applies the mask inside the
index (:meth:`vehiclenet.retrieval.index.GalleryIndex.search`, ``allowed=``), so a filtered top-k is
the top-k of the rows that pass, never an unfiltered top-k thinned afterwards.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, UsageError
from ..embedding.metadata import UNKNOWN_CAMERA, UNKNOWN_TIME, tag_set

__all__ = ["RowFilter"]


@dataclass(frozen=True)
class RowFilter:
    """Rows to keep: camera in ``cameras``; time in [``after``, ``before``) (seconds since 1970
    UTC); every tag of ``tags``; with ``exclude_same_camera``, a camera other than the query's.
    A row whose needed value is unknown never passes (except the query-camera rule)."""

    cameras: Optional[Tuple[int, ...]] = None
    after: Optional[int] = None
    before: Optional[int] = None
    tags: Tuple[str, ...] = ()
    exclude_same_camera: bool = False

    def __post_init__(self) -> None:
        if self.after is not None and self.before is not None and self.after >= self.before:
            raise UsageError(f"the time window is empty: --after {self.after} is not before --before {self.before}")
        if self.cameras is not None and not self.cameras:
            raise UsageError("--cameras lists no camera")

    def __bool__(self) -> bool:
        return bool(self.cameras is not None or self.after is not None or self.before is not None or self.tags
                    or self.exclude_same_camera)

    def describe(self) -> Dict[str, Any]:
        """The filter as JSON-ready settings (only those given)."""
        out: Dict[str, Any] = {}
        if self.cameras is not None:
            out["cameras"] = list(self.cameras)
        if self.after is not None:
            out["after"] = self.after
        if self.before is not None:
            out["before"] = self.before
        if self.tags:
            out["tags"] = list(self.tags)
        if self.exclude_same_camera:
            out["exclude_same_camera"] = True
        return out

    def base_mask(self, columns: Dict[str, Any], n: int, source: str) -> Optional[np.ndarray]:
        """The rows passing every rule but the query-camera one (None: all of them).
        ``columns``: ``cams``, ``times``, ``tags`` of the ``n`` rows (None where not stored).
        DataError naming ``source`` when a rule needs a column it does not store."""
        mask = None
        if self.cameras is not None:
            cams = _column(columns, "cams", source, "--cameras", n)
            mask = _and(mask, np.isin(cams, np.asarray(self.cameras, dtype=np.int64)))
        if self.after is not None or self.before is not None:
            times = _column(columns, "times", source, "--after/--before", n)
            keep = times != UNKNOWN_TIME
            if self.after is not None:
                keep &= times >= self.after
            if self.before is not None:
                keep &= times < self.before
            mask = _and(mask, keep)
        if self.tags:
            mask = _and(mask, _has_tags(_column(columns, "tags", source, "--tag", n), set(self.tags)))
        return mask

    def groups(self, columns: Dict[str, Any], n: int, query_cams: Optional[Sequence[int]], queries: int,
               source: str) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(query numbers, their mask or None) covering every query once."""
        base = self.base_mask(columns, n, source)
        everyone = np.arange(queries)
        if not self.exclude_same_camera:
            return [(everyone, base)]
        cams = _column(columns, "cams", source, "--exclude-same-camera", n)
        if query_cams is None:
            raise UsageError("--exclude-same-camera needs each query's camera: --query-camera N, query features "
                             "with a cams column, or VeRi-776 query file names (VVVV_cCCC_....jpg)")
        q_cams = np.asarray(query_cams, dtype=np.int64)
        out = []
        for cam in np.unique(q_cams):
            mask = np.ones(n, dtype=bool) if base is None else base.copy()
            if cam != UNKNOWN_CAMERA:  # a query from an unknown camera excludes none
                mask &= cams != cam
            out.append((everyone[q_cams == cam], mask))
        return out


def _and(mask: Optional[np.ndarray], more: np.ndarray) -> np.ndarray:
    return more if mask is None else mask & more


def _column(columns: Dict[str, Any], key: str, source: str, option: str, n: int) -> Any:
    """Column ``key`` of ``columns`` (a callable there is called: tags are decoded only when a
    rule reads them); DataError naming ``source`` when it is missing or not one value a row."""
    value = columns.get(key)
    what = {"cams": "cameras", "times": "times", "tags": "tags"}[key]
    if value is None:
        raise DataError(f"{option}: {source} stores no {what}; build it with metadata "
                        f"(`vehiclenet index build FEATURES --meta CSV|veri|veri-wild:ROOT`, or "
                        f"`vehiclenet embed ... --meta ...` for a features file)")
    value = value() if callable(value) else value
    if len(value) != n:
        raise DataError(f"{source}: {len(value)} {what} for {n} gallery rows; embed or index it again with --meta")
    if key == "tags":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value]
    return np.asarray(value, dtype=np.int64)


def _has_tags(tags: Sequence[str], wanted: set) -> np.ndarray:
    # Each distinct tags string is parsed once: galleries repeat a few combinations many times.
    values = np.asarray(tags, dtype=str)
    unique, inverse = np.unique(values, return_inverse=True)
    passes = np.array([wanted <= tag_set(u) for u in unique], dtype=bool)
    return passes[inverse] if len(unique) else np.zeros(len(values), dtype=bool)
