"""VERI-Wild (Lou et al., "A Large-Scale Dataset for Vehicle Re-Identification in the Wild",
CVPR 2019): reader of the three test splits.

Layout::

    <root>/images/<vid>/<imgid>.jpg
    <root>/train_test_split/train_list.txt
    <root>/train_test_split/test_3000.txt   + test_3000_query.txt    split "small"
    <root>/train_test_split/test_5000.txt   + test_5000_query.txt    split "medium"
    <root>/train_test_split/test_10000.txt  + test_10000_query.txt   split "large"
    <root>/train_test_split/vehicle_info.txt

List lines are ``<vid>/<imgid>``. ``vehicle_info.txt`` has one header line, then
``<vid>/<imgid>;<camera id>;<time>;<model>;<type>;<color>`` (fields separated by ``;``);
the evaluation uses the camera, filtered search (``--meta veri-wild:ROOT``) the time too.
174 cameras. Test splits (query = one image per identity, given by ``test_N_query.txt``;
gallery = ``test_N.txt``):

=======  ==========  =========================================================
split    identities  images
=======  ==========  =========================================================
small    3,000       41,861
medium   5,000       69,389
large    10,000      138,517 (10,000 queries x 128,517 gallery images)
=======  ==========  =========================================================

The large split's figures (10,000 + 128,517 = 138,517) say the published gallery lists
hold no query image. The reader does not rely on it: a query image that a gallery list
also names is left out of the gallery (``QueryGallery.query_in_gallery`` counts them,
and ``evaluate`` reports the count), so a gallery never holds a query image itself and
the gallery is "the split's images minus the queries" either way.

Protocol (fast-reid's, the VeRi-776 rule of :mod:`vehiclenet.retrieval.metrics`): for each
query, gallery images with the query's vehicle id *and* its camera are junk, removed
from that query's ranking (neither hits nor misses); mAP, CMC@1/5/10 and mINP over all
queries.
"""
import os
from typing import Dict, List, Set, Tuple

import numpy as np

from ..errors import DataError
from .lists import (LabelledImages, QueryGallery, check_images_exist, check_unique, list_lines, require_dir,
                    require_file)

__all__ = ["SPLITS", "read_veriwild", "read_vehicle_info", "read_vehicle_records", "veriwild_sources"]

SPLITS = {"small": 3000, "medium": 5000, "large": 10000}
_REMEDY = "give the VERI-Wild root holding images/ and train_test_split/ (the dataset's own layout)"
_INFO_LINE = "'<vid>/<imgid>;<camera id>;<time>;<model>;<type>;<color>'"


def veriwild_sources(root: str, split: str) -> Tuple[str, str, str]:
    """(query list, gallery list, vehicle_info.txt) of a test split."""
    folder = os.path.join(root, "train_test_split")
    n = SPLITS[split]
    return (os.path.join(folder, f"test_{n}_query.txt"), os.path.join(folder, f"test_{n}.txt"),
            os.path.join(folder, "vehicle_info.txt"))


def _parse_key(text: str) -> Tuple[str, int]:
    """``"<vid>/<imgid>"`` -> (the key as written, the vehicle id); ValueError if malformed."""
    parts = text.split("/")
    if len(parts) != 2 or not parts[1] or any(c.isspace() for c in text):
        raise ValueError(text)
    return text, int(parts[0])


def _read_list(path: str) -> Tuple[List[str], List[int], List[int]]:
    """Keys, vehicle ids and line numbers of a ``<vid>/<imgid>`` list file."""
    require_file(path, "VERI-Wild list", _REMEDY)
    keys: List[str] = []
    ids: List[int] = []
    linenos: List[int] = []
    for lineno, line in list_lines(path):
        try:
            key, vid = _parse_key(line)
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected '<vid>/<imgid>', got {line[:80]!r}; "
                            "restore the dataset's own list file") from None
        keys.append(key)
        ids.append(vid)
        linenos.append(lineno)
    if not keys:
        raise DataError(f"{path} lists no images (expected lines '<vid>/<imgid>'); restore the dataset's own list file")
    check_unique(path, keys, linenos)
    return keys, ids, linenos


