"""Reading stored features: ``embed``'s file or chunk folder (:func:`load_features`), and
``evaluate``'s query and gallery features with their labels (:class:`FeatureSet`), each an .npz
read without pickle and written atomically."""
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write, read_npz
from .checks import as_labels, checked_features
from .result import FeatureResult, read_features_file

__all__ = ["load_features", "FEATURE_KEYS", "RECORD_KEYS", "FeatureSet", "load_features_npz",
           "save_features_npz", "read_records"]


def load_features(path: Union[str, os.PathLike]) -> FeatureResult:
    """Read a file written by :func:`~vehiclenet.embedding.result.save_features` (or ``vehiclenet embed``), or a folder of
    chunks written by ``vehiclenet embed --out-dir`` (:func:`vehiclenet.embedding.shards.load_feature_shards`).

    Raises:
        DataError: missing file, not an .npz, keys ``features``/``paths`` missing or inconsistent;
            for a folder, chunks missing or failing verification.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        from .shards import load_feature_shards

        return load_feature_shards(name)
    return read_features_file(name)


FEATURE_KEYS = ("query_features", "query_ids", "query_cams", "gallery_features", "gallery_ids", "gallery_cams")
# Optional text entries (0-d strings): the dataset and test split the features were computed for.
RECORD_KEYS = ("dataset", "split")


@dataclass
class FeatureSet:
    """Query and gallery embeddings with their labels, as stored in a features .npz.

    ``dataset`` and ``split`` record what the features were computed for (None when the
    file does not say: files written before they were recorded, or by hand).
    """

    query_features: np.ndarray = field(repr=False)
    query_ids: np.ndarray = field(repr=False)
    query_cams: np.ndarray = field(repr=False)
    gallery_features: np.ndarray = field(repr=False)
    gallery_ids: np.ndarray = field(repr=False)
    gallery_cams: np.ndarray = field(repr=False)
    dataset: Optional[str] = None
    split: Optional[str] = None


def load_features_npz(path: str) -> FeatureSet:
    """Read and check a features file (keys in ``FEATURE_KEYS``); DataError names file and key."""
    remedy = "write it with `vehiclenet evaluate --data ... --save-features FILE`"
    arrays = read_npz(path, FEATURE_KEYS, "a features .npz written by `vehiclenet evaluate --save-features`",
                      remedy)
    for side in ("query", "gallery"):
        feats = arrays[f"{side}_features"]
        key = f"{side}_features"
        arrays[key] = feats = checked_features(feats, path, key, remedy=remedy)
        for lab in ("ids", "cams"):
            lkey = f"{side}_{lab}"
            arr = arrays[lkey]
            if arr.shape != (feats.shape[0],):
                raise DataError(f"{path}: {lkey} has shape {arr.shape}; expected ({feats.shape[0]},) "
                                f"to match {key}")
            try:
                arrays[lkey] = as_labels(lkey, arr, feats.shape[0])
            except ValueError as exc:
                raise DataError(f"{path}: {exc}") from None
    if arrays["query_features"].shape[1] != arrays["gallery_features"].shape[1]:
        raise DataError(f"{path}: query_features and gallery_features have different widths "
                        f"({arrays['query_features'].shape[1]} vs {arrays['gallery_features'].shape[1]})")
    return FeatureSet(**{k: arrays[k] for k in FEATURE_KEYS}, **read_records(path, arrays))


def read_records(path: str, arrays: Dict[str, np.ndarray]) -> Dict[str, Optional[str]]:
    """The ``RECORD_KEYS`` text entries of a loaded .npz (None where absent); DataError if not text."""
    out: Dict[str, Optional[str]] = {}
    for key in RECORD_KEYS:
        value = arrays.get(key)
        if value is not None and (value.ndim != 0 or value.dtype.kind != "U"):
            raise DataError(f"{path}: {key} must be a single string, got shape {value.shape} dtype {value.dtype}")
        out[key] = None if value is None else str(value)
    return out


def save_features_npz(path: str, features: FeatureSet) -> None:
    """Write a features file readable by :func:`load_features_npz` (``evaluate --features``).

    Written atomically, under exactly the name given (no ``.npz`` appended). ``dataset`` and
    ``split``, when set, are stored as 0-d strings (read without pickle).
    """
    arrays = {k: getattr(features, k) for k in FEATURE_KEYS}
    arrays.update({k: np.asarray(getattr(features, k)) for k in RECORD_KEYS if getattr(features, k) is not None})
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)
