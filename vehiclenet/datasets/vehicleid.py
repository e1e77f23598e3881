"""VehicleID (Liu et al., "Deep Relative Distance Learning", CVPR 2016): reader and features file.

Layout::

    <root>/image/<imgid>.jpg
    <root>/train_test_split/train_list.txt        13,164 ids / 113,346 images
    <root>/train_test_split/test_list_800.txt     split "small":    800 ids /  6,493 images
    <root>/train_test_split/test_list_1600.txt    split "medium": 1,600 ids / 13,377 images
    <root>/train_test_split/test_list_2400.txt    split "large":  2,400 ids / 19,777 images
    <root>/train_test_split/test_list_13164.txt   (not used here)

One line per image: ``<imgid> <vehicle id>`` separated by a space. There are no camera
ids. The test protocol (:mod:`vehiclenet.retrieval.protocols`) draws the gallery from the test
list: for each identity one image chosen at random goes to the gallery, all its other
images are queries, so every query has exactly one true match. The original protocol
repeats the random split 10 times and reports mean CMC@1 and CMC@5 (later papers add
mAP); fast-reid does one shuffled split and disables the same-camera junk rule by giving
each image its own "camera", which is what :func:`read_vehicleid` does (``cams`` = the
image's row in the list).

Features file (``evaluate --dataset vehicleid --save-features F.npz``): every test image
once, so trials can re-split without the network:

* ``features``  float32 (N, D), one row per line of the test list, in list order;
* ``ids``       int64 (N,), the vehicle ids;
* ``names``     str (N,), the image ids (``<imgid>``), for reference;
* ``dataset``   0-d str ``"vehicleid"``; ``split`` 0-d str (``small``/``medium``/``large``).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write, read_npz
from .lists import LabelledImages, check_images_exist, check_unique, list_lines, require_dir, require_file

__all__ = ["SPLITS", "read_vehicleid", "read_vehicleid_list", "VehicleIDFeatures", "VEHICLEID_KEYS",
           "load_vehicleid_features", "save_vehicleid_features"]

SPLITS = {"small": "test_list_800.txt", "medium": "test_list_1600.txt", "large": "test_list_2400.txt"}
_LINE = "'<imgid> <vehicle id>'"
_REMEDY = "give the VehicleID root holding image/ and train_test_split/ (the dataset's own layout)"


def read_vehicleid_list(root: str, list_name: str) -> LabelledImages:
    """Images of ``<root>/train_test_split/<list_name>`` with ids, each image its own camera.

    Images are checked to exist (stat only, never opened); a bad line raises DataError
    ``"<file>:<line>: expected '<imgid> <vehicle id>'"``.
    """
    require_dir(root, "VehicleID root", _REMEDY)
    image_dir = os.path.join(root, "image")
    require_dir(image_dir, "VehicleID image folder", _REMEDY)
    list_path = os.path.join(root, "train_test_split", list_name)
    require_file(list_path, "VehicleID list", _REMEDY)
    names: List[str] = []
    ids: List[int] = []
    linenos: List[int] = []
    for lineno, line in list_lines(list_path):
        parts = line.split()
        try:
            if len(parts) != 2 or "/" in parts[0]:
                raise ValueError
            vid = int(parts[1])
        except ValueError:
            raise DataError(f"{list_path}:{lineno}: expected {_LINE}, got {line[:80]!r}; "
                            "restore the dataset's own list file") from None
        names.append(parts[0])
        ids.append(vid)
        linenos.append(lineno)
    if not names:
        raise DataError(f"{list_path} lists no images (expected lines {_LINE}); restore the dataset's own list file")
    check_unique(list_path, names, linenos)
    paths = [os.path.join(image_dir, n + ".jpg") for n in names]
    check_images_exist(list_path, paths)
    return LabelledImages(paths, np.asarray(ids, dtype=np.int64), np.arange(len(paths), dtype=np.int64))


def read_vehicleid(root: str, split: str) -> LabelledImages:
    """All images of a VehicleID test split (``small``, ``medium`` or ``large``), in list order."""
    if split not in SPLITS:
        raise ValueError(f"unknown VehicleID split {split!r}; choose from {', '.join(SPLITS)}")
    return read_vehicleid_list(root, SPLITS[split])


def vehicleid_list_path(root: str, split: str) -> str:
    """The list file of a test split (an input of the command)."""
    return os.path.join(root, "train_test_split", SPLITS[split])


VEHICLEID_KEYS = ("features", "ids")


@dataclass
class VehicleIDFeatures:
    """Features of every image of a VehicleID test split, in list order."""

    features: np.ndarray = field(repr=False)
    ids: np.ndarray = field(repr=False)
    names: Optional[np.ndarray] = field(default=None, repr=False)
    split: Optional[str] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def save_vehicleid_features(path: str, vf: VehicleIDFeatures) -> None:
    """Write the features file described in the module docstring (atomically, exactly ``path``)."""
    arrays: Dict[str, np.ndarray] = {"features": np.asarray(vf.features, dtype=np.float32),
                                     "ids": np.asarray(vf.ids, dtype=np.int64), "dataset": np.asarray("vehicleid")}
    if vf.names is not None:
        arrays["names"] = np.asarray(vf.names, dtype=str)
    if vf.split is not None:
        arrays["split"] = np.asarray(vf.split)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def load_vehicleid_features(path: str) -> VehicleIDFeatures:
    """Read and check a VehicleID features file; DataError names the file, the key and what to do."""
    from ..embedding.files import read_records  # evaluation imports this package
    from ..embedding.checks import as_labels, checked_features

    remedy = "write it with `vehiclenet evaluate --dataset vehicleid --data ROOT --split S --save-features FILE`"
    arrays = read_npz(path, VEHICLEID_KEYS, "a VehicleID features .npz (every test image once: features, ids)",
                      remedy)
    records = read_records(path, arrays)
    if records["dataset"] not in (None, "vehicleid"):
        raise DataError(f"{path}: features of dataset {records['dataset']!r}, not VehicleID; {remedy}")
    feats = checked_features(arrays["features"], path, remedy=remedy)
    try:
        ids = as_labels("ids", arrays["ids"], feats.shape[0])
    except ValueError as exc:
        raise DataError(f"{path}: {exc} to match features; {remedy}") from None
    negative = np.flatnonzero(ids < 0)
    if negative.size:
        raise DataError(f"{path}: ids hold {negative.size} negative value(s) (first at row {negative[0]}); "
                        f"VehicleID's vehicle ids are numbers >= 0; {remedy}")
    if np.unique(ids, return_counts=True)[1].max() < 2:
        raise DataError(f"{path}: no identity has two images, so no trial would have a query; VehicleID's test "
                        f"lists hold several images per vehicle; {remedy}")
    names = arrays.get("names")
    if names is not None and names.shape != (feats.shape[0],):
        raise DataError(f"{path}: names has shape {names.shape}; expected ({feats.shape[0]},) to match features")
    return VehicleIDFeatures(feats, ids, names, records["split"])