def read_vehicle_info(path: str, wanted: Set[str]) -> Dict[str, int]:
    """Camera ids of the ``wanted`` ``<vid>/<imgid>`` keys from ``vehicle_info.txt``
    (see :func:`read_vehicle_records`)."""
    return {key: cam for key, (cam, _) in read_vehicle_records(path, wanted).items()}


def read_vehicle_records(path: str, wanted: Set[str]) -> Dict[str, Tuple[int, str]]:
    """Camera id and time text of the ``wanted`` ``<vid>/<imgid>`` keys from ``vehicle_info.txt``.

    The first line is the header (skipped when it is not a record); every record line is
    checked, a bad one raises DataError ``"<file>:<line>: expected '...'"``.
    """
    require_file(path, "VERI-Wild vehicle_info.txt", _REMEDY)
    records: Dict[str, Tuple[int, str]] = {}
    first = True
    for lineno, line in list_lines(path):
        fields = line.split(";")
        try:
            if len(fields) < 2:
                raise ValueError
            key, _ = _parse_key(fields[0].strip())
            cam = int(fields[1])
        except ValueError:
            if first:  # the header line
                first = False
                continue
            raise DataError(f"{path}:{lineno}: expected {_INFO_LINE}, got {line[:80]!r}; "
                            "restore the dataset's own vehicle_info.txt") from None
        first = False
        if key in wanted:
            records[key] = (cam, fields[2].strip() if len(fields) > 2 else "")
    return records


def _labelled(image_dir: str, keys: List[str], ids: List[int], cams: Dict[str, int]) -> LabelledImages:
    return LabelledImages([os.path.join(image_dir, *k.split("/")) + ".jpg" for k in keys],
                          np.asarray(ids, dtype=np.int64), np.asarray([cams[k] for k in keys], dtype=np.int64))


def read_veriwild(root: str, split: str) -> QueryGallery:
    """Query and gallery of a VERI-Wild test split (``small``, ``medium`` or ``large``), in list order.

    Cameras come from ``vehicle_info.txt``; images are checked to exist (stat only,
    never opened); query images named by the gallery list are left out of the gallery.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown VERI-Wild split {split!r}; choose from {', '.join(SPLITS)}")
    require_dir(root, "VERI-Wild root", _REMEDY)
    image_dir = os.path.join(root, "images")
    require_dir(image_dir, "VERI-Wild image folder", _REMEDY)
    query_list, gallery_list, info = veriwild_sources(root, split)
    q_keys, q_ids, q_lines = _read_list(query_list)
    g_keys, g_ids, g_lines = _read_list(gallery_list)
    in_query = set(q_keys)
    kept = [i for i, k in enumerate(g_keys) if k not in in_query]
    removed = len(g_keys) - len(kept)
    if not kept:
        raise DataError(f"{gallery_list}: every image it lists is a query of {query_list}; nothing is left "
                        "to search: restore the dataset's own list files")
    g_keys, g_ids, g_lines = [g_keys[i] for i in kept], [g_ids[i] for i in kept], [g_lines[i] for i in kept]
    cams = read_vehicle_info(info, in_query.union(g_keys))
    for list_path, keys, linenos in ((query_list, q_keys, q_lines), (gallery_list, g_keys, g_lines)):
        for key, lineno in zip(keys, linenos):
            if key not in cams:
                raise DataError(f"{list_path}:{lineno}: image {key!r} has no line in {info}, so no camera id; "
                                "restore the dataset's own vehicle_info.txt")
    query = _labelled(image_dir, q_keys, q_ids, cams)
    gallery = _labelled(image_dir, g_keys, g_ids, cams)
    check_images_exist(query_list, query.paths)
    check_images_exist(gallery_list, gallery.paths)
    return QueryGallery(query, gallery, (query_list, gallery_list, info), query_in_gallery=removed)

