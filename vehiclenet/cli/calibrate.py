"""`calibrate` (labelled features -> a same-vehicle threshold; numpy only) and `compare` (two
images -> distance and decision; builds the network)."""
import argparse
import os
from typing import TYPE_CHECKING, Optional, Tuple

from ._common import add_command, emit, shown
from ._network import NetworkRequest, add_network_args, list_inputs

if TYPE_CHECKING:
    import numpy as np

    from ..retrieval.calibration import Calibration


def add_calibrate_commands(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "calibrate",
        json_help="print the threshold and ROC as one JSON object",
        help="a same-vehicle distance threshold at a chosen false-match rate, from labelled features",
        description="Count the distances of every pair of labelled features (same vehicle: same id, from two "
        "cameras when cameras are known; different vehicles: different ids), choose the distance below which "
        "at most --fmr of the different-vehicle pairs fall, and write it with the ROC (TPR at FPR 1e-4, 1e-3, "
        "1e-2) to --out, for `vehiclenet compare --threshold` and `vehiclenet.same_vehicle`. FEATURES: an "
        "`embed --out` file with ids (key `ids`, or VeRi-style file names) and optionally `cams`, or an "
        "`evaluate --save-features` file (query and gallery together). Exit codes: 0 success, 1 unusable "
        "features, 2 usage.",
    )
    p.add_argument("features", metavar="FEATURES", help="labelled features .npz")
    p.add_argument("--out", required=True, metavar="THRESHOLD.json", help="where the threshold file goes")
    p.add_argument("--fmr", type=float, default=1e-3, help="false-match rate of the threshold (default 1e-3)")
    p.add_argument("--picture", metavar="PNG", help="also draw the two histograms and the ROC")
    p.set_defaults(func=_cmd_calibrate)

    c = add_command(
        sub, "compare",
        json_help="print distance and decision as one JSON object",
        help="distance between two vehicle images, and same vehicle? with a calibrated threshold",
        description="Embed two images and print their cosine distance (1 - cos); with --threshold FILE (from "
        "`vehiclenet calibrate`), or a FILE.threshold.json beside --checkpoint, also whether they show the "
        "same vehicle. Exit codes: 0 success, 1 unusable image or file, 2 usage.",
    )
    c.add_argument("a", metavar="A", help="first image")
    c.add_argument("b", metavar="B", help="second image")
    c.add_argument("--threshold", metavar="THRESHOLD.json", help="threshold file of `vehiclenet calibrate`")
    add_network_args(c)
    c.set_defaults(func=_cmd_compare)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..retrieval.calibration import calibrate, save_calibration
    from ..errors import UsageError
    from ..fileio import check_output_file

    if not 0 < args.fmr < 1:
        raise UsageError(f"--fmr must be between 0 and 1, got {args.fmr}")
    check_output_file(args.out, "--out", [args.features])
    if args.picture:
        from ..retrieval.visualize import picture_format

        picture_format(args.picture)
        check_output_file(args.picture, "--picture", [args.features])
    feats, ids, cams = _labelled(args.features)
    cal = calibrate(feats, ids, cams, fmr=args.fmr, source=args.features)
    save_calibration(args.out, cal)
    if args.picture:
        from ..retrieval.visualize import draw_calibration

        draw_calibration(cal, args.picture)
    roc = ", ".join(f"TPR@FPR={k} {v:.4f}" for k, v in cal.roc.items())
    lines = [f"threshold {cal.distance:.4f} (distance below it: same vehicle) at false-match rate {cal.fmr:g}: "
             f"measured FMR {cal.measured_fmr:.2e}, TPR {cal.tpr:.4f}; {cal.positives} same-vehicle and "
             f"{cal.negatives} different-vehicle pairs -> {args.out}", f"ROC: {roc}"]
    if args.picture:
        lines.append(f"picture: {shown(args.picture)}")
    emit(args, lines, {**cal.to_json()["threshold"], "out": args.out, "picture": args.picture})
    return 0


