"""Where a gallery index keeps its rows, one class per kind, picked from :data:`STORES`.

* :class:`ExactStore` (``exact``): the float32 rows, searched by brute force with the rows
  :func:`vehiclenet.retrieval.exact.nearest` gives (:func:`~vehiclenet.retrieval.exact.exact_top_k`).
* :class:`IvfStore` (``ivf-sq8``, ``ivf-flat``): a faiss IVF index, inner product, ``nlist``
  coarse cells of which ``nprobe`` are searched per query; sq8 keeps 8 bits per dimension.
* :class:`HnswStore` (``hnsw-sq8``): a faiss HNSW graph over 8-bit codes, ``ef_search``
  candidates kept while searching, rows numbered by the ids given (tuning adds its queries last).

A store answers the same few questions for every kind: add rows, search (within the rows a
filter allows), give rows back as float32, and the parts it is saved as. Which kind to build and
how its search effort is tuned is :class:`vehiclenet.retrieval.index.GalleryIndex`'s business.
"""
import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import UsageError
from .exact import exact_top_k, max_norm, padded

__all__ = ["STORES", "ExactStore", "IvfStore", "HnswStore", "faiss_module", "NPROBE", "EF_SEARCH", "HNSW_M",
           "EF_CONSTRUCTION", "EF_SEARCH_MAX"]

#: Default cells searched per query, where none was tuned or given.
NPROBE = 64
#: HNSW: neighbours per node, candidate list while building, default candidate list searching.
HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 64
#: Largest efSearch tuning tries (HNSW's recall levels off long before).
EF_SEARCH_MAX = 4096


def faiss_module():
    """faiss, imported on first use."""
    # faiss's loader logs each CPU-specific build it tries (INFO); only its problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


class ExactStore:
    """The rows themselves, float32 (a read-only memmap when loaded from a file)."""

    param: Optional[str] = None  # no search effort to tune

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self._norm: Optional[float] = None  # largest row norm, for exact_top_k's rounding bound

    @classmethod
    def of(cls, feats: np.ndarray) -> "ExactStore":
        return cls(np.array(feats, dtype=np.float32, order="C"))

    def append(self, feats: np.ndarray, first: int) -> None:
        """Rows ``first`` on (the store holds ``first`` rows)."""
        self.vectors = np.concatenate([np.asarray(self.vectors), feats]).astype(np.float32, copy=False)
        self._norm = None

    def search(self, q: np.ndarray, k: int, allowed: Optional[np.ndarray], share: float, value: Optional[int],
               params: Dict[str, Any], count: int) -> Tuple[np.ndarray, np.ndarray]:
        """The exact top-k of the allowed rows, padded to ``k`` columns with inf / -1."""
        if self._norm is None:
            self._norm = max_norm(self.vectors)
        found = min(k, len(self.vectors) if allowed is None else int(np.count_nonzero(allowed)))
        return padded(*exact_top_k(self.vectors, q, found, self._norm, allowed), k)

    def rows(self, start: int, stop: int, dimension: int) -> np.ndarray:
        return np.asarray(self.vectors[start:stop])

    def parts(self) -> Dict[str, np.ndarray]:
        return {"vectors": np.asarray(self.vectors)}

    @classmethod
    def from_parts(cls, parts: Dict[str, np.ndarray], mapped: Optional[np.memmap]) -> "ExactStore":
        return cls(parts["vectors"])


class FaissStore:
    """A faiss index; zero-copy from a memory-mapped file (``keep_alive``) until it must grow."""

    param = ""  # the search effort tuning chooses, as the manifest's params name it
    default = 0

    def __init__(self, index: Any, keep_alive: Any = None) -> None:
        self.index = index
        self.keep_alive = keep_alive  # the memmap a zero-copy index points into

    @property
    def held_out(self) -> bool:
        """Whether rows are numbered by the ids given, so tuning queries can be added last."""
        return isinstance(self.index, faiss_module().IndexIDMap2)

    def add(self, feats: np.ndarray, rows: np.ndarray) -> None:
        if self.held_out:
            self.index.add_with_ids(np.ascontiguousarray(feats), np.asarray(rows, dtype=np.int64))
        else:  # rows numbered in the order added
            self.index.add(np.ascontiguousarray(feats))

    def own(self) -> None:
        """Copy a zero-copy index into memory: faiss must own its lists to grow."""
        if self.keep_alive is not None:
            self.index = faiss_module().deserialize_index(np.array(serialise(self.index)))
            self.keep_alive = None

    def search(self, q: np.ndarray, k: int, allowed: Optional[np.ndarray], share: float, value: Optional[int],
               params: Dict[str, Any], count: int) -> Tuple[np.ndarray, np.ndarray]:
        """Distances and rows of ``count`` row numbers (some may be held out of the index while it
        is tuned); a filtered search spends 1/share times the effort (at most all of it)."""
        faiss = faiss_module()
        selector, bits = None, None
        if allowed is not None:
            bits = np.packbits(allowed, bitorder="little")  # kept alive while faiss reads it
            selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits))
        effort = int(value or params.get(self.param, self.default))
        sims, rows = self.index.search(np.ascontiguousarray(q), k,
                                       params=self._parameters(k, effort, share, selector, params, count))
        del bits
        dist = (1.0 - sims).astype(np.float32)
        dist[rows < 0] = np.inf  # fewer than k rows in the cells searched
        return dist, rows.astype(np.int64)

    def _parameters(self, k: int, effort: int, share: float, selector: Any, params: Dict[str, Any], n: int) -> Any:
        raise NotImplementedError

    def rows(self, start: int, stop: int, dimension: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, dimension), dtype=np.float32)
        return self.index.reconstruct_n(start, stop - start)

    def parts(self) -> Dict[str, np.ndarray]:
        return {"faiss": serialise(self.index)}

    @classmethod
    def from_parts(cls, parts: Dict[str, np.ndarray], mapped: Optional[np.memmap]) -> "FaissStore":
        faiss = faiss_module()
        raw = parts["faiss"]
        if mapped is not None:
            reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(raw), raw.size)
            return cls(faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC), keep_alive=mapped)
        return cls(faiss.deserialize_index(np.ascontiguousarray(raw)))

    def ladder_limit(self, params: Dict[str, Any]) -> int:
        """The largest setting tuning may try."""
        raise NotImplementedError


