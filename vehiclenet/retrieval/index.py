"""Persisted gallery indexes: features of millions of gallery images, searched by cosine distance.

A :class:`GalleryIndex` holds L2-normalised features (rows, in the order they were given),
the path of each row's image and optionally vehicle ids, cameras, times and tags.
``search(queries, k)`` returns cosine distances (1 - cos) and row numbers, best first.

Kinds (``kind=``), each kept by a store class of :mod:`vehiclenet.retrieval.stores`: ``"exact"``
(the same rows as :func:`vehiclenet.retrieval.exact.nearest` for every query), ``"ivf-sq8"``,
``"ivf-flat"`` and ``"hnsw-sq8"``. ``"auto"`` (the default) is exact up to ``AUTO_EXACT_MAX``
rows and ivf-sq8 beyond, unless ivf-sq8 cannot reach the target recall (or is no faster than
exact search there): then exact.

Search effort is tuned at build time (:mod:`vehiclenet.retrieval.index_tuning`): the smallest
nprobe (efSearch for hnsw) whose recall@10 against exact search, measured on 2,000 of the
gallery's own rows searched leave-one-out, reaches ``target_recall`` (default 0.95) with 99 %
confidence. The choice and what it measured are recorded in the manifest (``tuning``) and are
the index's default search settings; ``add`` measures the added rows again and raises the
setting where they need more. docs/large-galleries.md has the kinds' measured speed and recall.

File format (one file, ``FORMAT_VERSION``): a 64-byte header (magic ``VNGIDX``, format
version, offset/length/sha256 of the manifest), the parts at 4096-byte aligned offsets, the
JSON manifest last. The manifest records the package version, faiss version, kind,
dimension, count, parameters, their tuning record, the source files and each part's offset,
length and sha256. Parts: the store's (``vectors`` or ``faiss``), ``path_bytes``/``path_offsets``
(UTF-8 paths), optional ``ids``/``cams``/``times`` (int64) and ``tag_bytes``/``tag_offsets``.
Loading memory-maps the file (exact vectors as a numpy memmap, faiss indexes through faiss's
zero-copy reader), so the kernel pages them in on demand. Writing goes to a private temporary
file renamed into place.
"""
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..errors import DataError, UsageError
from ..fileio import describe_mode, open_regular
from .index_tuning import (TARGET_RECALL, TUNE_K, TUNE_QUERIES, Tuning, check_target, exact_truth, ladder,
                           sample_rows, tune)
from .stores import NPROBE, STORES, ExactStore, IvfStore, faiss_module

__all__ = ["AUTO_EXACT_MAX", "GalleryIndex", "KINDS", "NPROBE", "add_to_index", "build_index", "index_neighbours",
           "is_index_file", "load_index", "read_feature_sources"]

LOG = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf-sq8", "ivf-flat", "hnsw-sq8")
#: Largest gallery "auto" searches exactly: about where one exact query takes 10 ms on 2 cores.
AUTO_EXACT_MAX = 50_000
#: Fewest rows an add must bring for their recall to be measured (fewer give no usable estimate).
RECHECK_MIN = 200

FORMAT = "vehiclenet-gallery-index"
FORMAT_VERSION = 1
MAGIC = b"VNGIDX\x00\x01"
_HEADER = struct.Struct("<8sIIQQ32s")  # magic, format version, reserved, manifest offset, length, sha256
_HEADER_SIZE = 64
_ALIGN = 4096

PathLike = Union[str, os.PathLike]


@dataclass
class _Meta:
    """Everything about an index but its vectors."""

    kind: str
    dimension: int
    paths: "_Paths"
    ids: Optional[np.ndarray] = None
    cams: Optional[np.ndarray] = None
    times: Optional[np.ndarray] = None  # int64 seconds since 1970 UTC (vehiclenet.embedding.metadata.UNKNOWN_TIME: unknown)
    tags: Optional["_Paths"] = None  # one tags string per row, stored like the paths
    params: Dict[str, Any] = field(default_factory=dict)
    flip: Optional[bool] = None
    sources: List[str] = field(default_factory=list)
    weights: Optional[str] = None  # vehiclenet.weights.choice identity of the network that embedded the rows
    tuning: Optional[Dict[str, Any]] = None  # vehiclenet.retrieval.index_tuning.Tuning.to_json() of the search settings


