"""VeRi-776 (Liu et al., ICME 2016): reader of the query / test (gallery) / train splits.

Layout: ``<root>/image_query/``, ``<root>/image_test/``, ``<root>/image_train/`` with
files named ``VVVV_cCCC_....jpg`` (vehicle id, camera), optionally listed in
``name_query.txt`` / ``name_test.txt`` / ``name_train.txt`` (lines ``file`` or
``file id camera``). 200 test identities: 1,678 queries against 11,579 gallery images,
20 cameras. Protocol (:mod:`vehiclenet.retrieval.metrics`): gallery images with the query's id
*and* camera are junk, removed from that query's ranking.
"""
import os
import re
from typing import List, Optional, Tuple, Union

import numpy as np

from ..errors import DataError
from ..fileio import is_image_path
from .lists import LabelledImages, QueryGallery, check_images_exist

__all__ = ["VeriSplit", "parse_veri_name", "veri_id", "read_veri_split", "read_veri", "read_veri_test",
           "SPLIT_LISTS"]

# One split of VeRi-776; the same class serves every dataset (``LabelledImages``).
VeriSplit = LabelledImages

_VERI_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:_.*)?\.[^.]+$")  # and an image extension (is_image_path)
SPLIT_DIRS = {"query": "image_query", "test": "image_test", "gallery": "image_test", "train": "image_train"}
SPLIT_LISTS = {"query": "name_query.txt", "test": "name_test.txt", "gallery": "name_test.txt", "train": "name_train.txt"}


def parse_veri_name(name: str) -> Tuple[int, int]:
    """``"0002_c002_00030600_0.jpg"`` -> ``(2, 2)``: vehicle id and camera from a VeRi file name."""
    base = os.path.basename(name.strip())
    match = _VERI_NAME.match(base)
    if match is None or not is_image_path(base):
        raise DataError(
            f"cannot parse a VeRi-776 image name {name!r}: expected 'VVVV_cCCC_....jpg' "
            "(vehicle id, camera), e.g. '0002_c002_00030600_0.jpg'"
        )
    return int(match.group(1)), int(match.group(2))


def veri_id(path: Union[str, os.PathLike]) -> Optional[int]:
    """Vehicle id of a VeRi-776 file name (``0002_c002_....jpg`` -> 2), None for other names."""
    try:
        return parse_veri_name(os.fspath(path))[0]
    except DataError:
        return None


def _read_list_file(list_path: str, image_dir: str) -> Tuple[List[str], List[int], List[int]]:
    names: List[str] = []
    ids: List[int] = []
    cams: List[int] = []
    with open(list_path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) >= 3:
                    vid, cam = int(parts[1]), int(parts[2])
                elif len(parts) == 1:
                    vid, cam = parse_veri_name(parts[0])
                else:
                    raise ValueError("expected 'file' or 'file id camera'")
            except (ValueError, DataError) as exc:
                raise DataError(f"{list_path}, line {lineno}: {exc}") from None
            names.append(parts[0])
            ids.append(vid)
            cams.append(cam)
    paths = [os.path.join(image_dir, n) for n in names]
    check_images_exist(list_path, paths)
    return paths, ids, cams


def read_veri_split(root: str, split: str) -> VeriSplit:
    """Read one VeRi-776 split (``"query"``, ``"test"``/``"gallery"`` or ``"train"``).

    Uses ``name_<split>.txt`` when present (lines ``file id camera``, or only ``file``,
    then id and camera come from the name), else every image in ``image_<split>/``
    sorted by name.
    """
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown VeRi split {split!r}; choose from {sorted(SPLIT_DIRS)}")
    if not os.path.isdir(root):
        raise DataError(f"VeRi-776 root {root!r} is not a directory")
    image_dir = os.path.join(root, SPLIT_DIRS[split])
    if not os.path.isdir(image_dir):
        raise DataError(f"VeRi-776 folder {image_dir!r} is missing (expected the original layout with "
                        "image_query/, image_test/, image_train/)")
    list_path = os.path.join(root, SPLIT_LISTS[split])
    if os.path.isfile(list_path):
        paths, ids, cams = _read_list_file(list_path, image_dir)
    else:
        names = sorted(n for n in os.listdir(image_dir) if is_image_path(n))
        paths, ids, cams = [], [], []
        for n in names:
            try:
                vid, cam = parse_veri_name(n)
            except DataError as exc:
                raise DataError(f"{image_dir}: {exc}") from None
            paths.append(os.path.join(image_dir, n))
            ids.append(vid)
            cams.append(cam)
    if not paths:
        raise DataError(f"no images found for VeRi-776 split {split!r} in {image_dir!r}")
    return VeriSplit(paths, np.asarray(ids, dtype=np.int64), np.asarray(cams, dtype=np.int64))


def read_veri(root: str) -> Tuple[VeriSplit, VeriSplit]:
    """The VeRi-776 test protocol: (query split, gallery split = ``image_test``)."""
    return read_veri_split(root, "query"), read_veri_split(root, "test")


def read_veri_test(root: str, split: Optional[str] = None) -> QueryGallery:
    """:func:`read_veri` as the registry's reader (VeRi-776 has one test split: ``split`` is None)."""
    query, gallery = read_veri(root)
    sources = tuple(os.path.join(root, SPLIT_LISTS[s]) for s in ("query", "test"))
    return QueryGallery(query, gallery, sources)
