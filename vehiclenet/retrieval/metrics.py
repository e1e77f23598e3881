"""Re-identification metrics: mAP / CMC / mINP over query-gallery distances.

The protocol is the one behind the published "mAP 83.71 | rank-1 94.34":

* per query, gallery items with the same id *and* the same camera are junk and
  removed from the ranking, and so are gallery items labelled -1;
* AP is by default the trapezoidal form of the reference ``compute_mAP``: for the
  i-th hit (0-based) at position p (0-based, junk removed) it adds
  ``(old + (i + 1) / (p + 1)) / 2 / ngood`` with ``old = i / p`` (the precision
  just before the hit) and ``old = 1`` when the hit is at position 0.
  ``ap="standard"`` gives the usual non-interpolated AP (mean of ``(i+1)/(p+1)``);
* CMC@k is 1 from the first hit on;
* mINP is ``ngood / (position of the last hit + 1)`` (Ye et al., 2021);
* queries without a valid match add 0, and mAP, CMC and mINP are divided by the
  number of **all** queries (``num_valid_query`` is reported beside it).

Ranking is by ascending distance; equal distances are ordered by gallery index
(what a stable sort gives), so the result never depends on a sort algorithm.

Speed: no loop over gallery positions and no full sort of the rows. For each
block of queries only gallery items at least as close as the query's farthest
hit can precede a hit, so only those are sorted; a hit that ties with that
farthest distance (common after re-ranking, where most Jaccard distances are
exactly 1) is placed by counting the tied items with a lower index. Random distances, where
whole rows get sorted, are the worst case (docs/benchmarks.md, ``benchmarks/eval_speed.py``).
"""
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..embedding.checks import as_labels
from .blocks import RowBlocks, check_block, check_covered
from .exact import cosine_distance_blocks

__all__ = ["EvalResult", "evaluate", "evaluate_blocks", "evaluate_features"]


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Evaluation figures; fractions in [0, 1]."""

    mAP: float
    cmc: np.ndarray
    mINP: float
    num_query: int
    num_valid_query: int
    ap: str = "trapezoid"
    per_query_ap: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based)."""
        return float(self.cmc[k - 1])

    def to_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"mAP": float(self.mAP)}
        for k in (1, 5, 10):
            if k <= len(self.cmc):
                out[f"rank{k}"] = self.rank(k)
        out.update(
            mINP=float(self.mINP),
            num_query=int(self.num_query),
            num_valid_query=int(self.num_valid_query),
            ap=self.ap,
            cmc=[float(x) for x in self.cmc],
        )
        return out


# Above this share of candidate items per block, sorting whole rows is cheaper than
# sorting the gathered candidates.
_SPARSE_FRACTION = 0.1


def _dense_positions(
    x: np.ndarray, nonjunk: np.ndarray, gr: np.ndarray, gc: np.ndarray, gv: np.ndarray
) -> np.ndarray:
    """Positions of the given hits by sorting whole rows (junk set to NaN, which sorts last)."""
    xj = np.where(nonjunk, x, np.nan)
    srt = np.sort(xj, axis=1)
    pos = np.empty(gr.shape[0], dtype=np.int64)
    bounds = np.searchsorted(gr, np.arange(x.shape[0] + 1))
    for r in range(x.shape[0]):
        a, b = bounds[r], bounds[r + 1]
        if a == b:
            continue
        left = np.searchsorted(srt[r], gv[a:b], side="left")
        right = np.searchsorted(srt[r], gv[a:b], side="right")
        pos[a:b] = left
        # Equal distances: items with a lower gallery index come first.
        for k in np.flatnonzero(right - left > 1):
            pos[a + k] += np.count_nonzero(xj[r, : gc[a + k]] == gv[a + k])
    return pos


@functools.lru_cache(maxsize=None)
def _native_hit_positions() -> Optional[Dict[str, Callable]]:
    """``VnHitPositionsF32/F64`` from csrc/retrieval_kernels.c, or None where it cannot be built."""
    from ..native import retrieval_kernels

    library = retrieval_kernels()
    if library is None:
        return None
    funcs = {}
    for dtype, name in (("float32", "VnHitPositionsF32"), ("float64", "VnHitPositionsF64")):
        func = getattr(library, name)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        func.argtypes = [p, p, p, i64, i64, p]
        func.restype = ctypes.c_int
        funcs[dtype] = func
    return funcs


