"""Choosing a gallery index's search effort from its own rows (``index build --target-recall``).

Deciding is kept apart from searching: :func:`tune` is given a search function and the truth,
tries settings and returns a :class:`Tuning`, which :mod:`vehiclenet.retrieval.index` records in the
index's manifest and searches with.

How recall is measured: a sample of the gallery's own rows (``TUNE_QUERIES``, fixed seed) is
searched leave-one-out, each query's own row taken out of both lists: its k nearest other rows
by exact float32 products over the stored rows (:func:`exact_truth`) against the k the index
finds. Recall@k is the mean overlap. An IVF index's recall never falls as nprobe rises (more
cells hold a superset of the candidates), so the smallest setting that reaches the target is
also the fastest one. The decision takes a one-sided 99 % lower bound (mean - 2.326 standard
errors over the sampled queries), so that queries outside the sample meet the target too.
"""
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import UsageError

__all__ = ["TARGET_RECALL", "TUNE_K", "TUNE_QUERIES", "Tuning", "check_target", "exact_truth", "ladder",
           "sample_rows", "tune"]

LOG = logging.getLogger(__name__)

#: Default recall@k target of ``index build``.
TARGET_RECALL = 0.95
#: The k of the recall measured (``vehiclenet search``'s default top-k).
TUNE_K = 10
#: Gallery rows searched as queries while tuning (the truth costs one exact pass over the gallery for them).
TUNE_QUERIES = 2000
_Z = 2.326  # one-sided 99 %
_REFINE = 2  # bisection steps between the last setting that missed and the first that reached
_LATENCY_QUERIES = 5  # single queries timed for the chosen setting and for exact search
_TRUTH_BYTES = 128 * 2 ** 20  # similarities held at once while finding the truth (twice: the product, its copy)

#: search(queries, k, value) -> (Q, k) rows, -1 where fewer were found
SearchFn = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass
class Tuning:
    """What tuning chose and measured; ``param`` is None for exact search (recall 1 by construction)."""

    target: float
    k: int
    param: Optional[str] = None
    value: Optional[int] = None
    recall: float = 1.0
    recall_low: float = 1.0
    reached: bool = True
    queries: int = 0  # rows searched to measure it
    sample: int = TUNE_QUERIES  # rows asked for (a re-check after an add asks for as many)
    query_ms: Optional[float] = None  # p50 of single-query searches at ``value``
    exact_query_ms: Optional[float] = None  # p50 of the same single queries by exact search, same run
    seconds: float = 0.0
    tried: List[List[float]] = field(default_factory=list)  # [value, recall] per setting tried
    fixed: bool = False  # the value was given, not chosen: it is measured, never changed
    note: str = ""

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        for key in ("recall", "recall_low", "query_ms", "exact_query_ms", "seconds"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 5)
        out["tried"] = [[int(v), round(float(r), 5)] for v, r in self.tried]
        return out

    @classmethod
    def from_json(cls, data: Any) -> "Tuning":
        """The record :meth:`to_json` wrote; ValueError when it is not one."""
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise ValueError("tuning record is not an object of known fields")
        tuning = cls(**data)
        numbers = (tuning.target, tuning.recall, tuning.recall_low)
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in numbers) or not isinstance(tuning.k, int):
            raise ValueError("tuning record's target, recall or k out of range")
        if tuning.param not in (None, "nprobe", "ef_search") or not isinstance(tuning.note, str) or (
                tuning.param is not None and not (isinstance(tuning.value, int) and tuning.value >= 1)):
            raise ValueError(f"tuning record's parameter {tuning.param!r} is not nprobe or ef_search")
        return tuning

    def describe(self) -> str:
        """One line: what was chosen and what it reached."""
        if self.param is None:
            return f"exact search (recall 1){'; ' + self.note if self.note else ''}"
        verdict = "reaches" if self.reached else "MISSES"
        speed = ""
        if self.query_ms is not None and self.exact_query_ms:
            speed = f", {self.exact_query_ms / max(self.query_ms, 1e-9):.0f}x faster than exact"
        return (f"{self.param} {self.value}: recall@{self.k} {self.recall:.3f} (99 % lower bound "
                f"{self.recall_low:.3f}) on {self.queries} of its own rows, {verdict} the target {self.target:g}"
                f"{speed}{'; ' + self.note if self.note else ''}")


