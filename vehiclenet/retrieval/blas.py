"""Float32 matrix products whose every bit is fixed by the inputs, on a BLAS that knows the CPU.

Two problems with numpy's ``a @ b.T`` for retrieval:

* **Which BLAS.** MindSpore 2.8 pins numpy 1.26, whose bundled OpenBLAS 0.3.23 does not
  know CPUs released after it and falls back to a generic kernel (27 GFLOP/s against 197
  on a Xeon with AMX). scipy's bundled OpenBLAS is newer and picks its kernel by the
  CPU's features, so products here go through ``scipy.linalg.blas.sgemm``.
* **Which bits.** A BLAS sums each dot product in an order that depends on the shapes it
  is given and on how it splits them over threads (edge kernels, small-matrix paths):
  ``a[0:7] @ b.T`` and ``a @ b.T`` can differ in the last bit of some elements, and so
  can re-ranking and rankings built on them. Here every product is computed in a tile of
  ``tile_rows`` rows of ``a``, aligned to row 0 of ``a`` (the last one shorter),
  against all of ``b``, with the BLAS on one thread; tiles run on our own threads. An
  element's bits then depend on ``a``, ``b`` and the BLAS kernel only, never on the
  block size or the number of workers a caller chose.
"""
import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

__all__ = ["TILE_ROWS", "matmul_nt", "gram_rows", "blas_libraries", "evaluation_blas"]

#: Rows of ``a`` per BLAS call: a multiple of every x86 sgemm kernel's unroll, and large
#: enough for one thread to reach its full rate (86 GFLOP/s at 128 rows, 103 at 256+ on Zen 4).
TILE_ROWS = 256

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values

_limit_lock = threading.Lock()
_limit_depth = 0
_limiter = None


def _sgemm():
    from scipy.linalg.blas import sgemm

    return sgemm


@functools.lru_cache(maxsize=None)
def _cblas_sgemm() -> Optional[Callable]:
    """scipy's ``cblas_sgemm`` through ctypes, which releases the GIL (scipy's f2py wrapper
    keeps it, so tiles on several threads would run one at a time); None if not found."""
    _sgemm()  # loads scipy's BLAS
    for lib in _controller().info():
        path = str(lib.get("filepath") or "")
        if lib.get("user_api") != "blas" or "scipy" not in os.path.basename(path):
            continue
        handle = ctypes.CDLL(path)
        for symbol in ("scipy_cblas_sgemm", "cblas_sgemm"):
            func = getattr(handle, symbol, None)
            if func is not None:
                i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                func.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
                func.restype = None
                return func
    return None


def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Every BLAS on one thread while any caller is inside; re-entrant across threads.

    A BLAS's thread count changes how it splits a product, hence which kernel sums which
    element. The first caller in sets the limit, the last one out restores it.
    """
    global _limit_depth, _limiter
    with _limit_lock:
        if _limit_depth == 0:
            _sgemm()  # scipy's BLAS must be loaded before the controller looks for libraries
            _limiter = _controller().limit(limits=1, user_api="blas")
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def _tile_into(a: np.ndarray, b: np.ndarray, tile: int, tile_rows: int, out: np.ndarray) -> None:
    """``out`` (C-order) = rows of tile number ``tile`` of ``a``, times ``b.T``."""
    rows = a[tile * tile_rows : (tile + 1) * tile_rows]
    if out.size == 0 or rows.shape[1] == 0:  # BLAS rejects zero leading dimensions
        out.fill(0.0)
        return
    cblas = _cblas_sgemm()
    if cblas is not None:
        (m, k), n = rows.shape, b.shape[0]
        cblas(_ROW_MAJOR, _NO_TRANS, _TRANS, m, n, k, 1.0, rows.ctypes.data, k, b.ctypes.data, k, 0.0,
              out.ctypes.data, n)
        return
    # C-order (T, N) is Fortran (N, T) = b @ rows.T: BLAS sees Fortran views, nothing is copied.
    got = _sgemm()(1.0, b.T, rows.T, beta=0.0, c=out.T, trans_a=1, overwrite_c=1)
    if not np.shares_memory(got, out):  # f2py copied instead of writing in place
        out[...] = got.T


def gram_rows(a: np.ndarray, b: np.ndarray, start: int, stop: int, *, tile_rows: int = TILE_ROWS) -> np.ndarray:
    """Rows ``start:stop`` of ``a @ b.T`` (float32), bit-identical to the same rows of any
    other call with the same ``a``, ``b`` and ``tile_rows``. Call inside :func:`one_blas_thread`.

    Whole tiles are always computed (a tile is rows ``t*tile_rows`` up to the next multiple,
    or to the end of ``a``), so a range that cuts a tile costs that tile's extra rows.
    """
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    stop = min(stop, a.shape[0])
    out = np.empty((max(stop - start, 0), b.shape[0]), dtype=np.float32)
    for tile in range(start // tile_rows, -(-stop // tile_rows)):
        t0, t1 = tile * tile_rows, min((tile + 1) * tile_rows, a.shape[0])
        lo, hi = max(t0, start), min(t1, stop)
        if (lo, hi) == (t0, t1):
            _tile_into(a, b, tile, tile_rows, out[lo - start : hi - start])
        else:
            scratch = np.empty((t1 - t0, b.shape[0]), dtype=np.float32)
            _tile_into(a, b, tile, tile_rows, scratch)
            out[lo - start : hi - start] = scratch[lo - t0 : hi - t0]
    return out


def matmul_nt(a: np.ndarray, b: np.ndarray, *, workers: Optional[int] = None, tile_rows: int = TILE_ROWS) -> np.ndarray:
    """``a @ b.T`` in float32 on scipy's BLAS, the same bits for any ``workers``."""
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not match (dimension {a.shape[1]} vs {b.shape[1]})")
    n_tiles = -(-a.shape[0] // tile_rows)
    workers = max(1, min(workers or os.cpu_count() or 1, n_tiles))
    bounds = [(t * tile_rows, min((t + 1) * tile_rows, a.shape[0])) for t in range(n_tiles)]
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)

    def run(span: Tuple[int, int]) -> None:
        out[span[0] : span[1]] = gram_rows(a, b, span[0], span[1], tile_rows=tile_rows)

    with one_blas_thread():
        if workers == 1:
            for span in bounds:
                run(span)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, bounds))
    return out


def blas_libraries() -> List[Dict[str, object]]:
    """Every BLAS loaded in this process: library, version, kernel (``architecture``), threads."""
    _sgemm()  # make sure scipy's BLAS is loaded, so that it is listed
    keys = ("internal_api", "prefix", "version", "architecture", "num_threads", "filepath")
    return [{k: info.get(k) for k in keys} for info in _controller().info() if info.get("user_api") == "blas"]


def evaluation_blas() -> Dict[str, object]:
    """The BLAS that :func:`matmul_nt` runs on (scipy's bundled one), as :func:`blas_libraries` lists it."""
    libs = blas_libraries()
    for lib in libs:
        if "scipy" in os.path.basename(str(lib.get("filepath") or "")):
            return lib
    # A scipy linked against a system BLAS: the one library other than numpy's.
    others = [lib for lib in libs if "numpy" not in str(lib.get("filepath") or "")]
    return (others or libs or [{"internal_api": "unknown"}])[0]
