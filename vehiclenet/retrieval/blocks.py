"""Distance matrices as streams of row blocks, for problems whose whole matrix does not fit.

A *row-block stream* is an iterable of ``(row_start, block)`` pairs: ``block`` holds rows
``row_start : row_start + len(block)`` of a (num_rows, num_cols) matrix. Consumers
(:func:`vehiclenet.retrieval.metrics.evaluate_blocks`) take each block and drop it, so memory
is bounded by a few blocks, never the whole matrix. Blocks may come in any order but
must cover every row exactly once.
"""
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, Tuple, TypeVar

import numpy as np

__all__ = ["RowBlocks", "ordered_map", "collect", "check_block", "check_covered"]

#: ``(row_start, block)`` pairs covering the rows of a matrix once each.
RowBlocks = Iterable[Tuple[int, np.ndarray]]

_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``workers`` results
    computed ahead of the consumer (``ThreadPoolExecutor.map`` submits everything at once,
    which for blocks of a large matrix would hold all of them)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: Deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def collect(blocks: RowBlocks, shape: Tuple[int, int], dtype: np.dtype = np.float32) -> np.ndarray:
    """The whole matrix of a row-block stream (for small problems and tests); ValueError
    if the blocks miss or repeat a row or do not fit ``shape``."""
    out = np.empty(shape, dtype=dtype)
    seen = np.zeros(shape[0], dtype=bool)
    for start, block in blocks:
        check_block(start, block, shape, seen)
        out[start : start + block.shape[0]] = block
    check_covered(seen)
    return out


def check_block(start: int, block: np.ndarray, shape: Tuple[int, int], seen: np.ndarray) -> None:
    """ValueError unless ``block`` is rows ``start:`` of a ``shape`` matrix not seen before; marks them seen."""
    if block.ndim != 2 or block.shape[1] != shape[1]:
        raise ValueError(f"distance block at row {start} has shape {block.shape}; expected (rows, {shape[1]})")
    stop = start + block.shape[0]
    if start < 0 or stop > shape[0]:
        raise ValueError(f"distance block rows {start}:{stop} lie outside the {shape[0]} query rows")
    if seen[start:stop].any():
        raise ValueError(f"distance block rows {start}:{stop} overlap rows given before")
    seen[start:stop] = True


def check_covered(seen: np.ndarray) -> None:
    """ValueError naming the first missing row if the blocks did not cover every row."""
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise ValueError(f"distance blocks cover {seen.size - missing.size} of {seen.size} query rows "
                         f"(row {missing[0]} is missing)")
