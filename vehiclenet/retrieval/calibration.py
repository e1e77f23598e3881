""""Same vehicle?": a distance threshold calibrated on labelled features, and the ROC behind it.

Every pair of labelled features is a same-vehicle pair (same id) or a different-vehicle pair.
With cameras known, same-vehicle pairs from one camera are left out, as re-ID evaluation
leaves them out as junk: a decision between two cameras is what a threshold is for. Pair
distances (1 - cos) are counted in :data:`BINS` bins over [0, 2], block by block, so a
gallery of N images needs no N x N matrix. The threshold for a false-match rate ``f`` is the
largest bin edge below which at most ``f`` of the different-vehicle pairs fall: a pair is
called the same vehicle when its distance is below it. The ROC reports the true-match rate
(TPR) at false-match rates (FPR) 1e-4, 1e-3 and 1e-2, as fast-reid does.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from ..embedding.checks import as_labels, checked_features

__all__ = ["BINS", "FPRS", "Calibration", "calibrate", "cross_histograms", "load_calibration", "pair_histograms",
           "roc", "same_vehicle", "save_calibration"]

BINS = 20000  # over [0, 2]: thresholds to 1e-4 in distance
FPRS = (1e-4, 1e-3, 1e-2)
_BLOCK_ELEMENTS = 1 << 22  # distances computed at a time (16 MiB of float32)
_PICTURE_BINS = 100  # the histograms kept in the file, for a picture: 2 x 100 counts
FORMAT = "vehiclenet-threshold"

PathLike = Union[str, os.PathLike]


@dataclass
class Calibration:
    """A calibrated same-vehicle threshold: distance below ``distance`` means the same vehicle.

    ``fmr`` is the false-match rate asked for, ``measured_fmr`` and ``tpr`` what the labelled
    pairs gave at the threshold; ``roc`` maps "1e-04" etc. to the TPR at that FPR; ``histogram``
    holds :data:`_PICTURE_BINS` counts of each kind of pair over [0, 2]; ``curve`` the ROC at
    61 FPRs spaced evenly in log from the smallest measurable to 1.
    """

    distance: float
    fmr: float
    measured_fmr: float
    tpr: float
    roc: Dict[str, float]
    positives: int
    negatives: int
    histogram: Dict[str, List[int]] = field(repr=False)
    curve: Dict[str, List[float]] = field(repr=False, default_factory=dict)
    source: Optional[str] = None

    def same(self, distance: float) -> bool:
        """Whether a pair at ``distance`` is called the same vehicle."""
        return bool(distance < self.distance)

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "threshold": asdict(self)}


def pair_histograms(features: Any, ids: Sequence[int], cams: Optional[Sequence[int]] = None,
                    bins: int = BINS) -> Tuple[np.ndarray, np.ndarray]:
    """Counts of same-vehicle and different-vehicle pair distances in ``bins`` bins over [0, 2]
    (each unordered pair once; same-vehicle pairs of one camera left out when ``cams`` are given)."""
    feats = checked_features(features, "features")
    n = feats.shape[0]
    labels = as_labels("ids", ids, n)
    cameras = None if cams is None else as_labels("cams", cams, n)
    return _histograms(feats, labels, cameras, feats, labels, cameras, bins, upper=True)


def cross_histograms(query: Any, gallery: Any, query_ids: Sequence[int], gallery_ids: Sequence[int],
                     query_cams: Optional[Sequence[int]] = None, gallery_cams: Optional[Sequence[int]] = None,
                     bins: int = BINS) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`pair_histograms` of every (query, gallery) pair, as retrieval meets them."""
    q, g = checked_features(query, "query features"), checked_features(gallery, "gallery features")
    qi, gi = as_labels("query ids", query_ids, len(q)), as_labels("gallery ids", gallery_ids, len(g))
    qc = None if query_cams is None else as_labels("query cams", query_cams, len(q))
    gc = None if gallery_cams is None else as_labels("gallery cams", gallery_cams, len(g))
    return _histograms(q, qi, qc, g, gi, gc, bins, upper=False)


