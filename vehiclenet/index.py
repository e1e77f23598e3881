"""Persisted gallery indexes: features of millions of gallery images, searched by cosine distance.

A :class:`GalleryIndex` holds L2-normalised features (rows, in the order they were given),
the path of each row's image and optionally vehicle ids and camera ids. ``search(queries, k)``
returns cosine distances (1 - cos) and row numbers, best first.

Kinds (``kind=``):

* ``"exact"``: brute force on the stored float32 matrix with vehiclenet/blas.py (scipy's
  OpenBLAS, fixed tiles). Rows equal :func:`vehiclenet.features.nearest`'s for every query
  and any BLAS kernel or query batch, ties in gallery order (a batched product finds the
  candidates within a proven rounding bound of the k-th best, and near-ties are settled with
  ``nearest``'s own bits: see :func:`_exact_search`); a single query gives ``nearest``'s
  distance bits too. faiss's own flat search was measured beside it (100,000 x 512, 1,000
  queries, AMD EPYC 2 cores: faiss 156, blas.py 137 GFLOP/s), but faiss-cpu 1.15.1 bundles
  OpenBLAS 0.3.15, which ran at 20 GFLOP/s on a Sapphire Rapids Xeon that scipy's OpenBLAS
  drives at ~200, and faiss returns only the top k, not the scores the bound needs.
* ``"ivf-sq8"``: faiss IndexIVFScalarQuantizer, 8 bits per dimension (4x smaller than
  float32), inner product, residuals encoded. ``nlist`` (default: the power of two nearest
  sqrt(N), at most N/39 so every centroid trains on 39 points) coarse cells, ``nprobe``
  (default ``NPROBE`` = 64) of them searched per query. Distances are the quantised ones.
* ``"ivf-flat"``: the same cells with float32 vectors (exact distances, 4x the size).
* ``"hnsw-sq8"``: faiss IndexHNSWSQ (M 32, efConstruction 40, efSearch 64 by default) over
  8-bit codes. Its graph is built on faiss's threads, so two builds may differ slightly.

``"auto"`` (the default) is exact up to ``AUTO_EXACT_MAX`` rows and ivf-sq8 beyond. Measured
with benchmarks/index_speed.py on 1,000,000 synthetic 512-d features, 20 images per identity
(cos ~0.55 between them), AMD EPYC, 2 cores, one run each; exact brute force in the same run:
~180 ms a single query, 30 queries/s batched, 3.7 GB peak RSS with the gallery in memory.

* Identities grouped around 1,000 vehicle "models" (spread 1.5), ivf-sq8, nlist 1024: build
  21 s, 524 MiB on disk, search process peak RSS 974 MiB (memory-mapped, sha256 checked on
  load in 0.4 s); recall@10 0.962 / 0.972 / 0.979 / 0.983 at nprobe 8 / 32 / 64 / 128,
  p50 0.5 / 1.6 / 3.2 / 6.3 ms a query (p99 1.0 / 2.0 / 3.7 / 7.1 ms), 1,000-query batches
  4,000 / 1,217 / 663 / 328 queries/s.
* Identities spread evenly (spread 3: within-identity variation isotropic in 512-d, no
  coarser structure, the hardest case): ivf-sq8 recall@10 0.51 / 0.74 / 0.86 / 0.94 at
  nprobe 16 / 64 / 128 / 256 (p50 0.9 / 3.6 / 7.3 / 14.6 ms); ivf-flat the same recall (the
  cells decide it, not the codes) at 4x the size (1,989 MiB, search RSS 2.4 GB); hnsw-sq8
  0.32 / 0.63 / 0.75 / 0.82 at efSearch 16 / 64 / 128 / 256 (p50 0.2 / 0.6 / 1.3 / 1.9 ms),
  but its build took 298 s (13x ivf-sq8's 23 s) and its recall levels off where ivf's keeps
  rising with nprobe towards exact.

So ivf-sq8 is the default beyond 50,000 rows (fast, deterministic build; recall bought with
nprobe), with nprobe 64: above 0.95 recall at 3 ms where features cluster, and a setting to
raise (``nprobe=`` / ``--nprobe``) where they do not. HNSW with float32 vectors was not kept:
it would hold 2 GB of vectors besides the graph at 1M rows.

File format (one file, ``FORMAT_VERSION``): a 64-byte header (magic ``VNGIDX``, format
version, offset/length/sha256 of the manifest), the parts at 4096-byte aligned offsets, the
JSON manifest last. The manifest records the package version, faiss version, kind,
dimension, count, parameters, the source files and each part's offset, length and sha256.
Parts: ``vectors`` (exact: float32 rows) or ``faiss`` (a serialised faiss index),
``path_bytes``/``path_offsets`` (UTF-8 paths), optional ``ids``/``cams`` (int64).
Loading memory-maps the file: exact vectors as a numpy memmap, faiss indexes through
faiss's zero-copy reader (``IO_FLAG_MMAP_IFC``), so the kernel pages them in on demand.
Writing goes to a private temporary file renamed into place (vehiclenet/fileio.py).
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

from . import __version__
from .errors import DataError, UsageError
from .fileio import describe_mode, open_regular

__all__ = ["AUTO_EXACT_MAX", "GalleryIndex", "KINDS", "NPROBE", "add_to_index", "build_index", "index_neighbours",
           "is_index_file", "load_index", "read_feature_sources"]

LOG = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf-sq8", "ivf-flat", "hnsw-sq8")
#: Largest gallery "auto" searches exactly: one exact query over 50,000 x 512 took 10-13 ms on
#: 2 cores (memory bound), about the 10 ms target; beyond that ivf-sq8 stays near 3 ms.
AUTO_EXACT_MAX = 50_000
#: Default cells searched per query (measured at 1M rows: see the module docstring).
NPROBE = 64
#: HNSW: neighbours per node, candidate list while building, default candidate list searching.
HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 64

FORMAT = "vehiclenet-gallery-index"
FORMAT_VERSION = 1
MAGIC = b"VNGIDX\x00\x01"
_HEADER = struct.Struct("<8sIIQQ32s")  # magic, format version, reserved, manifest offset, length, sha256
_HEADER_SIZE = 64
_ALIGN = 4096
_NEAREST_TILE = 4096  # the tile rows of vehiclenet.features.nearest, whose bits exact search reproduces
_SCORE_BYTES = 256 * 2 ** 20  # similarity block held at once by exact search

PathLike = Union[str, os.PathLike]


def _faiss():
    # faiss's loader logs each CPU-specific build it tries (INFO); only its problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


@dataclass
class _Meta:
    """Everything about an index but its vectors."""

    kind: str
    dimension: int
    paths: "_Paths"
    ids: Optional[np.ndarray] = None
    cams: Optional[np.ndarray] = None
    params: Dict[str, Any] = field(default_factory=dict)
    flip: Optional[bool] = None
    sources: List[str] = field(default_factory=list)
    weights: Optional[str] = None  # vehiclenet.weights identity of the network that embedded the rows


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

    def __init__(self, meta: _Meta, vectors: Optional[np.ndarray] = None, faiss_index: Any = None,
                 source: Optional[str] = None, keep_alive: Any = None) -> None:
        self._meta = meta
        self._vectors = vectors  # exact kind: (N, D) float32, possibly a read-only memmap
        self._faiss = faiss_index  # ivf kinds
        self._keep_alive = keep_alive  # the memmap a zero-copy faiss index points into
        self.source = source  # the file it was loaded from, named in errors
        self._norm: Optional[float] = None  # largest row norm (exact kind), for the rounding bound

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
        """Identity of the weights that embedded the features (:mod:`vehiclenet.weights`); None if unknown."""
        return self._meta.weights

    @property
    def ids(self) -> Optional[np.ndarray]:
        return self._meta.ids

    @property
    def cams(self) -> Optional[np.ndarray]:
        return self._meta.cams

    @property
    def sources(self) -> List[str]:
        return list(self._meta.sources)

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
              cams: Optional[Sequence[int]] = None, kind: str = "auto", nlist: Optional[int] = None,
              nprobe: Optional[int] = None, ef_search: Optional[int] = None, flip: Optional[bool] = None,
              sources: Sequence[str] = (), seed: int = 0, weights: Optional[str] = None) -> "GalleryIndex":
        """An index of ``features`` (N, D) L2-normalised float32, row i belonging to ``paths[i]``.

        ``kind``: ``"auto"`` (exact up to :data:`AUTO_EXACT_MAX` rows), ``"exact"``, ``"ivf-sq8"``,
        ``"ivf-flat"`` or ``"hnsw-sq8"``; ``nlist``/``nprobe`` tune the ivf kinds, ``ef_search`` the
        hnsw kind (default searches; a search can ask for others); ``seed`` fixes the training sample;
        ``flip`` and ``weights`` record how the features were embedded.
        """
        feats = _check_features(features, paths, "features")
        if kind not in KINDS:
            raise UsageError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        for option, value in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and not 1 <= value <= _LIMIT:
                raise UsageError(f"{option} must be from 1 to {_LIMIT} (faiss takes a C int), got {value}")
        if len(feats) == 0:
            raise DataError("no features to index")
        if kind == "auto":
            kind = "exact" if len(feats) <= AUTO_EXACT_MAX else "ivf-sq8"
        meta = _Meta(kind=kind, dimension=int(feats.shape[1]), paths=_Paths.from_list(list(paths)),
                     ids=_optional_column(ids, len(feats), "ids"), cams=_optional_column(cams, len(feats), "cams"),
                     flip=flip, sources=[os.fspath(s) for s in sources], weights=weights)
        if kind == "exact":
            return cls(meta, vectors=np.array(feats, dtype=np.float32, order="C"))
        if kind == "hnsw-sq8":
            index = _train_hnsw(feats, seed)
            meta.params = {"M": HNSW_M, "ef_construction": EF_CONSTRUCTION, "ef_search": int(ef_search or EF_SEARCH),
                           "seed": seed}
        else:
            index = _train_ivf(feats, kind, nlist, seed)
            meta.params = {"nlist": int(index.nlist), "nprobe": int(nprobe or min(NPROBE, index.nlist)),
                           "seed": seed}
        index.add(feats)
        return cls(meta, faiss_index=index)

    def add(self, features: np.ndarray, paths: Sequence[str], *, ids: Optional[Sequence[int]] = None,
            cams: Optional[Sequence[int]] = None, flip: Optional[bool] = None,
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
            from .weights import describe

            raise DataError(f"{self._name()}: features were embedded with {describe(self.weights)}, the added ones "
                            f"with {describe(weights)}; embed them again with the index's weights")
        keep = self._new_rows(paths)
        if len(keep) < len(paths):  # columns of another length are left for _append_column to refuse
            ids, cams = (c if c is None or len(c) != len(paths) else np.asarray(c)[keep] for c in (ids, cams))
            feats, paths = feats[keep], [paths[i] for i in keep]
        meta = self._meta
        meta.ids = _append_column(meta.ids, ids, len(feats), "ids", self._name())
        meta.cams = _append_column(meta.cams, cams, len(feats), "cams", self._name())
        meta.paths = meta.paths.extend(_Paths.from_list(list(paths)))
        meta.flip = meta.flip if meta.flip is not None else flip
        meta.weights = meta.weights if meta.weights is not None else weights
        meta.sources = meta.sources + [os.fspath(s) for s in sources]
        if self.kind == "exact":
            self._vectors = np.concatenate([np.asarray(self._vectors), feats]).astype(np.float32, copy=False)
            self._norm = None
        else:
            if self._keep_alive is not None:  # zero-copy from a read-only map: faiss must own its lists to grow
                self._faiss = _faiss().deserialize_index(np.array(_serialise(self._faiss)))
                self._keep_alive = None
            self._faiss.add(feats)
        return len(feats)

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
               ef_search: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Cosine distances (1 - cos, float32) and rows (int64) of the ``k`` nearest rows per query.

        Both (Q, min(k, N)), ascending distance; the exact kind breaks ties by row (and
        gives :func:`vehiclenet.features.nearest`'s rows). The ivf kinds search ``nprobe`` cells,
        the hnsw kind keeps ``ef_search`` candidates (at least k; defaults: the index's); where
        fewer than k rows are found, rows are -1 and distances inf.
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
        if self.kind == "exact":
            if self._norm is None:
                self._norm = _max_norm(self._vectors)
            return _exact_search(self._vectors, q, k, self._norm)
        if self.kind == "hnsw-sq8":
            ef = max(k, int(ef_search or self._meta.params.get("ef_search", EF_SEARCH)))
            params = _faiss().SearchParametersHNSW(efSearch=ef)
        else:
            params = _faiss().SearchParametersIVF(nprobe=int(nprobe or self._meta.params.get("nprobe", NPROBE)))
        sims, rows = self._faiss.search(np.ascontiguousarray(q), k, params=params)
        dist = (1.0 - sims).astype(np.float32)
        dist[rows < 0] = np.inf  # fewer than k rows in the cells searched
        return dist, rows.astype(np.int64)

    def vectors(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Stored rows ``start:stop`` as float32 (the sq8 kinds give the decoded, quantised rows)."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.kind == "exact":
            return np.asarray(self._vectors[start:stop])
        if stop <= start:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.kind.startswith("ivf"):
            _ensure_direct_map(self._faiss)
        return self._faiss.reconstruct_n(start, stop - start)

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
        from .fileio import atomic_write

        parts = self._parts()
        with atomic_write(path) as fh:
            _write_container(fh, self._manifest(), parts)
        return Path(path)

    def _parts(self) -> Dict[str, np.ndarray]:
        meta = self._meta
        parts: Dict[str, np.ndarray] = {}
        if self.kind == "exact":
            parts["vectors"] = np.asarray(self._vectors)
        else:
            parts["faiss"] = _serialise(self._faiss)
        parts["path_bytes"] = np.asarray(meta.paths.data)
        parts["path_offsets"] = np.asarray(meta.paths.offsets)
        if meta.ids is not None:
            parts["ids"] = np.asarray(meta.ids)
        if meta.cams is not None:
            parts["cams"] = np.asarray(meta.cams)
        return parts

    def _manifest(self) -> Dict[str, Any]:
        meta = self._meta
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "vehiclenet": __version__,
                "faiss": _faiss_version(), "kind": meta.kind, "dimension": meta.dimension, "count": len(self),
                "params": meta.params, "flip": meta.flip, "sources": meta.sources, "weights": meta.weights}

    def _name(self) -> str:
        return self.source or "the gallery index"


# ---------------------------------------------------------------------- helpers: building


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _check_features(features: np.ndarray, paths: Sequence[str], what: str) -> np.ndarray:
    from .feature_checks import checked_features

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


def _append_column(have: Optional[np.ndarray], new: Optional[Sequence[int]], n: int, name: str,
                   where: str) -> Optional[np.ndarray]:
    if (have is None) != (new is None):
        stored = "stores" if have is not None else "does not store"
        raise DataError(f"{where}: the index {stored} {name}; the added features must "
                        f"{'have' if have is not None else 'not have'} them too (key {name!r} of the features file)")
    if have is None:
        return None
    return np.concatenate([np.asarray(have), _optional_column(new, n, name)])


def _auto_nlist(n: int) -> int:
    """The power of two nearest sqrt(n), so that each cell holds ~sqrt(n) rows; at most n/39."""
    nlist = 2 ** int(round(np.log2(max(1.0, np.sqrt(n)))))
    return max(1, min(nlist, n // 39))


def _train_ivf(feats: np.ndarray, kind: str, nlist: Optional[int], seed: int) -> Any:
    faiss = _faiss()
    n, d = feats.shape
    nlist = int(nlist or _auto_nlist(n))
    if nlist < 1 or nlist > n:
        raise UsageError(f"nlist must be between 1 and the number of features ({n}), got {nlist}")
    quantiser = faiss.IndexFlatIP(d)
    if kind == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(quantiser, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf-flat":
        index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        raise UsageError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
    index.own_fields = True
    quantiser.this.disown()  # the IVF index frees its quantiser
    # 64 points per cell train k-means as well as all of them (faiss's own subsampling bound is 256).
    sample = min(n, 64 * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(feats[rows]))
    return index


def _train_hnsw(feats: np.ndarray, seed: int) -> Any:
    """An HNSW graph over 8-bit codes; the quantiser's per-dimension ranges from a sample."""
    faiss = _faiss()
    index = faiss.IndexHNSWSQ(feats.shape[1], faiss.ScalarQuantizer.QT_8bit, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    sample = min(len(feats), 65536)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(feats), sample, replace=False)) if sample < len(feats) else slice(None)
    index.train(np.ascontiguousarray(feats[rows]))
    return index