def _labelled(path: str) -> Tuple["np.ndarray", "np.ndarray", Optional["np.ndarray"]]:
    """Features, ids and cameras (None when unknown) of a labelled features file."""
    import numpy as np

    from ..errors import DataError
    from ..embedding.files import load_features_npz
    from ..embedding.checks import as_labels
    from ..embedding.files import load_features
    from ..datasets.veri import parse_veri_name, veri_id

    if not os.path.isdir(path) and "query_features" in _npz_keys(path):
        fs = load_features_npz(path)
        return (np.concatenate([fs.query_features, fs.gallery_features]),
                np.concatenate([fs.query_ids, fs.gallery_ids]), np.concatenate([fs.query_cams, fs.gallery_cams]))
    res = load_features(path)
    n = len(res.paths)
    try:
        ids = as_labels("ids", res.extra["ids"], n) if "ids" in res.extra else None
        cams = as_labels("cams", res.extra["cams"], n) if "cams" in res.extra else None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    if ids is None:
        parsed = [veri_id(p) for p in res.paths]
        if any(i is None for i in parsed):
            raise DataError(f"{path}: no ids: calibrating needs the vehicle id of every row (key `ids`, or "
                            "VeRi-style file names such as 0002_c002_00030600_0.jpg)")
        ids = np.asarray(parsed, np.int64)
        if cams is None:
            cams = np.asarray([parse_veri_name(os.path.basename(p))[1] for p in res.paths], np.int64)
    return res.features, ids, cams


def _npz_keys(path: str) -> set:
    """The array names of an .npz, read from its zip directory (no array is loaded)."""
    import zipfile

    from ..errors import DataError
    from ..fileio import open_regular

    try:
        with open(open_regular(path, os.O_RDONLY, follow=True), "rb") as fh, zipfile.ZipFile(fh) as zf:
            return {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
    except FileNotFoundError:
        raise DataError(f"{path}: no such features file (it does not exist)") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a features .npz ({getattr(exc, 'strerror', None) or exc}); write it with "
                        "`vehiclenet embed` or `vehiclenet evaluate --save-features`") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..retrieval.calibration import same_vehicle
    from ..errors import UsageError

    for name in (args.a, args.b):
        if os.path.isdir(name):
            raise UsageError(f"{name!r} is a folder: compare takes two image files")
    request = NetworkRequest.from_args(args)
    images = list_inputs([args.a, args.b], False)
    cal = _threshold(args)
    res = request.embed(request.network(2), images, skip_bad=False)
    distance, same = same_vehicle(res.features[0], res.features[1], cal) if cal else (_distance(res.features), None)
    verdict = ("" if cal is None else
               f": {'same vehicle' if same else 'different vehicles'} (threshold {cal.distance:.4f}, "
               f"false-match rate {cal.fmr:g})")
    hint = "" if cal is not None else " (no threshold: give --threshold FILE from `vehiclenet calibrate`)"
    emit(args, [f"{shown(args.a)} vs {shown(args.b)}: distance {distance:.4f}{verdict}{hint}"],
         {"a": args.a, "b": args.b, "distance": distance, "same_vehicle": same,
          "threshold": None if cal is None else cal.distance, "fmr": None if cal is None else cal.fmr})
    return 0


def _threshold(args: argparse.Namespace) -> Optional["Calibration"]:
    """The threshold file given, else one beside the checkpoint (``<ckpt>.threshold.json``), else None."""
    from ..retrieval.calibration import load_calibration

    if args.threshold:
        return load_calibration(args.threshold)
    if args.checkpoint and os.path.isfile(args.checkpoint + ".threshold.json"):
        return load_calibration(args.checkpoint + ".threshold.json")
    return None


def _distance(feats: "np.ndarray") -> float:
    return float(1.0 - feats[0] @ feats[1])