class IvfStore(FaissStore):
    """IVF cells: ``nprobe`` of ``nlist`` searched per query."""

    param = "nprobe"
    default = NPROBE

    @classmethod
    def train(cls, feats: np.ndarray, kind: str, *, nlist: Optional[int], nprobe: Optional[int],
              ef_search: Optional[int], seed: int, params: Dict[str, Any]) -> Tuple["IvfStore", np.ndarray]:
        """An empty store trained on a sample of ``feats``, and the sample's rows; its settings
        go into ``params``."""
        index, trained = _train_ivf(feats, kind, nlist, seed)
        params.update({"nlist": int(index.nlist), "nprobe": int(nprobe or min(NPROBE, index.nlist)), "seed": seed})
        return cls(index), trained

    def _parameters(self, k: int, effort: int, share: float, selector: Any, params: Dict[str, Any], n: int) -> Any:
        nlist = int(params.get("nlist", effort))
        return faiss_module().SearchParametersIVF(nprobe=min(nlist, int(np.ceil(effort / share))), sel=selector)

    def rows(self, start: int, stop: int, dimension: int) -> np.ndarray:
        if stop > start:
            ivf = faiss_module().extract_index_ivf(self.index)
            if ivf.direct_map.type == faiss_module().DirectMap.NoMap:
                ivf.make_direct_map()  # row -> (cell, offset), 8 bytes a row, built on first use
        return super().rows(start, stop, dimension)

    def direct_map(self) -> bool:
        faiss = faiss_module()
        return faiss.extract_index_ivf(self.index).direct_map.type != faiss.DirectMap.NoMap

    def drop_direct_map(self) -> None:
        faiss = faiss_module()
        faiss.extract_index_ivf(self.index).set_direct_map_type(faiss.DirectMap.NoMap)

    def ladder_limit(self, params: Dict[str, Any]) -> int:
        return int(params["nlist"])


class HnswStore(FaissStore):
    """An HNSW graph: ``ef_search`` candidates (at least k) kept per query."""

    param = "ef_search"
    default = EF_SEARCH

    @classmethod
    def train(cls, feats: np.ndarray, kind: str, *, nlist: Optional[int], nprobe: Optional[int],
              ef_search: Optional[int], seed: int, params: Dict[str, Any]) -> Tuple["HnswStore", None]:
        """An empty graph whose quantiser was trained on a sample of ``feats`` (no cells: None)."""
        params.update({"M": HNSW_M, "ef_construction": EF_CONSTRUCTION, "ef_search": int(ef_search or EF_SEARCH),
                       "seed": seed})
        return cls(_train_hnsw(feats, seed)), None

    def _parameters(self, k: int, effort: int, share: float, selector: Any, params: Dict[str, Any], n: int) -> Any:
        ef = max(k, effort)
        return faiss_module().SearchParametersHNSW(efSearch=min(max(k, n), int(np.ceil(ef / share))), sel=selector)

    def ladder_limit(self, params: Dict[str, Any]) -> int:
        return EF_SEARCH_MAX


STORES = {"exact": ExactStore, "ivf-sq8": IvfStore, "ivf-flat": IvfStore, "hnsw-sq8": HnswStore}


def auto_nlist(n: int) -> int:
    """The power of two nearest sqrt(n), so that each cell holds ~sqrt(n) rows; at most n/39."""
    nlist = 2 ** int(round(np.log2(max(1.0, np.sqrt(n)))))
    return max(1, min(nlist, n // 39))


def _train_ivf(feats: np.ndarray, kind: str, nlist: Optional[int], seed: int) -> Tuple[Any, np.ndarray]:
    faiss = faiss_module()
    n, d = feats.shape
    nlist = int(nlist or auto_nlist(n))
    if nlist < 1 or nlist > n:
        raise UsageError(f"nlist must be between 1 and the number of features ({n}), got {nlist}")
    quantiser = faiss.IndexFlatIP(d)
    if kind == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(quantiser, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantiser.this.disown()  # the IVF index frees its quantiser
    # 64 points per cell train k-means as well as all of them (faiss's own subsampling bound is 256).
    sample = min(n, 64 * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else np.arange(n)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(feats[rows]))
    return index, rows


def _train_hnsw(feats: np.ndarray, seed: int) -> Any:
    """An HNSW graph over 8-bit codes, rows numbered by the ids given (so that some can be
    added last); the quantiser's per-dimension ranges from a sample."""
    faiss = faiss_module()
    index = faiss.IndexHNSWSQ(feats.shape[1], faiss.ScalarQuantizer.QT_8bit, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    sample = min(len(feats), 65536)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(feats), sample, replace=False)) if sample < len(feats) else slice(None)
    index.train(np.ascontiguousarray(feats[rows]))
    mapped = faiss.IndexIDMap2(index)
    index.this.disown()  # the map frees the graph
    mapped.own_fields = True
    return mapped


def serialise(index: Any) -> np.ndarray:
    return faiss_module().serialize_index(index)
