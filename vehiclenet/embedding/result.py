"""What embedding returns, features with the names of the images they came from, and the one
.npz file that stores them (``vehiclenet embed --out``)."""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write, read_npz
from .checks import checked_features

__all__ = ["FeatureResult", "save_features", "read_features_file"]


@dataclass
class FeatureResult:
    """Features with the names of the images they came from, in input order.

    ``features[i]`` belongs to ``paths[i]``. ``skipped`` lists ``(path, reason)`` of the
    inputs left out (only with ``skip_bad=True``). ``extra`` holds any other arrays of a
    features file read by :func:`load_features`; ``seconds`` the wall time of :func:`embed`.
    """

    features: np.ndarray
    paths: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    extra: Dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)


def save_features(path: Union[str, os.PathLike], features: np.ndarray, paths: Sequence[str], **extra: Any) -> Path:
    """Write ``features`` (float32) and ``paths`` (str) plus ``extra`` arrays to an .npz file.

    The file is written under a temporary name and renamed, so a crash never leaves a
    half-written file; the name is used as given (no ``.npz`` appended).
    """
    feats = np.asarray(features, dtype=np.float32)
    names = np.asarray([str(p) for p in paths], dtype=str)
    if feats.ndim != 2 or feats.shape[0] != names.shape[0]:
        raise ValueError(f"features {feats.shape} and {names.shape[0]} paths do not match")
    for key in ("features", "paths"):
        if key in extra:
            raise ValueError(f"extra key {key!r} is reserved")
    with atomic_write(path) as fh:
        np.savez(fh, features=feats, paths=names, **{k: np.asarray(v) for k, v in extra.items()})
    return Path(path)


def read_features_file(name: str) -> FeatureResult:
    """Read one file written by :func:`save_features`; DataError names the file and what is wrong."""
    remedy = "run `vehiclenet embed` to write it"
    arrays = read_npz(name, ("features", "paths"), "a features .npz written by `vehiclenet embed`", remedy)
    feats = checked_features(arrays.pop("features"), name, remedy=remedy)
    names = arrays.pop("paths")
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"{name}: paths must be a 1-D array of text, got shape {names.shape} dtype {names.dtype}")
    paths = [str(p) for p in names.tolist()]
    if feats.shape[0] != len(paths):
        raise DataError(f"{name}: features shape {feats.shape} does not match {len(paths)} paths")
    return FeatureResult(features=feats, paths=paths, extra=arrays)