def _serialise(index: Any) -> np.ndarray:
    return _faiss().serialize_index(index)


def _faiss_version() -> Optional[str]:
    try:
        return _faiss().__version__
    except ImportError:
        return None


def _ensure_direct_map(index: Any) -> None:
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    if ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()  # row -> (cell, offset), 8 bytes a row, built on first use


# ---------------------------------------------------------------------- exact search


def _exact_search(gallery: np.ndarray, queries: np.ndarray, k: int,
                  max_norm: float) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k with :func:`vehiclenet.features.nearest`'s rows, in its order.

    A batched product (one BLAS call per gallery tile for many queries) may sum a dot
    product in another order than ``nearest``'s one-query product. Both are within
    gamma_D * |q| * |x| of the true value for any summation order (gamma_D = D*u / (1 - D*u),
    u = 2^-24), so they differ by at most delta = 2 gamma_D |q| max|x|. Every row of the true
    top-k lies within 2 delta of the batched k-th best, and candidates more than 2 delta apart
    are in ``nearest``'s order. Runs of candidates closer than that (ties, near-ties) get
    ``nearest``'s bits (their tiles recomputed the way it computes them) and are re-sorted.
    Rows always equal ``nearest``'s; distances are its bits for a single query and for
    near-ties, else the batched product's (within delta, in practice the same or 1 ulp off).
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
            for j in range(sims.shape[0]):
                # One query alone is nearest's own product: its bits need no correction.
                margin = 2.0 * delta[s + j] if sims.shape[0] > 1 else 0.0
                dist[s + j], rows[s + j] = _top_k(gallery, queries[s + j], sims[j], k, margin)
    return dist, rows


