"""`evaluate`: `--features` needs numpy/scipy only; `--data` builds the network (mindspore)."""
import argparse
import contextlib
import time
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Union

from ._network import INDEX_KINDS, add_image_size_arg, add_precision_arg, build_network, check_image_size, image_size
from ._common import add_command, progress

MAX_TRIALS = 1000  # VehicleID's protocol draws 10 galleries; 1000 already pins a mean to ~0.1 %

if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    import numpy as np

    from ..evaluation import EvalResult, FeatureSet
    from ..datasets.vehicleid import VehicleIDFeatures
    from ..protocols import TrialsResult


def add_evaluate_command(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "evaluate",
        json_help="print the figures as one JSON object on the last line",
        help="mAP / CMC / mINP on VeRi-776, VehicleID or VERI-Wild (images) or on a features .npz",
        description="Evaluate with the published protocol (junk = same id and camera, or label -1; "
        "trapezoidal AP; divided by all queries). --dataset vehicleid draws a gallery of one random image "
        "per identity in each of --trials seeded trials (each image its own camera: nothing is junk) and "
        "reports mean and standard deviation; --dataset veriwild ranks the split's query list against its "
        "gallery list, cameras from vehicle_info.txt. Exit codes: 0 success, 1 unusable data or features "
        "file, 2 bad parameters.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="ROOT", help="dataset root (VeRi-776: image_query/ and image_test/; "
                     "VehicleID: image/ and train_test_split/; VERI-Wild: images/ and train_test_split/)")
    src.add_argument("--features", metavar="F.npz", help="features file written by --save-features for the "
                     "same --dataset (VeRi-776 and VERI-Wild: query_/gallery_ features, ids, cams; VehicleID: "
                     "features and ids of every test image)")
    p.add_argument("--dataset", choices=("veri", "vehicleid", "veriwild"), default="veri",
                   help="benchmark (default veri, VeRi-776)")
    p.add_argument("--split", choices=("small", "medium", "large"),
                   help="test split of vehicleid/veriwild (needed with --data; with --features the file's)")
    p.add_argument("--trials", type=int, default=None, help=f"vehicleid: random gallery draws, 1 to {MAX_TRIALS} (default 10)")
    p.add_argument("--seed", type=int, default=None, help="vehicleid: seed of the draws (default 0)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (the published figures use it)")
    p.add_argument("--k1", type=int, default=100, help="re-ranking k1 (default 100)")
    p.add_argument("--k2", type=int, default=15, help="re-ranking k2 (default 15)")
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.0, help="re-ranking lambda (default 0)")
    p.add_argument("--neighbours", choices=INDEX_KINDS[1:], default=None,
                   help="re-ranking: where the k1-neighbour lists come from: exact (default, brute force) or a "
                   "gallery index of that kind over query + gallery (approximate re-ranking)")
    p.add_argument("--nprobe", type=int, default=None, help="--neighbours ivf-*: cells searched per item")
    p.add_argument("--ap", choices=("trapezoid", "standard"), default="trapezoid",
                   help="AP form: the reference's trapezoidal (default) or non-interpolated")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch for --data (default 32)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights for --data (default: the published checkpoint)")
    p.add_argument("--no-flip", action="store_true", help="--data: skip the horizontal-flip feature sum")
    p.add_argument("--save-features", metavar="F.npz", help="--data: also write the features for later --features runs")
    add_precision_arg(p, "; --data only")
    add_image_size_arg(p, "; --data only")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_evaluate_args(args)
    if args.dataset == "vehicleid":
        return _evaluate_vehicleid(args)
    from .. import evaluation

    timings: Dict[str, float] = {}
    with _timed(timings, "features_s"):
        if args.features is not None:
            fs = evaluation.load_features_npz(args.features)
            _check_recorded(args, fs.dataset, fs.split)
            args.split = args.split or fs.split
        else:
            fs = _embed_query_gallery(args)
    result = _evaluate_split(args, fs, timings)
    _print_evaluation(args, result, int(fs.gallery_features.shape[0]), timings, roc=_verification(fs, timings))
    return 0


def _verification(fs: "FeatureSet", timings: Dict[str, float]) -> Dict[str, float]:
    """TPR at FPR 1e-4, 1e-3, 1e-2 over every (query, gallery) pair by cosine distance (pairs of
    one vehicle seen by one camera left out, as the ranking leaves them out)."""
    from ..calibration import cross_histograms, roc

    with _timed(timings, "roc_s"):
        return roc(*cross_histograms(fs.query_features, fs.gallery_features, fs.query_ids, fs.gallery_ids,
                                     fs.query_cams, fs.gallery_cams))


