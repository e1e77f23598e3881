"""Per-image metadata (camera, time, tags) that filtered search uses, and where it comes from.

A :class:`RowMeta` holds, per row of a features file or gallery index, a camera id
(``UNKNOWN_CAMERA`` when not known), a time in whole seconds since 1970-01-01 UTC
(``UNKNOWN_TIME`` when not known) and a tags string (comma-separated labels, "" for none).
They are read by :func:`read_meta` from:

* a CSV file with a header naming ``path`` and any of ``camera``, ``time``, ``tags``;
  rows are matched to images by path (as given to ``embed``, or the same file by real path);
* ``veri``: cameras from VeRi-776 file names (``0002_c002_....jpg``);
* ``veri-wild:ROOT``: cameras and times from VERI-Wild's ``train_test_split/vehicle_info.txt``.

Times are whole seconds or ISO 8601 date-times (``2018-03-11 11:40:38``, ``2018-03-11T11:40``,
with an optional UTC offset; without one they are read as UTC).
"""
import csv
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, UsageError

__all__ = ["COLUMNS", "RowMeta", "UNKNOWN_CAMERA", "UNKNOWN_TIME", "check_source", "open_csv", "parse_time",
           "read_meta", "tag_set"]

UNKNOWN_CAMERA = -1
UNKNOWN_TIME = np.iinfo(np.int64).min
#: Keys of the metadata columns in a features file (and parts of an index).
COLUMNS = ("cams", "times", "tags")


@dataclass
class RowMeta:
    """Metadata columns, one value per row; a column nobody gave is None."""

    cams: Optional[np.ndarray] = None  # int64
    times: Optional[np.ndarray] = None  # int64 seconds
    tags: Optional[List[str]] = None

    def as_extra(self) -> Dict[str, np.ndarray]:
        """The columns as features-file keys (``save_features(..., **meta.as_extra())``)."""
        out: Dict[str, np.ndarray] = {}
        if self.cams is not None:
            out["cams"] = np.asarray(self.cams, dtype=np.int64)
        if self.times is not None:
            out["times"] = np.asarray(self.times, dtype=np.int64)
        if self.tags is not None:
            out["tags"] = np.asarray(self.tags, dtype=str)
        return out


# Years 1 to 9999 (what date-times can print); a time in milliseconds lands far beyond.
_FIRST_TIME, _LAST_TIME = -62_135_596_800, 253_402_300_799


def parse_time(text: str, where: str = "time") -> int:
    """Whole seconds since 1970-01-01 UTC of ``text``: an integer, or an ISO 8601 date-time
    (UTC unless it carries an offset), within the years 1-9999. UsageError naming ``where`` otherwise."""
    value = str(text).strip()
    try:
        seconds = int(value)
    except ValueError:
        return _date_time(value, where)
    if not _FIRST_TIME <= seconds <= _LAST_TIME:
        raise UsageError(f"{where}: {value} seconds is beyond the years 1-9999; give whole seconds since 1970 "
                         "(milliseconds divided by 1000)")
    return seconds


def _date_time(value: str, where: str) -> int:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{where}: {value!r} is not a time: give whole seconds since 1970 (1520768438) or a "
                         "date-time (2018-03-11 11:40:38, read as UTC unless it ends in an offset like +08:00)") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def tag_set(tags: str) -> frozenset:
    """The labels of a tags string ("red, sedan" -> {"red", "sedan"})."""
    return frozenset(t.strip() for t in tags.split(",") if t.strip())


def check_source(source: str) -> None:
    """UsageError, before any work, when ``source`` is no metadata source :func:`read_meta` reads."""
    if source == "veri" or (source.startswith("veri-wild:") and len(source) > len("veri-wild:")):
        return
    if not os.path.isfile(source):
        raise UsageError(f"--meta {source}: no such file; give a CSV file (header: path,camera,time,tags), "
                         "`veri` (cameras from VeRi-776 file names) or `veri-wild:ROOT`")


def open_csv(path: str):
    """``path`` opened for csv (UTF-8, with or without the byte-order mark spreadsheets write)."""
    from ..fileio import open_regular

    return open(open_regular(path, os.O_RDONLY, follow=True), encoding="utf-8-sig", newline="")