def _gamma(d: int) -> float:
    u = 2.0 ** -24
    return d * u / (1.0 - d * u)


def _max_norm(gallery: np.ndarray) -> float:
    """Largest row norm, read in blocks (a memory-mapped gallery is never copied whole)."""
    step = 65536
    return max(float(np.sqrt(np.max(np.einsum("ij,ij->i", gallery[i:i + step], gallery[i:i + step],
                                                 dtype=np.float64))))
               for i in range(0, len(gallery), step))


def _top_k(gallery: np.ndarray, query: np.ndarray, sims: np.ndarray, k: int,
           margin: float) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of one query from its batched similarities ``sims`` (see :func:`_exact_search`);
    ``margin`` 0 when ``sims`` already has ``nearest``'s bits."""
    from .features import nearest

    n = len(sims)
    if not np.isfinite(sims).all():  # NaN breaks the bound: nearest itself, over everything
        order, dist = nearest(query, gallery, k)
        return dist, order.astype(np.int64)
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
    """Similarities of rows ``cand`` with the bits :func:`vehiclenet.features.nearest` gives
    them: each row's whole tile, in one single-query product of ``nearest``'s shape.
    Call inside :func:`vehiclenet.blas.one_blas_thread`, as ``nearest``'s product runs."""
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
        raise bad(f"parts {sorted(parts)}, a {manifest.get('kind')!r} index has {sorted(needed)} (and ids, cams)")
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
    if offsets[0] != 0 or offsets[-1] != len(parts["path_bytes"]) or (np.diff(offsets) < 0).any():
        raise DataError(f"{name}: damaged (path offsets run outside the stored paths); "
                        + _rebuild_hint(name, manifest))
    meta = _Meta(kind=manifest["kind"], dimension=int(manifest["dimension"]),
                 paths=_Paths(parts["path_bytes"], offsets), ids=parts.get("ids"),
                 cams=parts.get("cams"), params=dict(manifest.get("params") or {}), flip=manifest.get("flip"),
                 sources=list(manifest.get("sources") or []), weights=weights)
    if len(meta.paths) != int(manifest["count"]):
        raise DataError(f"{name}: damaged (manifest says {manifest['count']} rows, {len(meta.paths)} paths stored); "
                        + _rebuild_hint(name, manifest))
    if meta.kind == "exact":
        return GalleryIndex(meta, vectors=parts["vectors"], source=name)
    faiss = _faiss()
    raw = parts["faiss"]
    if isinstance(mm, np.memmap):
        reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(raw), raw.size)
        index = faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
    else:
        index = faiss.deserialize_index(np.ascontiguousarray(raw))
    if index.ntotal != len(meta.paths) or index.d != meta.dimension:
        raise DataError(f"{name}: damaged (faiss index of {index.ntotal} x {index.d}, manifest "
                        f"{len(meta.paths)} x {meta.dimension}); " + _rebuild_hint(name, manifest))
    return GalleryIndex(meta, faiss_index=index, source=name, keep_alive=mm if isinstance(mm, np.memmap) else None)