def _evaluate_split(args: argparse.Namespace, fs: "FeatureSet", timings: Dict[str, float]) -> "EvalResult":
    """Query vs gallery evaluation of ``fs`` (the one call of the evaluation engine for VeRi and VERI-Wild)."""
    from ..errors import UsageError
    from ..protocols import evaluate_split

    try:
        return evaluate_split(fs.query_features, fs.gallery_features, fs.query_ids, fs.gallery_ids, fs.query_cams,
                              fs.gallery_cams, rerank=_rerank(args), ap=args.ap, timings=timings)
    except ValueError as exc:
        if args.rerank:
            raise UsageError(f"re-ranking: {exc}") from None
        raise


def _rerank(args: argparse.Namespace):
    from ..protocols import Rerank

    if not args.rerank:
        return None
    return Rerank(args.k1, args.k2, args.lambda_value, neighbours=args.neighbours or "exact", nprobe=args.nprobe)


def _check_evaluate_args(args: argparse.Namespace) -> None:
    """Usage errors of ``evaluate`` and an unusable --save-features path, reported before any work."""
    from ..datasets import get_dataset
    from ..errors import UsageError
    from ..fileio import check_output_file

    if args.data is None and (args.save_features or args.checkpoint or args.no_flip or args.precision != "fp32"
                              or args.image_size is not None):
        raise UsageError("--save-features, --checkpoint, --no-flip, --precision and --image-size apply to --data "
                         "only")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    check_image_size(args)
    if not args.rerank and (args.neighbours is not None or args.nprobe is not None):
        raise UsageError("--neighbours and --nprobe apply to --rerank only")
    if args.nprobe is not None and args.nprobe < 1:
        raise UsageError("--nprobe must be >= 1")
    dataset = get_dataset(args.dataset)
    if args.data is not None or args.split is not None or not dataset.splits:
        dataset.check_split(args.split)
    if args.dataset != "vehicleid" and (args.trials is not None or args.seed is not None):
        raise UsageError("--trials and --seed apply to --dataset vehicleid only (its random galleries)")
    args.trials = 10 if args.trials is None else args.trials
    args.seed = 0 if args.seed is None else args.seed
    if not 1 <= args.trials <= MAX_TRIALS:
        raise UsageError(f"--trials must be from 1 to {MAX_TRIALS}, got {args.trials}")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if args.save_features:
        check_output_file(args.save_features, "--save-features")


def _check_recorded(args: argparse.Namespace, dataset: Optional[str], split: Optional[str]) -> None:
    """DataError when a --features file says it holds another dataset or split than asked for."""
    from ..errors import DataError

    redo = (f"evaluate it with the --dataset/--split it was written for, or write it again with "
            f"`vehiclenet evaluate --dataset {args.dataset} --data ROOT"
            + (f" --split {args.split}" if args.split else "") + " --save-features FILE`")
    if dataset is not None and dataset != args.dataset:
        raise DataError(f"{args.features}: features of dataset {dataset!r}, not {args.dataset!r}; {redo}")
    if split is not None and args.split is not None and split != args.split:
        raise DataError(f"{args.features}: features of split {split!r}, not {args.split!r}; {redo}")