def hit_positions(
    x: np.ndarray, good: np.ndarray, nonjunk: np.ndarray, *, native: bool = True
) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and 0-based positions, among non-junk items, of the good items of a block of
    distances, ordered by (distance, gallery index); compiled where possible (the sort of
    every row that numpy needs is most of evaluation's time)."""
    funcs = _native_hit_positions() if native else None
    if funcs is None:
        return _hit_positions(x, good, nonjunk)
    dtype = "float32" if x.dtype == np.float32 else "float64"  # float64 holds any other float exactly
    xc = np.ascontiguousarray(x, dtype=dtype)
    g8 = np.ascontiguousarray(good, dtype=bool).view(np.uint8)
    n8 = np.ascontiguousarray(nonjunk, dtype=bool).view(np.uint8)
    counts = np.count_nonzero(good, axis=1)
    pos = np.empty(int(counts.sum()), dtype=np.int64)
    if funcs[dtype](xc.ctypes.data, g8.ctypes.data, n8.ctypes.data, x.shape[0], x.shape[1], pos.ctypes.data) != 0:
        raise MemoryError(f"evaluation: no memory for a {x.shape[1]}-item row")
    return np.repeat(np.arange(x.shape[0]), counts), pos


def _hit_positions(x: np.ndarray, good: np.ndarray, nonjunk: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and 0-based positions, among non-junk items, of the good items of a block.

    Order is (distance, gallery index). Only items at least as close as the row's
    farthest hit can precede a hit: those strictly closer are sorted, those tied with
    the farthest hit are counted by index.
    """
    rows_n, cols_n = x.shape
    neg_inf = -np.inf
    tmax = np.where(good, x, neg_inf).max(axis=1)
    below = x < tmax[:, None]
    below &= nonjunk
    gr, gc = np.nonzero(good)
    gv = x[gr, gc]
    pos = np.empty(gr.shape[0], dtype=np.int64)

    n_below = np.count_nonzero(below, axis=1)
    strict = gv < tmax[gr]
    if strict.any():
        sg = np.flatnonzero(strict)
        if n_below.sum() <= _SPARSE_FRACTION * below.size:
            br, bc = np.nonzero(below)
            bv = x[br, bc]
            order = np.lexsort((bc, bv, br))
            inv = np.empty_like(order)
            inv[order] = np.arange(order.shape[0])
            row_start = np.concatenate(([0], np.cumsum(n_below)[:-1]))
            lin = br * cols_n + bc  # row-major, hence sorted
            idx = np.searchsorted(lin, gr[sg] * cols_n + gc[sg])
            pos[sg] = inv[idx] - row_start[gr[sg]]
        else:
            pos[sg] = _dense_positions(x, nonjunk, gr[sg], gc[sg], gv[sg])
    tied = ~strict
    if tied.any():
        at = x == tmax[:, None]
        at &= nonjunk
        alin = np.flatnonzero(at)
        tg = np.flatnonzero(tied)
        before = np.searchsorted(alin, gr[tg] * cols_n + gc[tg]) - np.searchsorted(alin, gr[tg] * cols_n)
        pos[tg] = n_below[gr[tg]] + before
    return gr, pos


def evaluate(
    distmat: np.ndarray,
    q_ids: Sequence[int],
    g_ids: Sequence[int],
    q_cams: Sequence[int],
    g_cams: Sequence[int],
    *,
    max_rank: int = 10,
    ap: str = "trapezoid",
    block_rows: int = 256,
    native: bool = True,
) -> EvalResult:
    """mAP, CMC and mINP of a (num_query, num_gallery) distance matrix (lower = closer).

    ``cmc`` holds ranks 1..max(max_rank, 10), so rank-1/5/10 are always available.

    See the module docstring for the protocol (junk, AP forms, normalisation).
    ``native=False`` ranks with numpy instead of the compiled kernel (the same result).
    For matrices too large to hold, :func:`evaluate_blocks` and :func:`evaluate_features`
    give the same figures from row blocks.
    """
    dist, labels = _checked_inputs(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=max_rank, ap=ap)
    return _evaluate_stream([(0, dist)], labels, max_rank=max_rank, ap=ap, block_rows=block_rows,
                            native=native, workers=None)


def evaluate_blocks(
    blocks: RowBlocks,
    q_ids: Sequence[int],
    g_ids: Sequence[int],
    q_cams: Sequence[int],
    g_cams: Sequence[int],
    *,
    max_rank: int = 10,
    ap: str = "trapezoid",
    block_rows: int = 256,
    native: bool = True,
    workers: Optional[int] = None,
) -> EvalResult:
    """:func:`evaluate` of a distance matrix given as ``(row_start, block)`` pairs
    (:mod:`vehiclenet.retrieval.blocks`), each ranked and dropped as it arrives.

    The figures (per-query AP included) are bit-identical to :func:`evaluate` of the whole
    matrix: every query is ranked on its own row. Memory: the block being ranked plus
    about five bytes per element of ``workers`` sub-blocks of ``block_rows`` queries (the
    masks), and a few integers per hit. ValueError if the blocks miss or repeat a query.
    """
    _check_options(max_rank, ap)
    num_q = np.asarray(q_ids).shape[0] if np.ndim(q_ids) else 0
    num_g = np.asarray(g_ids).shape[0] if np.ndim(g_ids) else 0
    labels = _make_labels(q_ids, g_ids, q_cams, g_cams, num_q, num_g)
    return _evaluate_stream(blocks, labels, max_rank=max_rank, ap=ap, block_rows=block_rows,
                            native=native, workers=workers)


def evaluate_features(
    q_feats: np.ndarray,
    g_feats: np.ndarray,
    q_ids: Sequence[int],
    g_ids: Sequence[int],
    q_cams: Sequence[int],
    g_cams: Sequence[int],
    *,
    max_rank: int = 10,
    ap: str = "trapezoid",
    block_rows: int = 256,
    workers: Optional[int] = None,
    native: bool = True,
) -> EvalResult:
    """``evaluate(cosine_distance(q_feats, g_feats), ...)`` without the (Q, G) matrix:
    distances of ``block_rows`` queries at a time (:func:`cosine_distance_blocks`, the same
    bits), ranked and dropped. Bit-identical figures; memory O(``block_rows`` x G): with
    ``workers`` W, W + 1 float32 distance blocks and W sets of ranking masks (~5 bytes per
    element of 256 queries) -- about 0.7 GB beside the features at 10,000 x 128,517 on 2 cores."""
    _check_options(max_rank, ap)
    blocks = cosine_distance_blocks(q_feats, g_feats, block_rows=block_rows, workers=workers)
    return evaluate_blocks(blocks, q_ids, g_ids, q_cams, g_cams, max_rank=max_rank, ap=ap,
                           native=native, workers=workers)


@dataclass(frozen=True)
class _Labels:
    """Vehicle ids and cameras of the queries and the gallery, checked and int64."""

    q_ids: np.ndarray
    g_ids: np.ndarray
    q_cams: np.ndarray
    g_cams: np.ndarray


def _check_options(max_rank: int, ap: str) -> None:
    if ap not in ("trapezoid", "standard"):
        raise ValueError(f"ap must be 'trapezoid' or 'standard', not {ap!r}")
    if max_rank < 1:
        raise ValueError("max_rank must be >= 1")


def _make_labels(q_ids: Sequence[int], g_ids: Sequence[int], q_cams: Sequence[int], g_cams: Sequence[int],
                 num_q: int, num_g: int) -> _Labels:
    return _Labels(
        q_ids=as_labels("q_ids", q_ids, num_q),
        g_ids=as_labels("g_ids", g_ids, num_g),
        q_cams=as_labels("q_cams", q_cams, num_q),
        g_cams=as_labels("g_cams", g_cams, num_g),
    )


def _checked_inputs(
    distmat: np.ndarray,
    q_ids: Sequence[int],
    g_ids: Sequence[int],
    q_cams: Sequence[int],
    g_cams: Sequence[int],
    *,
    max_rank: int,
    ap: str,
) -> Tuple[np.ndarray, _Labels]:
    """:func:`evaluate`'s arguments as a float distance matrix and int64 labels; ValueError if unusable."""
    if ap not in ("trapezoid", "standard"):
        raise ValueError(f"ap must be 'trapezoid' or 'standard', not {ap!r}")
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {dist.shape}")
    dist = _float_block(dist)
    labels = _make_labels(q_ids, g_ids, q_cams, g_cams, *dist.shape)
    _check_options(max_rank, ap)
    if np.isnan(dist).any():
        raise ValueError("distmat contains NaN")
    return dist, labels


def _float_block(dist: np.ndarray) -> np.ndarray:
    return dist if dist.dtype.kind == "f" else dist.astype(np.float64)


_Hits = Tuple[np.ndarray, np.ndarray]  # query rows and 0-based hit positions, one entry per hit


def _evaluate_stream(blocks: RowBlocks, labels: _Labels, *, max_rank: int, ap: str, block_rows: int,
                     native: bool, workers: Optional[int]) -> EvalResult:
    """The one ranking path: hits of every block, in sub-blocks of ``block_rows`` queries on
    ``workers`` threads (numpy's sorts, its element-wise passes and the C kernel release the
    GIL), then the scores. Blocks are dropped once ranked."""
    num_q, num_g = labels.q_ids.shape[0], labels.g_ids.shape[0]
    seen = np.zeros(num_q, dtype=bool)
    unlabeled = labels.g_ids == -1
    workers = max(1, workers or os.cpu_count() or 1)
    found: List[_Hits] = []
    with ThreadPoolExecutor(workers) as pool:
        for start, block in blocks:
            x = _float_block(np.asarray(block))
            check_block(start, x, (num_q, num_g), seen)
            if x.size and np.isnan(x.min()):  # min propagates NaN, without a mask the block's size
                raise ValueError(f"distances of queries {start}:{start + x.shape[0]} contain NaN")
            hits = functools.partial(_block_hits, x, labels, unlabeled, block_rows, native, start)
            offsets = range(0, x.shape[0], block_rows)
            mapper = pool.map if workers > 1 and len(offsets) > 1 else map
            found.extend(r for r in mapper(hits, offsets) if r is not None)
    check_covered(seen)
    cmc, per_query_ap, inp_sum, num_valid = _scores(found, num_q, max(max_rank, 10), ap)
    return EvalResult(
        mAP=float(per_query_ap.sum() / num_q) if num_q else 0.0,
        cmc=cmc,
        mINP=inp_sum / num_q if num_q else 0.0,
        num_query=num_q,
        num_valid_query=num_valid,
        ap=ap,
        per_query_ap=per_query_ap,
    )


def _block_hits(
    x: np.ndarray, labels: _Labels, unlabeled: np.ndarray, block_rows: int, native: bool, row0: int, offset: int
) -> Optional[_Hits]:
    """The hits of rows ``offset:offset + block_rows`` of ``x`` (the distances of queries from
    ``row0`` on), None if there is none."""
    start = row0 + offset
    sub = x[offset : offset + block_rows]
    stop = start + sub.shape[0]
    same_id = labels.g_ids[None, :] == labels.q_ids[start:stop, None]
    same_cam = labels.g_cams[None, :] == labels.q_cams[start:stop, None]
    junk = same_id & same_cam
    junk |= unlabeled[None, :]
    good = same_id & ~junk
    if not good.any():
        return None
    rows, pos = hit_positions(sub, good, ~junk, native=native)
    return rows + start, pos


def _scores(found: List[_Hits], num_q: int, n_rank: int, ap: str) -> Tuple[np.ndarray, np.ndarray, float, int]:
    """CMC over ``n_rank`` ranks, per-query AP, the sum of per-query INP and the number of valid queries."""
    if not found:
        return np.zeros(n_rank, dtype=np.float64), np.zeros(num_q, dtype=np.float64), 0.0, 0
    q_all = np.concatenate([r[0] for r in found])
    p_all = np.concatenate([r[1] for r in found])
    order = np.lexsort((p_all, q_all))
    q_all, p_all = q_all[order], p_all[order]
    ngood = np.bincount(q_all, minlength=num_q)
    first = np.concatenate(([0], np.cumsum(ngood)[:-1]))
    per_query_ap = _average_precision(q_all, p_all, ngood, first, ap)
    valid = ngood > 0
    first_pos = p_all[first[valid]]
    cmc = (first_pos[None, :] <= np.arange(n_rank)[:, None]).sum(axis=1) / float(num_q)
    last_pos = p_all[first[valid] + ngood[valid] - 1]
    inp_sum = float(np.sum(ngood[valid] / (last_pos + 1.0)))
    return cmc, per_query_ap, inp_sum, int(valid.sum())


def _average_precision(
    q_all: np.ndarray, p_all: np.ndarray, ngood: np.ndarray, first: np.ndarray, ap: str
) -> np.ndarray:
    """Per-query AP (the ``ap`` form) of hits sorted by (query, position); ``first`` indexes each query's first hit."""
    hit_i = np.arange(q_all.shape[0]) - first[q_all]  # 0-based hit index in its query
    precision = (hit_i + 1) / (p_all + 1.0)
    if ap == "trapezoid":
        old = np.where(p_all > 0, hit_i / np.maximum(p_all, 1), 1.0)
        terms = (old + precision) / 2.0
    else:
        terms = precision
    per_query_ap = np.bincount(q_all, weights=terms, minlength=ngood.shape[0])
    valid = ngood > 0
    per_query_ap[valid] /= ngood[valid]
    return per_query_ap