# ---------------------------------------------------------------------- from features files


def _feature_sources(path: PathLike) -> List[str]:
    """The features sources ``path`` stands for: itself (a file, or a chunk folder of
    ``vehiclenet embed --out-dir``, read and verified as one), or a folder's ``*.npz`` files
    sorted by name."""
    from .shards import MANIFEST

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
    flip: Optional[bool]
    sources: List[str]
    weights: Optional[str]


def read_feature_sources(inputs: Sequence[PathLike]) -> _Loaded:
    """Features, paths, ids/cams (keys ``ids``/``cams`` when every file has them), flip and
    weights of features files and folders, concatenated in the order given."""
    from .feature_checks import stored_flag
    from .features import load_features
    from .weights import describe, stored_identity

    files = [f for item in inputs for f in _feature_sources(item)]
    feats, paths, ids, cams, flips, weights = [], [], [], [], [], {}
    for f in files:
        res = load_features(f)
        if feats and res.features.shape[1] != feats[0].shape[1]:
            raise DataError(f"{f}: {res.features.shape[1]}-d features, {files[0]} has {feats[0].shape[1]}-d; "
                            "index features of one network only")
        feats.append(res.features)
        paths.extend(res.paths)
        ids.append(_labels(res.extra, "ids", len(res.paths), f))
        cams.append(_labels(res.extra, "cams", len(res.paths), f))
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
    return _Loaded(np.concatenate(feats), paths, _joined(ids), _joined(cams), known.pop() if known else None,
                   files, next(iter(weights), None))