@contextlib.contextmanager
def _timed(timings: Dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as ``timings[key]`` (not when it raises)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def _embed_images(args: argparse.Namespace, groups: "List[List[str]]", inputs: "List[str]") -> "List[np.ndarray]":
    """Features of each group of image paths of ``--data``, one network for all; --save-features is
    checked against the images, the lists and the weights first (before the network)."""
    import numpy as np

    from ..download import weights_files
    from ..fileio import check_output_file

    if args.save_features:
        check_output_file(args.save_features, "--save-features",
                          [*(p for g in groups for p in g), *weights_files(args.checkpoint), *inputs])
    from ..features import extract_features

    net = build_network(args.checkpoint, args.checkpoint is None, args.precision, mode="graph")
    return [np.asarray(extract_features(net, paths, batch_size=args.batch_size, flip=not args.no_flip,
                                        size=image_size(args), progress=progress(args)), dtype=np.float32)
            for paths in groups]


def _embed_query_gallery(args: argparse.Namespace) -> "FeatureSet":
    """The features of ``--data``'s query and gallery images, also written to --save-features if given."""
    from .. import evaluation
    from ..datasets import get_dataset
    from ..interrupts import kept

    data = get_dataset(args.dataset).read(args.data, args.split)
    args.query_in_gallery = data.query_in_gallery
    query, gallery = data.query, data.gallery
    feats = _embed_images(args, [query.paths, gallery.paths], list(data.sources))
    fs = evaluation.FeatureSet(feats[0], query.ids, query.cams, feats[1], gallery.ids, gallery.cams,
                               dataset=args.dataset, split=args.split)
    if args.save_features:
        evaluation.save_features_npz(args.save_features, fs)
        kept(f"{args.save_features} written")
    return fs


def _evaluate_vehicleid(args: argparse.Namespace) -> int:
    """VehicleID: features of every test image (embedded or from --features), then the seeded trials."""
    import os

    from ..datasets import vehicleid
    from ..errors import UsageError
    from ..interrupts import kept
    from ..protocols import evaluate_vehicleid

    timings: Dict[str, float] = {}
    with _timed(timings, "features_s"):
        if args.features is not None:
            vf = vehicleid.load_vehicleid_features(args.features)
            _check_recorded(args, "vehicleid", vf.split)
            args.split = args.split or vf.split
        else:
            images = vehicleid.read_vehicleid(args.data, args.split)
            (feats,) = _embed_images(args, [images.paths], [vehicleid.vehicleid_list_path(args.data, args.split)])
            names = [os.path.splitext(os.path.basename(p))[0] for p in images.paths]
            vf = vehicleid.VehicleIDFeatures(feats, images.ids, names, args.split)
            if args.save_features:
                vehicleid.save_vehicleid_features(args.save_features, vf)
                kept(f"{args.save_features} written")
    try:
        result = evaluate_vehicleid(vf.features, vf.ids, trials=args.trials, seed=args.seed, rerank=_rerank(args),
                                    ap=args.ap, timings=timings)
    except ValueError as exc:
        if args.rerank:
            raise UsageError(f"re-ranking: {exc}") from None
        raise
    _print_evaluation(args, result, result.num_gallery, timings, roc=_vehicleid_verification(vf, timings),
                      pairs="every pair of test images")
    return 0


def _vehicleid_verification(vf: "VehicleIDFeatures", timings: Dict[str, float]) -> Dict[str, float]:
    """TPR at FPR 1e-4, 1e-3, 1e-2 over every unordered pair of VehicleID test images: the trials
    only redraw which image is the gallery's, so the pairs of the whole list are the steadier measure."""
    from ..calibration import pair_histograms, roc

    with _timed(timings, "roc_s"):
        return roc(*pair_histograms(vf.features, vf.ids))


def _print_evaluation(args: argparse.Namespace, result: "Union[EvalResult, TrialsResult]", num_gallery: int,
                      timings: Dict[str, float], roc: Optional[Dict[str, float]] = None,
                      pairs: str = "every query-gallery pair") -> None:
    """The figures as two lines, and with --json as one JSON object on a last line.

    VehicleID's figures are means over its trials, each followed by ``± std``."""
    import json

    out = result.to_dict()
    out["num_gallery"] = num_gallery
    k1, k2 = args.k1, args.k2
    if args.rerank:  # the k1, k2 used: lowered to the data on small sets (logged by re-ranking)
        from ..rerank import neighbour_counts

        k1, k2 = neighbour_counts(args.k1, args.k2, out["num_query"] + num_gallery)
    out["rerank"] = {"k1": k1, "k2": k2, "lambda": args.lambda_value,
                     "neighbours": args.neighbours or "exact", "nprobe": args.nprobe} if args.rerank else None
    out["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if args.dataset != "veri":  # VeRi-776's output stays as it was
        out.update(dataset=args.dataset, split=args.split)
        if getattr(args, "query_in_gallery", None) is not None:
            out["query_in_gallery"] = args.query_in_gallery
    std = out.get("std") or {}

    def figure(key: str) -> str:
        return f"{100 * out[key]:.2f}" + (f" ± {100 * std[key]:.2f}" if key in std else "")

    source = args.features if args.features is not None else args.data
    where = "" if args.dataset == "veri" else f" [{args.dataset}{' ' + args.split if args.split else ''}]"
    trials = (f", {out['trials']} trial(s) with seed {out['seed']}: one random gallery image per identity"
              if "trials" in out else "")
    print(f"{source}{where}: {out['num_query']} queries ({out['num_valid_query']} with a valid match), "
          f"{out['num_gallery']} gallery images{trials}"
          + (f", re-ranked (k1={k1}, k2={k2}, lambda={args.lambda_value})" if args.rerank else ""))
    print(f"mAP {figure('mAP')} | rank-1 {figure('rank1')} | rank-5 {figure('rank5')} | "
          f"rank-10 {figure('rank10')} | mINP {figure('mINP')}  ({args.ap} AP"
          + (", mean ± std over trials)" if std else ")"))
    if roc:
        out["roc"] = roc
        print("verification: " + " | ".join(f"TPR@FPR={k} {100 * v:.2f}" for k, v in roc.items())
              + f"  ({pairs}, cosine distance)")
    if args.json:
        print(json.dumps(out))