def check_target(target: float) -> float:
    """``target`` as a float in (0, 1]; UsageError otherwise."""
    if not isinstance(target, (int, float)) or not 0 < target <= 1 or math.isnan(target):
        raise UsageError(f"target recall must be above 0 and at most 1, got {target}")
    return float(target)


def ladder(start: int, limit: int) -> List[int]:
    """Settings to try, each about sqrt(2) times the last: 1, 2, 3, 4, 6, 8, 12, 16, ...
    from ``start`` up to and including ``limit``."""
    steps = sorted({1} | {p * f // 2 for p in (2 ** i for i in range(1, 32)) for f in (2, 3)})
    return [v for v in steps if start <= v < limit] + ([limit] if limit >= start else [])


def sample_rows(n: int, count: int, seed: int, avoid: Optional[np.ndarray] = None) -> np.ndarray:
    """``count`` distinct rows of ``n`` (all when fewer), sorted, from ``seed``; rows not in
    ``avoid`` where there are any (rows that trained the index's cells sit closer to their
    cell's centre than new queries do, and would overstate recall)."""
    pool = np.arange(n, dtype=np.int64)
    if avoid is not None and len(avoid) < n:
        pool = np.setdiff1d(pool, avoid)
    if count >= len(pool):
        return pool
    return np.sort(np.random.default_rng([seed, 7]).choice(pool, count, replace=False)).astype(np.int64)


def exact_truth(queries: np.ndarray, query_rows: np.ndarray, rows_of: Callable[[int, int], np.ndarray], n: int,
                k: int, excluded: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
    """Each query's ``k`` nearest rows (by inner product) among ``n`` rows other than its own
    (``query_rows``) and ``excluded`` (sorted rows left out for every query), with
    ``rows_of(start, stop)`` giving the stored rows; and the seconds taken. A gallery block at
    a time: memory stays bounded for any ``n``."""
    from .blas import matmul_nt

    t0 = time.perf_counter()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_sims = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(q), 0), dtype=np.int64)
    step = max(4096, _TRUTH_BYTES // (4 * max(1, len(q))))
    for start in range(0, n, step):
        block = np.ascontiguousarray(rows_of(start, min(n, start + step)), dtype=np.float32)
        # Tiles over the gallery rows: both cores work (scipy's BLAS; numpy's may run a generic kernel).
        sims = np.ascontiguousarray(matmul_nt(block, q, tile_rows=4096).T)
        own = (query_rows >= start) & (query_rows < start + len(block))
        sims[np.flatnonzero(own), query_rows[own] - start] = -np.inf
        if excluded is not None:
            sims[:, excluded[(excluded >= start) & (excluded < start + len(block))] - start] = -np.inf
        top_sims, top_rows = _block_top(sims, k)
        sims = np.concatenate([best_sims, top_sims], axis=1)
        rows = np.concatenate([best_rows, top_rows + start], axis=1)
        keep = min(k, sims.shape[1])
        top = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
        best_sims, best_rows = np.take_along_axis(sims, top, axis=1), np.take_along_axis(rows, top, axis=1)
    return best_rows, time.perf_counter() - t0


def _block_top(sims: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims`` its ``k`` largest values and their columns (any order).

    The k-th largest of the first columns is a lower bound of the row's k-th largest, so only
    the few columns at or above it are sorted (10x faster than partitioning whole rows)."""
    q, cols = sims.shape
    keep = min(k, cols)
    head = min(cols, 4096)
    bound = np.partition(sims[:, :head], head - keep, axis=1)[:, head - keep]
    qi, ci = np.nonzero(sims >= bound[:, None])
    values = sims[qi, ci]
    order = np.lexsort((ci, -values, qi))
    qi, ci, values = qi[order], ci[order], values[order]
    rank = np.arange(len(qi)) - np.searchsorted(qi, np.arange(q))[qi]
    chosen = rank < keep
    top_sims = np.full((q, keep), -np.inf, dtype=np.float32)
    top_rows = np.zeros((q, keep), dtype=np.int64)
    top_sims[qi[chosen], rank[chosen]] = values[chosen]
    top_rows[qi[chosen], rank[chosen]] = ci[chosen]
    return top_sims, top_rows


def _recalls(found: np.ndarray, query_rows: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query, the share of its true k found among the first k of ``found`` other than itself."""
    k = truth.shape[1]
    out = np.empty(len(found))
    for i, (row, own, true) in enumerate(zip(found, query_rows, truth)):
        others = row[(row != own) & (row >= 0)][:k]
        out[i] = len(np.intersect1d(others, true, assume_unique=False)) / k
    return out


def _measure(search: SearchFn, queries: np.ndarray, query_rows: np.ndarray, truth: np.ndarray,
             value: int) -> Tuple[float, float, float]:
    """(recall, its 99 % lower bound, seconds) of ``search`` at ``value``."""
    t0 = time.perf_counter()
    found = search(queries, truth.shape[1] + 1, value)  # one more: the query's own row is usually found
    seconds = time.perf_counter() - t0
    per_query = _recalls(found, query_rows, truth)
    spread = float(per_query.std(ddof=1)) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    mean = float(per_query.mean())
    return mean, mean - _Z * spread, seconds


def tune(search: SearchFn, queries: np.ndarray, query_rows: np.ndarray, truth: np.ndarray, *, param: str,
         values: List[int], target: float, exact_seconds: float = 0.0,
         exact_single: Optional[Callable[[np.ndarray], Any]] = None, keep_first: bool = False) -> Tuning:
    """The smallest of ``values`` (ascending) whose recall's lower bound reaches ``target``,
    refined by bisection towards the last value that missed; the largest tried when none does
    (``reached`` False). The chosen setting's single-query latency (p50) is measured, and with
    ``exact_single`` (exact search of one query) exact search's beside it: what one user's
    query waits, where a batch would flatter exact search's memory-bound scan.
    ``exact_seconds``: what the truth took, counted in ``seconds``. ``keep_first``: the first
    value (the setting in use) stays unless its recall is below the target with 99 %
    confidence, so that re-checks of new samples do not ratchet it up on noise."""
    t0 = time.perf_counter()
    tried: Dict[int, Tuple[float, float, float]] = {}
    below, chosen = None, None
    for value in values:
        tried[value] = _measure(search, queries, query_rows, truth, value)
        mean, low, _ = tried[value]
        if low >= target or (keep_first and value == values[0] and 2 * mean - low >= target):
            chosen = value
            break
        below = value
    if chosen is not None and below is not None:
        for _ in range(_REFINE):
            middle = (below + chosen) // 2
            if middle in (below, chosen):
                break
            tried[middle] = _measure(search, queries, query_rows, truth, middle)
            below, chosen = (below, middle) if tried[middle][1] >= target else (middle, chosen)
    value = chosen if chosen is not None else max(tried)
    recall, low, _ = tried[value]
    few = queries[:_LATENCY_QUERIES]
    query_ms = _p50_ms(lambda q: search(q[None], truth.shape[1], value), few)
    exact_ms = None if exact_single is None else _p50_ms(exact_single, few)
    return Tuning(target=target, k=truth.shape[1], param=param, value=int(value), recall=recall, recall_low=low,
                  reached=chosen is not None, queries=len(queries), query_ms=query_ms, exact_query_ms=exact_ms,
                  seconds=time.perf_counter() - t0 + exact_seconds, tried=[[v, tried[v][0]] for v in sorted(tried)])


def _p50_ms(run: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        run(q)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))