def _labels(extra: Dict[str, Any], key: str, n: int, where: PathLike) -> Optional[np.ndarray]:
    from .feature_checks import as_labels

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
                nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> GalleryIndex:
    """A :class:`GalleryIndex` of the features files and folders ``inputs`` (in that order)."""
    loaded = read_feature_sources(inputs)
    return GalleryIndex.build(loaded.features, loaded.paths, ids=loaded.ids, cams=loaded.cams, kind=kind,
                              nlist=nlist, nprobe=nprobe, ef_search=ef_search, flip=loaded.flip,
                              sources=loaded.sources, weights=loaded.weights)


def add_to_index(index: GalleryIndex, inputs: Sequence[PathLike]) -> int:
    """Append the features of ``inputs`` to ``index``; returns how many rows were added."""
    loaded = read_feature_sources(inputs)
    return index.add(loaded.features, loaded.paths, ids=loaded.ids, cams=loaded.cams, flip=loaded.flip,
                     sources=loaded.sources, weights=loaded.weights)


def index_neighbours(kind: str = "exact", *, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                     ef_search: Optional[int] = None) -> Callable[[np.ndarray, int], np.ndarray]:
    """A neighbour source for :func:`vehiclenet.rerank.re_rank_blocks`: each item's ``k``
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
                                   ef_search=ef_search)
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