def read_meta(source: str, paths: Sequence[str]) -> RowMeta:
    """Metadata of the images ``paths`` from ``source`` (a CSV file, ``veri`` or
    ``veri-wild:ROOT``; see the module docstring). DataError naming the file and the first
    image it has nothing for; UsageError for an unknown source."""
    if source == "veri":
        return _veri_names(paths)
    if source.startswith("veri-wild:"):
        return _veri_wild(source.split(":", 1)[1], paths)
    check_source(source)
    return _csv(source, paths)


def _csv(path: str, paths: Sequence[str]) -> RowMeta:
    fields, rows = _csv_rows(path)
    found = []
    for p in paths:
        row = rows.get(_key(p)) or rows.get(os.path.realpath(p))
        if row is None:
            raise DataError(f"{path}: has no row for {p} (nor for the same file by real path); list every image "
                            f"({len(paths)} in all) or leave a column empty where it is not known")
        found.append(row)
    meta = RowMeta()
    if "camera" in fields:
        meta.cams = np.array([_camera(r.get("camera"), f"{path}:{r['_line']}") for r in found], dtype=np.int64)
    if "time" in fields:
        meta.times = np.array([UNKNOWN_TIME if not (r.get("time") or "").strip()
                               else _time(r["time"], f"{path}:{r['_line']}") for r in found], dtype=np.int64)
    if "tags" in fields:
        meta.tags = [",".join(sorted(tag_set(r.get("tags") or ""))) for r in found]
    return meta


def _csv_rows(path: str) -> Tuple[List[str], Dict[str, Dict[str, str]]]:
    """The header and the rows (by normalised path, each with its ``_line``) of a metadata CSV."""
    rows: Dict[str, Dict[str, str]] = {}
    try:
        with open_csv(path) as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if "path" not in fields or not set(fields) & {"camera", "time", "tags"}:
                raise DataError(f"{path}: its header must name a path column and at least one of camera, time, "
                                f"tags (it names {', '.join(fields) or 'nothing'})")
            reader.fieldnames = fields
            for lineno, row in enumerate(reader, 2):
                key = (row.get("path") or "").strip()
                if not key:
                    raise DataError(f"{path}:{lineno}: no path")
                if _key(key) in rows:
                    raise DataError(f"{path}:{lineno}: {key} is listed twice")
                rows[_key(key)] = {**row, "_line": str(lineno)}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc}); save it as CSV UTF-8") from None
    return fields, rows


def _key(path: str) -> str:
    return os.path.normpath(path)


def _camera(text: Optional[str], where: str) -> int:
    value = (text or "").strip()
    if not value:
        return UNKNOWN_CAMERA
    try:
        cam = int(value)
    except ValueError:
        raise DataError(f"{where}: camera {value!r} is not a whole number") from None
    if not 0 <= cam < 2 ** 31:
        raise DataError(f"{where}: camera {cam} is not from 0 to {2 ** 31 - 1} (leave it empty if unknown)")
    return cam


def _time(text: str, where: str) -> int:
    try:
        return parse_time(text, where)
    except UsageError as exc:
        raise DataError(str(exc)) from None


def _veri_names(paths: Sequence[str]) -> RowMeta:
    from ..datasets.veri import parse_veri_name

    return RowMeta(cams=np.array([parse_veri_name(p)[1] for p in paths], dtype=np.int64))


def _veri_wild(root: str, paths: Sequence[str]) -> RowMeta:
    from ..datasets.veriwild import read_vehicle_records

    info = os.path.join(root, "train_test_split", "vehicle_info.txt")
    keys = ["/".join(os.path.splitext(os.path.normpath(p))[0].split(os.sep)[-2:]) for p in paths]
    records = read_vehicle_records(info, set(keys))
    missing = [p for p, k in zip(paths, keys) if k not in records]
    if missing:
        raise DataError(f"{info}: has no record for {missing[0]} (key {keys[paths.index(missing[0])]!r}) "
                        f"nor for {len(missing) - 1} other image(s); give images of VERI-Wild (images/<vid>/<imgid>.jpg)")
    return RowMeta(cams=np.array([records[k][0] for k in keys], dtype=np.int64),
                   times=np.array([_time(records[k][1], f"{info}: {k}") for k in keys], dtype=np.int64))
