"""The checks every reader of stored features applies (``embed`` files, chunk folders, index
inputs, ``evaluate`` and VehicleID files), so no command accepts what another refuses.

vehiclenet compares features by cosine, as dot products of unit rows: a row that is not a
finite unit vector of floats (NaN, all zeros, integers, unnormalised) gives distances with
no meaning (-1e29 was seen), so it is refused with the file, key and row named.
"""
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["NORM_TOLERANCE", "as_labels", "checked_features", "stored_flag"]

# |norm - 1| allowed: float16 storage moves a unit row's norm by ~1e-3.
NORM_TOLERANCE = 1e-2
_BLOCK = 1 << 16  # rows checked at a time: no temporary the size of a million-row gallery


def checked_features(feats: Any, where: str, key: str = "features", *, remedy: str = "",
                     allow_empty: bool = False) -> np.ndarray:
    """``feats`` as a float32 2-D array of finite unit rows, or DataError naming ``where`` and ``key``.

    ``allow_empty`` accepts zero rows (a chunk whose images were all skipped).
    """
    tail = f"; {remedy}" if remedy else ""
    arr = np.asarray(feats)
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise DataError(f"{where}: {key} must be a 2-D array of floats (a row per image), got shape {arr.shape} "
                        f"dtype {arr.dtype}{tail}")
    if arr.shape[0] == 0 and not allow_empty:
        raise DataError(f"{where}: {key} has no rows: nothing to search or compare{tail}")
    if arr.shape[1] == 0:
        raise DataError(f"{where}: {key} has shape {arr.shape}: 0-wide features hold nothing to compare{tail}")
    arr = arr.astype(np.float32, copy=False)
    for start in range(0, arr.shape[0], _BLOCK):
        _check_rows(arr[start:start + _BLOCK], start, where, key, tail)
    return arr


def _check_rows(block: np.ndarray, start: int, where: str, key: str, tail: str) -> None:
    if not np.isfinite(block).all():
        row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise DataError(f"{where}: {key} contains NaN or inf (row {row}){tail}")
    wide = block.astype(np.float64)  # squares of unnormalised float32 rows may overflow float32
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        rows = ", ".join(str(start + r) for r in zero[:10]) + (", ..." if zero.size > 10 else "")
        raise DataError(f"{where}: {key} has {zero.size} all-zero row(s) (rows {rows}), which have no direction "
                        f"and so no cosine distance; embed those images again or leave them out of the file")
    off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if off.size:
        row = int(off[0])
        raise DataError(f"{where}: {key} row {start + row} has length {norms[row]:.6g}, not 1: vehiclenet compares "
                        "L2-normalised features (what `vehiclenet embed` writes); divide each row by its length")


def as_labels(name: str, values: Sequence[int], n: int) -> np.ndarray:
    """``values`` as ``n`` int64 labels (whole floats accepted); ValueError naming ``name`` if not."""
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} has shape {arr.shape}; expected ({n},)")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integers (dtype {arr.dtype})")
    return arr.astype(np.int64, copy=False)


def stored_flag(arrays: Mapping[str, Any], key: str, where: str) -> Optional[bool]:
    """The 0-d boolean ``key`` of a features file (None when absent); DataError for anything else."""
    if key not in arrays:
        return None
    value = np.asarray(arrays[key])
    if value.ndim != 0 or value.dtype.kind not in "bi" or int(value) not in (0, 1):
        raise DataError(f"{where}: {key} must be a single true/false value, got shape {value.shape} "
                        f"dtype {value.dtype}")
    return bool(value)