def _histograms(a: np.ndarray, a_ids: np.ndarray, a_cams: Optional[np.ndarray], b: np.ndarray, b_ids: np.ndarray,
                b_cams: Optional[np.ndarray], bins: int, upper: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Pair distance counts of rows of ``a`` against ``b``, block by block (``upper``: a is b, each
    pair once). Pairs with a negative id on either side (distractors) count as neither."""
    pos, neg = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    rows = max(1, _BLOCK_ELEMENTS // max(len(b), 1))
    columns = np.arange(len(b))
    for start in range(0, len(a), rows):
        stop = min(len(a), start + rows)
        index = np.clip(((1.0 - a[start:stop] @ b.T) * (bins / 2.0)).astype(np.int64), 0, bins - 1)
        same = a_ids[start:stop, None] == b_ids[None, :]
        keep = (a_ids[start:stop, None] >= 0) & (b_ids[None, :] >= 0)
        if upper:
            keep &= columns[None, :] > np.arange(start, stop)[:, None]  # each pair once, no self-pairs
        if a_cams is not None and b_cams is not None:
            keep &= ~(same & (a_cams[start:stop, None] == b_cams[None, :]))  # one camera's sightings: junk
        pos += np.bincount(index[keep & same], minlength=bins)
        neg += np.bincount(index[keep & ~same], minlength=bins)
    return pos, neg


def roc(pos: np.ndarray, neg: np.ndarray, fprs: Sequence[float] = FPRS) -> Dict[str, float]:
    """TPR at each FPR of ``fprs`` that the different-vehicle pairs can measure (keys "1e-04", ...)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return {}
    tpr_at, fpr_at = np.cumsum(pos) / n_pos, np.cumsum(neg) / n_neg
    return {f"{f:.0e}": _tpr_at(tpr_at, fpr_at, f) for f in fprs if n_neg * f >= 1}


def calibrate(features: Any, ids: Sequence[int], cams: Optional[Sequence[int]] = None, *, fmr: float = 1e-3,
              source: Optional[str] = None) -> Calibration:
    """The threshold at false-match rate ``fmr`` and the ROC of labelled ``features`` (unit rows).

    Raises:
        DataError: no same-vehicle or no different-vehicle pair, or too few different-vehicle
            pairs to measure ``fmr`` (fewer than 1 / fmr).
    """
    if not 0 < fmr < 1:
        raise ValueError(f"fmr must be between 0 and 1, got {fmr}")
    pos, neg = pair_histograms(features, ids, cams)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{source or 'features'}: {n_pos} same-vehicle and {n_neg} different-vehicle pairs; "
                        "calibrating needs both (several images of several vehicles"
                        + (", the same vehicle seen by two cameras)" if cams is not None else ")"))
    if n_neg * fmr < 1:
        raise DataError(f"{source or 'features'}: {n_neg} different-vehicle pairs cannot measure a false-match "
                        f"rate of {fmr:g} (at least {int(np.ceil(1 / fmr))} are needed): give more images, or a "
                        "larger --fmr")
    tpr_at, fpr_at = np.cumsum(pos) / n_pos, np.cumsum(neg) / n_neg
    k = _last_at_most(fpr_at, fmr)
    distance = 0.0 if k < 0 else (k + 1) * 2.0 / BINS
    lowest = max(1.0 / n_neg, 1e-6)
    targets = np.logspace(np.log10(lowest), 0, 61)
    curve = {"fpr": [float(f) for f in targets], "tpr": [_tpr_at(tpr_at, fpr_at, f) for f in targets]}
    step = BINS // _PICTURE_BINS
    histogram = {"positives": pos.reshape(-1, step).sum(axis=1).tolist(),
                 "negatives": neg.reshape(-1, step).sum(axis=1).tolist()}
    return Calibration(distance=distance, fmr=fmr, measured_fmr=float(fpr_at[k]) if k >= 0 else 0.0,
                       tpr=float(tpr_at[k]) if k >= 0 else 0.0, roc=roc(pos, neg), positives=n_pos, negatives=n_neg,
                       histogram=histogram, curve=curve, source=source)


def _tpr_at(tpr_at: np.ndarray, fpr_at: np.ndarray, fpr: float) -> float:
    j = _last_at_most(fpr_at, fpr)
    return float(tpr_at[j]) if j >= 0 else 0.0


def _last_at_most(rates: np.ndarray, limit: float) -> int:
    """The last bin whose cumulative rate is at most ``limit`` (-1: not even the first)."""
    return int(np.searchsorted(rates, limit, side="right")) - 1


def same_vehicle(a: Any, b: Any, calibration: Calibration) -> Tuple[float, bool]:
    """(distance, same vehicle?) of two features (L2-normalised, e.g. rows of ``embed``'s output)."""
    x, y = (checked_features(np.asarray(v, np.float32).reshape(1, -1), name) for v, name in ((a, "a"), (b, "b")))
    if x.shape != y.shape:
        raise DataError(f"a is {x.shape[1]}-d and b {y.shape[1]}-d: features of one network only")
    distance = float(1.0 - (x @ y.T)[0, 0])
    return distance, calibration.same(distance)


def save_calibration(path: PathLike, calibration: Calibration) -> None:
    """Write ``calibration`` as a small JSON file (atomically)."""
    from ..fileio import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump(calibration.to_json(), fh, indent=1)
        fh.write("\n")


def load_calibration(path: PathLike) -> Calibration:
    """Read a file :func:`save_calibration` wrote; DataError naming the file when it is not one."""
    from ..fileio import open_regular

    name = os.fspath(path)
    try:
        with open(open_regular(name, os.O_RDONLY, follow=True), "rb") as fh:
            raw = fh.read(1 << 20)
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} file")
        fields = data["threshold"]
        cal = Calibration(**fields)
        for key, low, high in (("distance", 0, 2), ("fmr", 0, 1), ("measured_fmr", 0, 1), ("tpr", 0, 1)):
            value = getattr(cal, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{key} {value!r} is not a number in [{low}, {high}]")
        if not isinstance(cal.roc, dict) or not all(isinstance(v, (int, float)) for v in cal.roc.values()):
            raise ValueError("roc is not an object of numbers")
        return cal
    except FileNotFoundError:
        raise DataError(f"{name}: no such threshold file; write one with `vehiclenet calibrate`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{name}: not a threshold file written by `vehiclenet calibrate` ({exc})") from None