class _Paths:
    """Paths as UTF-8 bytes plus offsets (memory-mappable), decoded on demand."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_list(cls, paths: Sequence[str]) -> "_Paths":
        encoded = [os.fsencode(p) if not isinstance(p, bytes) else p for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def encoded(self) -> List[bytes]:
        """Every path as the bytes stored (one pass over the data, for membership tests)."""
        raw, offsets = np.asarray(self.data).tobytes(), np.asarray(self.offsets).tolist()
        return [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def extend(self, other: "_Paths") -> "_Paths":
        offsets = np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]])
        return _Paths(np.concatenate([np.asarray(self.data), np.asarray(other.data)]), offsets)


class GalleryIndex:
    """Gallery features searchable by cosine distance; see the module docstring for the kinds.

    Build with :meth:`build` (or :func:`build_index` from features files), grow with
    :meth:`add`, write with :meth:`save`, read with :func:`load_index`.
    """

    def __init__(self, meta: _Meta, store: Any, source: Optional[str] = None) -> None:
        self._meta = meta
        self._store = store  # where the rows are kept and searched: a STORES class of meta.kind
        self.source = source  # the file it was loaded from, named in errors
        self._tags: Optional[List[str]] = None

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        return self._meta.kind

    @property
    def dimension(self) -> int:
        return self._meta.dimension

    def __len__(self) -> int:
        return len(self._meta.paths)

    @property
    def count(self) -> int:
        return len(self)

    @property
    def params(self) -> Dict[str, Any]:
        return dict(self._meta.params)

    @property
    def flip(self) -> Optional[bool]:
        """Whether the features were flip-summed (``vehiclenet embed``'s default); None if unknown."""
        return self._meta.flip

    @property
    def weights(self) -> Optional[str]:
        """Identity of the weights that embedded the features (:mod:`vehiclenet.weights.choice`); None if unknown."""
        return self._meta.weights

    @property
    def ids(self) -> Optional[np.ndarray]:
        return self._meta.ids

    @property
    def cams(self) -> Optional[np.ndarray]:
        return self._meta.cams

    @property
    def times(self) -> Optional[np.ndarray]:
        """Per row seconds since 1970 UTC (``vehiclenet.embedding.metadata.UNKNOWN_TIME`` where unknown), or None."""
        return self._meta.times

    @property
    def tags(self) -> Optional[List[str]]:
        """Per row its tags string ("red,sedan"), or None (decoded now, once per index)."""
        if self._meta.tags is None:
            return None
        if self._tags is None:
            self._tags = [self._meta.tags[i] for i in range(len(self))]
        return self._tags

    @property
    def labels(self) -> List[str]:
        """The per-row columns stored besides features and paths: of ids, cams, times, tags."""
        meta = self._meta
        return [name for name, col in (("ids", meta.ids), ("cams", meta.cams), ("times", meta.times),
                                       ("tags", meta.tags)) if col is not None]

    def tag(self, row: int) -> Optional[str]:
        """The tags string of ``row`` (None when the index stores no tags)."""
        return None if self._meta.tags is None else self._meta.tags[int(row)]

    def columns(self) -> Dict[str, Any]:
        """The metadata columns a :class:`vehiclenet.retrieval.filters.RowFilter` reads (tags as a callable:
        decoded only when a rule reads them)."""
        tags = None if self._meta.tags is None else (lambda: self.tags)
        return {"cams": self.cams, "times": self.times, "tags": tags}

    @property
    def sources(self) -> List[str]:
        return list(self._meta.sources)

    @property
    def tuning(self) -> "Optional[Tuning]":
        """How the search settings were chosen and the recall they measured (None: not tuned)."""
        from .index_tuning import Tuning

        return None if self._meta.tuning is None else Tuning.from_json(dict(self._meta.tuning))

    def path(self, row: int) -> str:
        """The image path of ``row``."""
        return self._meta.paths[int(row)]

    @property
    def paths(self) -> List[str]:
        """All image paths in row order (decoded now: prefer :meth:`path` for a few rows of a large index)."""
        return [self._meta.paths[i] for i in range(len(self))]

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, features: np.ndarray, paths: Sequence[str], *, ids: Optional[Sequence[int]] = None,
              cams: Optional[Sequence[int]] = None, times: Optional[Sequence[int]] = None,
              tags: Optional[Sequence[str]] = None, kind: str = "auto", nlist: Optional[int] = None,
              nprobe: Optional[int] = None, ef_search: Optional[int] = None, flip: Optional[bool] = None,
              sources: Sequence[str] = (), seed: int = 0, weights: Optional[str] = None,
              target_recall: Optional[float] = TARGET_RECALL, tune_queries: int = TUNE_QUERIES) -> "GalleryIndex":
        """An index of ``features`` (N, D) L2-normalised float32, row i belonging to ``paths[i]``.

        ``kind``: ``"auto"`` (exact up to :data:`AUTO_EXACT_MAX` rows, else ivf-sq8 if it reaches
        ``target_recall``, else exact), ``"exact"``, ``"ivf-sq8"``, ``"ivf-flat"`` or ``"hnsw-sq8"``.
        ``target_recall``: recall@10 the search settings are chosen for, measured on ``tune_queries``
        of the gallery's own rows (:mod:`vehiclenet.retrieval.index_tuning`); None keeps the fixed defaults.
        ``nlist`` sets the ivf kinds' cells; ``nprobe`` / ``ef_search`` fix the default search effort
        instead of tuning it (its recall is still measured); ``seed`` fixes the training and tuning
        samples; ``flip`` and ``weights`` record how the features were embedded; ``cams``,
        ``times`` and ``tags`` are the rows' metadata (:mod:`vehiclenet.embedding.metadata`) that filtered
        searches read.
        """
        feats = _check_features(features, paths, "features")
        if kind not in KINDS:
            raise UsageError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        target = None if target_recall is None else check_target(target_recall)
        if not 1 <= tune_queries <= _LIMIT:
            raise UsageError(f"tune_queries must be from 1 to {_LIMIT}, got {tune_queries}")
        for option, value in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and not 1 <= value <= _LIMIT:
                raise UsageError(f"{option} must be from 1 to {_LIMIT} (faiss takes a C int), got {value}")
        if len(feats) == 0:
            raise DataError("no features to index")
        auto = kind == "auto"
        if auto:
            kind = "exact" if len(feats) <= AUTO_EXACT_MAX else "ivf-sq8"
        meta = _Meta(kind=kind, dimension=int(feats.shape[1]), paths=_Paths.from_list(list(paths)),
                     ids=_optional_column(ids, len(feats), "ids"), cams=_optional_column(cams, len(feats), "cams"),
                     times=_optional_column(times, len(feats), "times"), tags=_tag_column(tags, len(feats)),
                     flip=flip, sources=[os.fspath(s) for s in sources], weights=weights)
        if kind == "exact":
            return cls._exact(meta, feats, target)
        store, trained = STORES[kind].train(feats, kind, nlist=nlist, nprobe=nprobe, ef_search=ef_search, seed=seed,
                                            params=meta.params)
        index = cls(meta, store)
        if target is None or len(feats) < 2:
            store.add(feats, np.arange(len(feats)))
            return index
        fixed = {"nprobe": nprobe, "ef_search": ef_search}[store.param]
        lowest = TUNE_K + 1 if store.param == "ef_search" else 1  # efSearch below k + 1 finds too few
        values = [int(fixed)] if fixed else ladder(lowest, store.ladder_limit(meta.params))
        tuning = index._add_tuned(feats, 0, target, values, seed, count=tune_queries, fixed=bool(fixed),
                                  avoid=trained)
        slower = tuning.exact_query_ms is not None and tuning.query_ms >= tuning.exact_query_ms  # single queries
        if auto and (not tuning.reached or slower):
            why = (f"ivf-sq8 cannot meet recall@{tuning.k} {target:g} (its best, {tuning.param} {tuning.value}, "
                   f"reached {tuning.recall:.3f})" if not tuning.reached else
                   f"ivf-sq8 meets recall@{tuning.k} {target:g} only at {tuning.param} {tuning.value}, where one "
                   f"query took {tuning.query_ms:.1f} ms against exact search's {tuning.exact_query_ms:.1f} ms")
            LOG.warning("%d features: %s: the index is exact instead (%.0f MiB of float32 rows)", len(feats), why,
                        feats.nbytes / 2 ** 20)
            return cls._exact(meta, feats, target, note=f"auto: {why}")
        if not tuning.reached:
            LOG.warning("%s: recall@%d %.3f on its own rows at %s %d, below the target %g; %s", kind, tuning.k,
                        tuning.recall, tuning.param, tuning.value, target,
                        "omit --nprobe/--ef-search to let the build choose" if tuning.fixed
                        else "build with --kind auto (exact where nothing else reaches it) or --kind exact")
        return index

    @classmethod
    def _exact(cls, meta: _Meta, feats: np.ndarray, target: Optional[float], note: str = "") -> "GalleryIndex":
        meta.kind, meta.params = "exact", {}
        if target is not None:
            meta.tuning = Tuning(target=target, k=TUNE_K, note=note).to_json()
        return cls(meta, ExactStore.of(feats))

    def _add_tuned(self, feats: np.ndarray, first: int, target: float, values: List[int], seed: int, *,
                   count: int = TUNE_QUERIES, fixed: bool = False, note: str = "",
                   avoid: Optional[np.ndarray] = None) -> Optional["Tuning"]:
        """Add ``feats`` (rows ``first`` on) to the faiss index and choose the first of ``values``
        whose recall reaches ``target`` on ``count`` of them; recorded in the manifest and used
        by :meth:`search` from now on. None when too few rows are left to measure.

        Queries are rows no search structure was trained on (``avoid``: the k-means sample),
        searched leave-one-out; an HNSW graph holds them out until tuned, because a query in
        the graph leads the search to its own neighbours (measured: recall 0.98 for rows in the
        graph where new queries found 0.94)."""
        store = self._store
        held = store.held_out
        local = sample_rows(len(feats), min(count, max(1, len(feats) // 2)) if held else count, seed, avoid)
        rest = np.setdiff1d(np.arange(len(feats)), local) if held else np.arange(len(feats))
        store.add(feats[rest], rest + first)
        present = first + len(rest)
        k = min(TUNE_K, present - (0 if held else 1))
        if k < 1:
            if held:
                store.add(feats[local], local + first)
            return None
        queries, rows = np.ascontiguousarray(feats[local]), local + first

        def rows_of(a: int, b: int) -> np.ndarray:  # rows indexed before: as stored (8-bit codes for sq8)
            old = self.vectors(a, min(b, first)) if a < first else np.zeros((0, self.dimension), np.float32)
            return np.concatenate([old, feats[max(a, first) - first:max(b, first) - first]])

        truth, exact_s = exact_truth(queries, rows, rows_of, first + len(feats), k,
                                     excluded=rows if held else None)
        param = store.param

        def search(q: np.ndarray, want: int, value: int) -> np.ndarray:
            return self.search(q, want, **{param: value})[1]

        def exact_single(q: np.ndarray) -> np.ndarray:  # as the exact kind scans: every stored row
            return exact_truth(q[None], np.array([-1]), rows_of, first + len(feats), k)[0]

        # After an add, old rows are decoded from the index: no fair exact anchor, no speed figure.
        tuning = tune(search, queries, rows, truth, param=param, values=values, target=target,
                      exact_seconds=exact_s, exact_single=exact_single if first == 0 else None,
                      keep_first=first > 0)
        if held:
            store.add(feats[local], local + first)
        tuning.fixed, tuning.note, tuning.sample = fixed, note, count
        self._meta.params[param] = tuning.value
        self._meta.tuning = tuning.to_json()
        return tuning

    def add(self, features: np.ndarray, paths: Sequence[str], *, ids: Optional[Sequence[int]] = None,
            cams: Optional[Sequence[int]] = None, times: Optional[Sequence[int]] = None,
            tags: Optional[Sequence[str]] = None, flip: Optional[bool] = None,
            sources: Sequence[str] = (), weights: Optional[str] = None) -> int:
        """Append rows (in memory; :meth:`save` writes them) and return how many. Rows whose
        path the index already holds (or that repeat a path added with them) are skipped, with
        a warning: adding a features file twice must not double its images' matches. A
        memory-mapped index is copied into memory first. ivf kinds keep the cells they were
        trained with."""
        feats = _check_features(features, paths, "features")
        if feats.shape[1] != self.dimension:
            raise DataError(f"{self._name()}: holds {self.dimension}-d features, the added ones are "
                            f"{feats.shape[1]}-d; add features of the same network, or build a new index")
        if flip is not None and self.flip is not None and flip != self.flip:
            raise DataError(f"{self._name()}: features were embedded with flip {_on(self.flip)}, the added ones "
                            f"with flip {_on(flip)}; embed them again the same way")
        if weights is not None and self.weights is not None and weights != self.weights:
            from ..weights.choice import describe

            raise DataError(f"{self._name()}: features were embedded with {describe(self.weights)}, the added ones "
                            f"with {describe(weights)}; embed them again with the index's weights")
        keep = self._new_rows(paths)
        if len(keep) < len(paths):  # columns of another length are left for _append_column to refuse
            ids, cams, times, tags = (c if c is None or len(c) != len(paths) else [c[i] for i in keep]
                                      for c in (ids, cams, times, tags))
            feats, paths = feats[keep], [paths[i] for i in keep]
        meta = self._meta
        for have, new, name in ((meta.ids, ids, "ids"), (meta.cams, cams, "cams"), (meta.times, times, "times"),
                                (meta.tags, tags, "tags")):  # every check before any change
            _same_presence(have, new, name, self._name())
            if new is not None and len(new) != len(feats):
                raise DataError(f"{name}: {len(new)} values for {len(feats)} features")
        meta.ids = _append_column(meta.ids, ids, len(feats), "ids", self._name())
        meta.cams = _append_column(meta.cams, cams, len(feats), "cams", self._name())
        meta.times = _append_column(meta.times, times, len(feats), "times", self._name())
        if meta.tags is not None:
            meta.tags = meta.tags.extend(_tag_column(tags, len(feats)))
            self._tags = None
        meta.paths = meta.paths.extend(_Paths.from_list(list(paths)))
        meta.flip = meta.flip if meta.flip is not None else flip
        meta.weights = meta.weights if meta.weights is not None else weights
        meta.sources = meta.sources + [os.fspath(s) for s in sources]
        first = len(self) - len(feats)
        if isinstance(self._store, ExactStore):
            self._store.append(feats, first)
        else:
            self._store.own()
            if not (len(feats) and self._recheck(feats, first)):
                self._store.add(feats, np.arange(first, len(self)))
        return len(feats)

    def _recheck(self, feats: np.ndarray, first: int) -> bool:
        """Add ``feats`` checking their recall at the current setting, and choose a larger
        setting where it falls below the target (never a smaller one; a setting given by the
        user is only measured); a warning when none reaches it. False (nothing added) when the
        index keeps no tuning."""
        old = self.tuning
        if old is None or old.param is None:
            return False
        if len(feats) < RECHECK_MIN:
            LOG.info("%s: %d rows added, too few to measure recall on (at least %d at once are checked)",
                     self._name(), len(feats), RECHECK_MIN)
            return False
        store = self._store
        unmapped = isinstance(store, IvfStore) and not store.direct_map()
        values = [old.value] if old.fixed else [old.value, *ladder(old.value + 1, store.ladder_limit(self._meta.params))]
        tuning = self._add_tuned(feats, first, old.target, values, int(self._meta.params.get("seed", 0)),
                                 count=old.sample, fixed=old.fixed,
                                 note="checked on the rows added last, against the rows stored before as stored "
                                 "(8-bit codes for sq8)")
        if unmapped and store.direct_map():  # made by vectors(); saved as a build writes it
            store.drop_direct_map()
        if tuning is None:
            return True
        if tuning.value != old.value:
            LOG.warning("%s: recall@%d on the added rows fell below %g at %s %d: searches now use %s %d (recall %.3f)",
                        self._name(), tuning.k, old.target, old.param, old.value, old.param, tuning.value,
                        tuning.recall)
        if not tuning.reached:
            LOG.warning("%s: recall@%d %.3f on the added rows at %s %d, below the target %g; rebuild the index so "
                        "that its cells fit the new rows (vehiclenet index build)", self._name(), tuning.k,
                        tuning.recall, old.param, tuning.value, old.target)
        else:
            LOG.info("%s: recall@%d %.3f on %d added rows at %s %d (target %g)", self._name(), tuning.k,
                     tuning.recall, tuning.queries, old.param, tuning.value, old.target)
        return True

    def _new_rows(self, paths: Sequence[str]) -> List[int]:
        """Rows of ``paths`` to add: those whose path is neither held nor earlier in ``paths``
        (the skipped ones are logged)."""
        seen = set(self._meta.paths.encoded())
        keep, skipped = [], []
        for i, p in enumerate(paths):
            key = os.fsencode(p) if not isinstance(p, bytes) else p
            (skipped if key in seen else keep).append(i)
            seen.add(key)
        if skipped:
            shown = ", ".join(str(paths[i]) for i in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            LOG.warning("%s: %d of %d added row(s) skipped: their paths are already in the index (%s)",
                        self._name(), len(skipped), len(paths), shown)
        return keep

    # ------------------------------------------------------------------ searching

    def search(self, queries: np.ndarray, k: int, *, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Cosine distances (1 - cos, float32) and rows (int64) of the ``k`` nearest rows per query.

        Both (Q, min(k, N)), ascending distance; the exact kind breaks ties by row (and
        gives :func:`vehiclenet.retrieval.exact.nearest`'s rows). The ivf kinds search ``nprobe`` cells,
        the hnsw kind keeps ``ef_search`` candidates (at least k; defaults: the index's); where
        fewer than k rows are found, rows are -1 and distances inf.
        ``allowed`` (N booleans) restricts the search to those rows, inside the index: the exact
        kind gives the exact top-k of the allowed rows; the approximate kinds search 1/share
        times the cells (candidates), at most all of them, where the allowed rows are a share
        of the gallery, so that a filtered top-k is as complete as an unfiltered one.
        Raises DataError when the queries' dimension is not the index's.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            width = q.shape[-1] if q.ndim else 0
            raise DataError(f"{self._name()}: holds {self.dimension}-d features, the queries are {width}-d; search "
                            f"with features of the network the index was built with, or rebuild the index")
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self))
        share = 1.0
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool).reshape(-1)
            if len(allowed) != len(self):
                raise UsageError(f"allowed: {len(allowed)} values for the {len(self)} rows of {self._name()}")
            share = float(np.count_nonzero(allowed)) / len(self)
            if share == 0.0:
                return np.full((len(q), k), np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        value = nprobe if self._store.param == "nprobe" else ef_search if self._store.param else None
        return self._store.search(q, k, allowed, share, value, self._meta.params, len(self))

    def vectors(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Stored rows ``start:stop`` as float32 (the sq8 kinds give the decoded, quantised rows)."""
        stop = len(self) if stop is None else min(stop, len(self))
        return self._store.rows(start, stop, self.dimension)

    def search_self(self, k: int, *, batch: int = 4096, nprobe: Optional[int] = None,
                    ef_search: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with the index's own rows as queries (each row usually finds itself
        first): (N, min(k, N)) distances and rows, computed ``batch`` rows at a time."""
        parts = [self.search(self.vectors(s, s + batch), k, nprobe=nprobe, ef_search=ef_search)
                 for s in range(0, len(self), batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ------------------------------------------------------------------ saving

    def save(self, path: PathLike) -> Path:
        """Write the index to ``path`` atomically (a temporary file renamed into place)."""
        from ..fileio import atomic_write

        parts = self._parts()
        with atomic_write(path) as fh:
            _write_container(fh, self._manifest(), parts)
        return Path(path)

    def _parts(self) -> Dict[str, np.ndarray]:
        meta = self._meta
        parts: Dict[str, np.ndarray] = self._store.parts()
        parts["path_bytes"] = np.asarray(meta.paths.data)
        parts["path_offsets"] = np.asarray(meta.paths.offsets)
        if meta.ids is not None:
            parts["ids"] = np.asarray(meta.ids)
        if meta.cams is not None:
            parts["cams"] = np.asarray(meta.cams)
        if meta.times is not None:
            parts["times"] = np.asarray(meta.times)
        if meta.tags is not None:
            parts["tag_bytes"] = np.asarray(meta.tags.data)
            parts["tag_offsets"] = np.asarray(meta.tags.offsets)
        return parts

    def _manifest(self) -> Dict[str, Any]:
        meta = self._meta
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "vehiclenet": __version__,
                "faiss": _faiss_version(), "kind": meta.kind, "dimension": meta.dimension, "count": len(self),
                "params": meta.params, "flip": meta.flip, "sources": meta.sources, "weights": meta.weights,
                "tuning": meta.tuning}

    def _name(self) -> str:
        return self.source or "the gallery index"


# ---------------------------------------------------------------------- helpers: building


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _check_features(features: np.ndarray, paths: Sequence[str], what: str) -> np.ndarray:
    from ..embedding.checks import checked_features

    feats = np.ascontiguousarray(checked_features(features, what))
    if feats.shape[0] != len(paths):
        raise DataError(f"{what}: shape {feats.shape} does not match {len(paths)} paths")
    return feats


def _optional_column(values: Optional[Sequence[int]], n: int, name: str) -> Optional[np.ndarray]:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.shape[0] != n:
        raise DataError(f"{name}: {arr.shape[0]} values for {n} features")
    return arr


def _tag_column(tags: Optional[Sequence[str]], n: int) -> "Optional[_Paths]":
    if tags is None:
        return None
    values = [str(t) for t in tags]
    if len(values) != n:
        raise DataError(f"tags: {len(values)} values for {n} features")
    return _Paths.from_list(values)


def _same_presence(have: Any, new: Any, name: str, where: str) -> None:
    """Added rows carry a column exactly when the index stores it (else rows would misalign)."""
    if (have is None) != (new is None):
        stored = "stores" if have is not None else "does not store"
        raise DataError(f"{where}: the index {stored} {name}; the added features must "
                        f"{'have' if have is not None else 'not have'} them too (key {name!r} of the features file, "
                        f"or from --meta)")


def _append_column(have: Optional[np.ndarray], new: Optional[Sequence[int]], n: int, name: str,
                   where: str) -> Optional[np.ndarray]:
    _same_presence(have, new, name, where)
    if have is None:
        return None
    return np.concatenate([np.asarray(have), _optional_column(new, n, name)])


def _faiss_version() -> Optional[str]:
    try:
        return faiss_module().__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------- the file


def _write_container(fh: Any, manifest: Dict[str, Any], parts: Dict[str, np.ndarray]) -> None:
    fh.write(b"\0" * _HEADER_SIZE)
    offset = _HEADER_SIZE
    described = {}
    for name, arr in parts.items():
        pad = -offset % _ALIGN
        fh.write(b"\0" * pad)
        offset += pad
        digest = hashlib.sha256()
        flat = np.ascontiguousarray(arr).reshape(-1)
        step = max(1, (64 * 2 ** 20) // max(1, flat.itemsize))
        for i in range(0, len(flat), step):  # in slices: a memory-mapped part is never copied whole
            chunk = flat[i:i + step].tobytes()
            digest.update(chunk)
            fh.write(chunk)
        described[name] = {"offset": offset, "length": int(flat.nbytes), "dtype": flat.dtype.str,
                           "shape": list(arr.shape), "sha256": digest.hexdigest()}
        offset += int(flat.nbytes)
    body = json.dumps({**manifest, "parts": described}, indent=1, sort_keys=True).encode("utf-8")
    fh.write(body)
    fh.seek(0)
    fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, offset, len(body), hashlib.sha256(body).digest()))
    fh.flush()


def is_index_file(path: PathLike) -> bool:
    """True when ``path`` is a file starting with a gallery index's magic bytes."""
    try:
        with open(open_regular(path, os.O_RDONLY, follow=True), "rb") as fh:  # a FIFO must not block
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _rebuild_hint(name: str, manifest: Optional[Dict[str, Any]] = None) -> str:
    sources = " ".join((manifest or {}).get("sources") or []) or "FEATURES.npz..."
    return f"rebuild it: vehiclenet index build {sources} --out {name}"


def _read_manifest(name: str, mm: np.ndarray) -> Dict[str, Any]:
    size = len(mm)
    if size < len(MAGIC) or bytes(mm[:len(MAGIC)]) != MAGIC:
        what = "a features .npz (a zip file)" if bytes(mm[:2]) == b"PK" else "something else"
        raise DataError(f"{name}: not a vehiclenet gallery index (it is {what}); build one with "
                        f"`vehiclenet index build FEATURES.npz... --out INDEX`")
    if size < _HEADER.size:
        raise DataError(f"{name}: truncated ({size} bytes, not even the header); copy it again or "
                        + _rebuild_hint(name))
    _, version, _, offset, length, digest = _HEADER.unpack(bytes(mm[:_HEADER.size]))
    if version != FORMAT_VERSION:
        raise DataError(f"{name}: index file format {version}, this vehiclenet {__version__} reads format "
                        f"{FORMAT_VERSION}; " + _rebuild_hint(name))
    if offset + length > size or offset < _HEADER_SIZE:
        raise DataError(f"{name}: truncated ({size} bytes, the header promises {offset + length}); the write or "
                        "copy was cut short: copy it again or " + _rebuild_hint(name))
    if offset + length < size:
        raise DataError(f"{name}: {size - offset - length} bytes after the end of the index (its manifest ends at "
                        f"byte {offset + length}): appended to or damaged; copy it again or " + _rebuild_hint(name))
    body = bytes(mm[offset:offset + length])
    if hashlib.sha256(body).digest() != digest:
        raise DataError(f"{name}: damaged (its manifest does not match its sha256); " + _rebuild_hint(name))
    manifest = json.loads(body.decode("utf-8"))
    if not isinstance(manifest, dict):
        raise DataError(f"{name}: not a vehiclenet gallery index (its manifest is a JSON {type(manifest).__name__})")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{name}: not a vehiclenet gallery index (format {manifest.get('format')!r})")
    if manifest.get("vehiclenet") != __version__:
        raise DataError(f"{name}: built by vehiclenet {manifest.get('vehiclenet')}, this is vehiclenet {__version__}; "
                        + _rebuild_hint(name, manifest))
    _check_layout(name, manifest, offset)
    return manifest


# Each part: its dtype and, given (count, dimension), its shape (None: any length, 1-D).
_PART_LAYOUT = {
    "vectors": ("<f4", lambda n, d: (n, d)),
    "faiss": ("|u1", None),
    "path_bytes": ("|u1", None),
    "path_offsets": ("<i8", lambda n, d: (n + 1,)),
    "ids": ("<i8", lambda n, d: (n,)),
    "cams": ("<i8", lambda n, d: (n,)),
    "times": ("<i8", lambda n, d: (n,)),
    "tag_bytes": ("|u1", None),
    "tag_offsets": ("<i8", lambda n, d: (n + 1,)),
}
_LIMIT = 2 ** 31 - 1  # counts and search parameters faiss takes as C int


def _check_layout(name: str, manifest: Dict[str, Any], end: int) -> None:
    """Every part where it fits (after the header, before the manifest), of its kind's dtype and
    of the shape the manifest's count and dimension give; tuning parameters within faiss's range.
    Hashes prove only that nothing changed since writing, not that what was written fits."""
    def bad(what: str) -> DataError:
        return DataError(f"{name}: damaged ({what}); " + _rebuild_hint(name, manifest))

    count, dimension, parts = manifest.get("count"), manifest.get("dimension"), manifest.get("parts")
    if not all(isinstance(v, int) and 0 <= v <= _LIMIT for v in (count, dimension)) or not isinstance(parts, dict):
        raise bad("count, dimension or parts missing or out of range")
    needed = {"path_bytes", "path_offsets", "vectors" if manifest.get("kind") == "exact" else "faiss"}
    if not needed <= set(parts) or not set(parts) <= set(_PART_LAYOUT) - ({"vectors", "faiss"} - needed):
        raise bad(f"parts {sorted(parts)}, a {manifest.get('kind')!r} index has {sorted(needed)} (and ids, cams, "
                  "times, tags)")
    if ("tag_bytes" in parts) != ("tag_offsets" in parts):
        raise bad("tags stored without their offsets, or offsets without tags")
    for key, desc in parts.items():
        dtype, shape_of = _PART_LAYOUT[key]
        shape = desc.get("shape") if isinstance(desc, dict) else None
        if not (isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape)
                and desc.get("dtype") == dtype and (len(shape) == 1 if shape_of is None
                                                    else tuple(shape) == shape_of(count, dimension))):
            got = f"{desc.get('dtype')} of shape {shape}" if isinstance(desc, dict) else repr(desc)
            raise bad(f"part {key} is {got}, not {dtype} of shape "
                      f"{'(any,)' if shape_of is None else shape_of(count, dimension)}")
        start, length = desc.get("offset"), desc.get("length")
        if not (isinstance(start, int) and isinstance(length, int) and _HEADER_SIZE <= start
                and start + length <= end and length == int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize):
            raise bad(f"part {key} at byte {start}, {length} bytes, does not fit its shape or the file")
    params = manifest.get("params") or {}
    if not isinstance(params, dict):
        raise bad(f"search parameters are a {type(params).__name__}, not an object")
    for key, value in params.items():
        if key != "seed" and not (isinstance(value, int) and 1 <= value <= _LIMIT):
            raise bad(f"search parameter {key} is {value!r}, not a whole number from 1 to {_LIMIT}")


def _part(name: str, mm: np.ndarray, manifest: Dict[str, Any], key: str, verify: bool) -> Optional[np.ndarray]:
    desc = manifest["parts"].get(key)
    if desc is None:
        return None
    start, length = int(desc["offset"]), int(desc["length"])
    if start + length > len(mm):
        raise DataError(f"{name}: truncated (part {key} ends at byte {start + length}, the file has {len(mm)}); "
                        "copy it again or " + _rebuild_hint(name, manifest))
    raw = mm[start:start + length]
    if verify:
        digest = hashlib.sha256()
        for i in range(0, length, 64 * 2 ** 20):
            digest.update(raw[i:i + 64 * 2 ** 20])
        if digest.hexdigest() != desc["sha256"]:
            raise DataError(f"{name}: damaged (part {key} does not match its sha256); copy it again or "
                            + _rebuild_hint(name, manifest))
    return raw.view(np.dtype(desc["dtype"])).reshape(desc["shape"])


def load_index(path: PathLike, *, verify: bool = True, mmap: bool = True) -> GalleryIndex:
    """Read an index written by :meth:`GalleryIndex.save`, memory-mapped unless ``mmap=False``.

    ``verify`` checks every part against its recorded sha256 (reads the whole file once).
    Raises DataError (naming the file and what to do) for a missing, truncated, damaged or
    foreign file, or one built by another vehiclenet version.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise DataError(f"{name}: a folder, not a gallery index file")
    if os.path.exists(name) and not os.path.isfile(name):
        raise DataError(f"{name}: {describe_mode(os.stat(name).st_mode)}, not a gallery index file; give the path "
                        "of one")
    if not os.path.isfile(name):
        raise DataError(f"{name}: no such index file; build one with `vehiclenet index build FEATURES... --out {name}`")
    if os.path.getsize(name) == 0:
        raise DataError(f"{name}: empty file, not a gallery index; " + _rebuild_hint(name))
    mm = np.memmap(name, dtype=np.uint8, mode="r")
    if not mmap:
        mm = np.array(mm)
    try:
        manifest = _read_manifest(name, mm)
        return _from_parts(name, mm, manifest, verify)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: damaged gallery index ({type(exc).__name__}: {exc}); "
                        + _rebuild_hint(name)) from None


def _from_parts(name: str, mm: np.ndarray, manifest: Dict[str, Any], verify: bool) -> GalleryIndex:
    parts = {key: _part(name, mm, manifest, key, verify) for key in manifest["parts"]}
    weights = manifest.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"'weights' is a {type(weights).__name__}, not a string")
    offsets = parts["path_offsets"]
    for key in ("path", "tag"):
        data, offs = parts.get(f"{key}_bytes"), parts.get(f"{key}_offsets")
        if offs is not None and (offs[0] != 0 or offs[-1] != len(data) or (np.diff(offs) < 0).any()):
            raise DataError(f"{name}: damaged ({key} offsets run outside the stored {key}s); "
                            + _rebuild_hint(name, manifest))
    tags = None if "tag_bytes" not in parts else _Paths(parts["tag_bytes"], parts["tag_offsets"])
    meta = _Meta(kind=manifest["kind"], dimension=int(manifest["dimension"]),
                 paths=_Paths(parts["path_bytes"], offsets), ids=parts.get("ids"),
                 cams=parts.get("cams"), times=parts.get("times"), tags=tags, params=dict(manifest.get("params") or {}), flip=manifest.get("flip"),
                 sources=list(manifest.get("sources") or []), weights=weights,
                 tuning=None if manifest.get("tuning") is None else Tuning.from_json(manifest["tuning"]).to_json())
    if len(meta.paths) != int(manifest["count"]):
        raise DataError(f"{name}: damaged (manifest says {manifest['count']} rows, {len(meta.paths)} paths stored); "
                        + _rebuild_hint(name, manifest))
    store = STORES[meta.kind].from_parts(parts, mm if isinstance(mm, np.memmap) else None)
    if not isinstance(store, ExactStore) and (store.index.ntotal != len(meta.paths) or store.index.d != meta.dimension):
        raise DataError(f"{name}: damaged (faiss index of {store.index.ntotal} x {store.index.d}, manifest "
                        f"{len(meta.paths)} x {meta.dimension}); " + _rebuild_hint(name, manifest))
    return GalleryIndex(meta, store, source=name)


# ---------------------------------------------------------------------- from features files


def _feature_sources(path: PathLike) -> List[str]:
    """The features sources ``path`` stands for: itself (a file, or a chunk folder of
    ``vehiclenet embed --out-dir``, read and verified as one), or a folder's ``*.npz`` files
    sorted by name."""
    from ..embedding.shards import MANIFEST

    name = os.fspath(path)
    if not os.path.isdir(name) or os.path.exists(os.path.join(name, MANIFEST)):
        return [name]
    files = sorted(str(p) for p in Path(name).glob("*.npz") if p.is_file())
    if not files:
        raise DataError(f"{name}: folder holds no features .npz files and no {MANIFEST}; give files written by "
                        "`vehiclenet embed --out` or a folder written by `vehiclenet embed --out-dir`")
    return files


@dataclass
class _Loaded:
    features: np.ndarray
    paths: List[str]
    ids: Optional[np.ndarray]
    cams: Optional[np.ndarray]
    times: Optional[np.ndarray]
    tags: Optional[List[str]]
    flip: Optional[bool]
    sources: List[str]
    weights: Optional[str]


def read_feature_sources(inputs: Sequence[PathLike]) -> _Loaded:
    """Features, paths, ids/cams (keys ``ids``/``cams`` when every file has them), flip and
    weights of features files and folders, concatenated in the order given."""
    from ..embedding.checks import stored_flag
    from ..embedding.files import load_features
    from ..weights.choice import describe, stored_identity

    files = [f for item in inputs for f in _feature_sources(item)]
    feats, paths, ids, cams, times, tags, flips, weights = [], [], [], [], [], [], [], {}
    for f in files:
        res = load_features(f)
        if feats and res.features.shape[1] != feats[0].shape[1]:
            raise DataError(f"{f}: {res.features.shape[1]}-d features, {files[0]} has {feats[0].shape[1]}-d; "
                            "index features of one network only")
        feats.append(res.features)
        paths.extend(res.paths)
        ids.append(_labels(res.extra, "ids", len(res.paths), f))
        cams.append(_labels(res.extra, "cams", len(res.paths), f))
        times.append(_labels(res.extra, "times", len(res.paths), f))
        tags.append(_tags(res.extra, len(res.paths), f))
        flips.append(stored_flag(res.extra, "flip", f))
        identity = stored_identity(res.extra, f)
        if identity is not None:
            weights.setdefault(identity, f)
    known = {fl for fl in flips if fl is not None}
    if len(known) > 1:
        raise DataError(f"{', '.join(files)}: some were embedded with flip on, some with flip off; "
                        "embed them again the same way")
    if len(weights) > 1:
        (first, a), (second, b) = list(weights.items())[:2]
        raise DataError(f"{a} was embedded with {describe(first)}, {b} with {describe(second)}: features of two "
                        "networks cannot share an index; embed them again with the same weights")
    joined_tags = None if any(t is None for t in tags) else [t for part in tags for t in part]
    return _Loaded(np.concatenate(feats), paths, _joined(ids), _joined(cams), _joined(times), joined_tags,
                   known.pop() if known else None, files, next(iter(weights), None))


def _with_meta(loaded: _Loaded, source: Optional[str]) -> _Loaded:
    """``loaded`` with the columns ``source`` gives (the others as the features files had them)."""
    if source is None:
        return loaded
    from ..embedding.metadata import read_meta

    meta = read_meta(source, loaded.paths)
    for key in ("cams", "times", "tags"):
        if getattr(meta, key) is not None:
            setattr(loaded, key, getattr(meta, key))
    return loaded


def _tags(extra: Dict[str, Any], n: int, where: PathLike) -> Optional[List[str]]:
    if "tags" not in extra:
        return None
    values = np.asarray(extra["tags"])
    if values.ndim != 1 or len(values) != n or values.dtype.kind not in "US":
        raise DataError(f"{where}: tags must be {n} strings, one per row of features (got {values.dtype} of shape "
                        f"{values.shape})")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist()]


def _labels(extra: Dict[str, Any], key: str, n: int, where: PathLike) -> Optional[np.ndarray]:
    from ..embedding.checks import as_labels

    if key not in extra:
        return None
    try:
        return as_labels(key, extra[key], n)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}, one per row of features") from None


def _joined(columns: List[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    if any(c is None for c in columns):
        return None
    return np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for c in columns])


def build_index(inputs: Sequence[PathLike], *, kind: str = "auto", nlist: Optional[int] = None,
                nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                target_recall: Optional[float] = TARGET_RECALL, tune_queries: int = TUNE_QUERIES,
                meta: Optional[str] = None) -> GalleryIndex:
    """A :class:`GalleryIndex` of the features files and folders ``inputs`` (in that order),
    its search settings tuned for ``target_recall`` (see :meth:`GalleryIndex.build`); ``meta``
    a metadata source of :func:`vehiclenet.embedding.metadata.read_meta` for the rows' cameras, times, tags."""
    loaded = _with_meta(read_feature_sources(inputs), meta)
    return GalleryIndex.build(loaded.features, loaded.paths, ids=loaded.ids, cams=loaded.cams, times=loaded.times,
                              tags=loaded.tags, kind=kind,
                              nlist=nlist, nprobe=nprobe, ef_search=ef_search, flip=loaded.flip,
                              sources=loaded.sources, weights=loaded.weights, target_recall=target_recall,
                              tune_queries=tune_queries)


def add_to_index(index: GalleryIndex, inputs: Sequence[PathLike], *, meta: Optional[str] = None) -> int:
    """Append the features of ``inputs`` (metadata from ``meta``, as :func:`build_index`) to
    ``index``; returns how many rows were added."""
    loaded = _with_meta(read_feature_sources(inputs), meta)
    return index.add(loaded.features, loaded.paths, ids=loaded.ids, cams=loaded.cams, times=loaded.times,
                     tags=loaded.tags, flip=loaded.flip,
                     sources=loaded.sources, weights=loaded.weights)


def index_neighbours(kind: str = "exact", *, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                     ef_search: Optional[int] = None) -> Callable[[np.ndarray, int], np.ndarray]:
    """A neighbour source for :func:`vehiclenet.retrieval.rerank.re_rank_blocks`: each item's ``k``
    nearest items, found by searching a :class:`GalleryIndex` of ``kind`` built over the
    features it is given (query + gallery).

    ``"exact"`` gives the same lists as brute force (the re-ranking then equals the default
    one); the approximate kinds give approximate re-ranking. Each item is put first in its
    own list (as its distance 0 puts it in exact search), even when quantised distances or
    unprobed cells would not. ValueError when the index finds fewer than ``k`` items for some
    row (search more cells: a larger ``nprobe``).
    """
    if kind not in KINDS or kind == "auto":
        raise UsageError(f"neighbour index kind {kind!r}: choose one of {', '.join(k for k in KINDS if k != 'auto')}")

    def source(feats: np.ndarray, k: int) -> np.ndarray:
        n = feats.shape[0]
        index = GalleryIndex.build(feats, [str(i) for i in range(n)], kind=kind, nlist=nlist, nprobe=nprobe,
                                   ef_search=ef_search, target_recall=None)
        rows = index.search_self(k)[1]
        if (rows < 0).any():
            raise ValueError(f"the {kind} index found fewer than {k} neighbours for "
                             f"{int((rows < 0).any(axis=1).sum())} of {n} items; search more cells (nprobe)")
        return _self_first(rows)

    return source


def _self_first(rows: np.ndarray) -> np.ndarray:
    """Rows with item i at position 0 of row i, the others in their order (the last dropped
    when i was missing)."""
    out = rows.copy()
    for i in np.flatnonzero(rows[:, 0] != np.arange(rows.shape[0])):  # few: an item is usually its own nearest
        others = rows[i][rows[i] != i]
        out[i, 0] = i
        out[i, 1:] = others[: rows.shape[1] - 1]
    return out
