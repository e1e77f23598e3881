"""Tracklets: the images of one vehicle's pass before a camera, searched as one.

VeRi-776's and VERI-Wild's track protocols compare tracks (image-to-track, track-to-track)
rather than single images. :func:`aggregate` averages the L2-normalised features of each
track's images and normalises the mean again, the usual average pooling of those protocols;
the result is a features file like any other (one row per track, named by the track), so
``index build``, ``search`` and ``rank`` work on tracks unchanged.

A track list (:func:`read_tracklets`) is a CSV file with a header naming ``path`` and
``track``; every embedded image must be listed once.
"""
import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from ..errors import DataError
from .metadata import UNKNOWN_CAMERA, UNKNOWN_TIME, tag_set

__all__ = ["Tracklets", "aggregate", "read_tracklets"]


@dataclass
class Tracklets:
    """One row per track, in order of each track's first image."""

    features: np.ndarray  # (T, D) float32, L2-normalised
    names: List[str]
    sizes: np.ndarray  # images per track (int64)
    extra: Dict[str, np.ndarray]  # cams / times / tags of the tracks, where the images had them


def read_tracklets(path: str, paths: Sequence[str]) -> List[str]:
    """The track of each of ``paths`` from the track list ``path`` (matched as given, or as
    the same file by real path). DataError naming the list and the first unlisted image."""
    from .metadata import open_csv

    try:
        fh = open_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such track list; give a CSV file with a header naming path and track") \
            from None
    try:
        tracks = _tracks(path, fh)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc}); save it as CSV UTF-8") from None
    out = []
    for p in paths:
        track = tracks.get(os.path.normpath(p)) or tracks.get(os.path.realpath(p))
        if track is None:
            raise DataError(f"{path}: lists no track for {p}; list every image embedded ({len(paths)} in all)")
        out.append(track)
    return out


def _tracks(path: str, fh) -> Dict[str, str]:
    with fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if not {"path", "track"} <= set(fields):
            raise DataError(f"{path}: its header must name path and track (it names {', '.join(fields) or 'nothing'})")
        reader.fieldnames = fields
        tracks: Dict[str, str] = {}
        for lineno, row in enumerate(reader, 2):
            image, track = (row.get("path") or "").strip(), (row.get("track") or "").strip()
            if not image or not track:
                raise DataError(f"{path}:{lineno}: needs a path and a track")
            if os.path.normpath(image) in tracks:
                raise DataError(f"{path}:{lineno}: {image} is listed twice")
            tracks[os.path.normpath(image)] = track
    return tracks


def aggregate(features: np.ndarray, tracks: Sequence[str], extra: Dict[str, np.ndarray] = None) -> Tracklets:
    """Average each track's rows of ``features`` (L2-normalised) and normalise the means.

    ``extra`` may hold the images' ``cams`` (a track's camera when all its images share one,
    else unknown), ``times`` (its first known time) and ``tags`` (the union of its images')."""
    feats = np.asarray(features, dtype=np.float32)
    if len(tracks) != len(feats):
        raise DataError(f"{len(tracks)} track names for {len(feats)} features")
    names, first = np.unique(np.asarray(tracks, dtype=str), return_index=True)
    order = np.argsort(first, kind="stable")  # tracks in the order their first images came
    names = names[order]
    position = {name: i for i, name in enumerate(names.tolist())}
    member = np.array([position[t] for t in tracks], dtype=np.int64)
    sums = np.zeros((len(names), feats.shape[1]), dtype=np.float64)
    np.add.at(sums, member, feats.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DataError(f"track {names[int(np.flatnonzero(norms[:, 0] == 0)[0])]}: its images' features cancel out "
                        "(sum zero); check its images")
    sizes = np.bincount(member, minlength=len(names)).astype(np.int64)
    return Tracklets((sums / norms).astype(np.float32), names.tolist(), sizes, _track_columns(extra or {}, member,
                                                                                                len(names)))


def _track_columns(extra: Dict[str, np.ndarray], member: np.ndarray, count: int) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    if "cams" in extra:
        cams = np.asarray(extra["cams"], dtype=np.int64)
        lo = np.full(count, np.iinfo(np.int64).max)
        hi = np.full(count, np.iinfo(np.int64).min)
        np.minimum.at(lo, member, cams)
        np.maximum.at(hi, member, cams)
        out["cams"] = np.where(lo == hi, lo, UNKNOWN_CAMERA)
    if "times" in extra:
        times = np.asarray(extra["times"], dtype=np.int64)
        known = np.where(times == UNKNOWN_TIME, np.iinfo(np.int64).max, times)
        first = np.full(count, np.iinfo(np.int64).max)
        np.minimum.at(first, member, known)
        out["times"] = np.where(first == np.iinfo(np.int64).max, UNKNOWN_TIME, first)
    if "tags" in extra:
        union: List[set] = [set() for _ in range(count)]
        for m, tags in zip(member.tolist(), np.asarray(extra["tags"], dtype=str).tolist()):
            union[m] |= tag_set(tags)
        out["tags"] = np.asarray([",".join(sorted(u)) for u in union], dtype=str)
    return out
