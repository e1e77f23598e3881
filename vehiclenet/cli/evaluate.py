"""`evaluate`: `--features` needs numpy/scipy only; `--data` builds the network (mindspore)."""
import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from ._network import INDEX_KINDS, add_image_size_arg, add_precision_arg, build_network, check_image_size, image_size
from ._common import add_command, progress

MAX_TRIALS = 1000  # VehicleID's protocol draws 10 galleries; 1000 already pins a mean to ~0.1 %

if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    import numpy as np

    from ..retrieval.metrics import EvalResult
    from ..embedding.files import FeatureSet
    from ..datasets.vehicleid import VehicleIDFeatures
    from ..retrieval.protocols import Rerank, TrialsResult


@dataclass(frozen=True)
class EvaluateRequest:
    """What one ``evaluate`` run computes, read from the command line once, after its checks."""

    dataset: str
    split: Optional[str]
    source: str  # the --features file or the --data root, as the report names it
    trials: int
    seed: int
    rerank: "Optional[Rerank]"
    ap: str


@dataclass(frozen=True)
class Evaluated:
    """Features to evaluate, with what reading them revealed: the split a --features file records
    and whether the dataset's query images are also in its gallery."""

    features: Any  # FeatureSet (query vs gallery) or VehicleIDFeatures
    split: Optional[str]
    query_in_gallery: Optional[bool] = None


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
    request = _request(args)
    if request.dataset == "vehicleid":
        return _evaluate_vehicleid(args, request)
    from ..embedding.files import load_features_npz
    from ..retrieval.protocols import timed

    timings: Dict[str, float] = {}
    with timed(timings, "features_s"):
        if args.features is not None:
            fs = load_features_npz(args.features)
            _check_recorded(request, fs.dataset, fs.split)
            got = Evaluated(fs, request.split or fs.split)
        else:
            got = _embed_query_gallery(args, request)
    result = _evaluate_split(request, got.features, timings)
    _print_evaluation(args, request, got, result, int(got.features.gallery_features.shape[0]), timings,
                      roc=_verification(got.features, timings))
    return 0


def _verification(fs: "FeatureSet", timings: Dict[str, float]) -> Dict[str, float]:
    """TPR at FPR 1e-4, 1e-3, 1e-2 over every (query, gallery) pair by cosine distance (pairs of
    one vehicle seen by one camera left out, as the ranking leaves them out)."""
    from ..retrieval.calibration import cross_histograms, roc
    from ..retrieval.protocols import timed

    with timed(timings, "roc_s"):
        return roc(*cross_histograms(fs.query_features, fs.gallery_features, fs.query_ids, fs.gallery_ids,
                                     fs.query_cams, fs.gallery_cams))


def _evaluate_split(request: EvaluateRequest, fs: "FeatureSet", timings: Dict[str, float]) -> "EvalResult":
    """Query vs gallery evaluation of ``fs`` (the one call of the evaluation engine for VeRi and VERI-Wild)."""
    from ..errors import UsageError
    from ..retrieval.protocols import evaluate_split

    try:
        return evaluate_split(fs.query_features, fs.gallery_features, fs.query_ids, fs.gallery_ids, fs.query_cams,
                              fs.gallery_cams, rerank=request.rerank, ap=request.ap, timings=timings)
    except ValueError as exc:
        if request.rerank is not None:
            raise UsageError(f"re-ranking: {exc}") from None
        raise


def _request(args: argparse.Namespace) -> EvaluateRequest:
    """The run's request, after every usage check (nothing is read or embedded before)."""
    from ..retrieval.protocols import Rerank

    _check_evaluate_args(args)
    rerank = (Rerank(args.k1, args.k2, args.lambda_value, neighbours=args.neighbours or "exact", nprobe=args.nprobe)
              if args.rerank else None)
    return EvaluateRequest(
        dataset=args.dataset, split=args.split, source=args.features if args.features is not None else args.data,
        trials=10 if args.trials is None else args.trials, seed=0 if args.seed is None else args.seed,
        rerank=rerank, ap=args.ap)


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
    if args.trials is not None and not 1 <= args.trials <= MAX_TRIALS:
        raise UsageError(f"--trials must be from 1 to {MAX_TRIALS}, got {args.trials}")
    if args.seed is not None and args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if args.save_features:
        check_output_file(args.save_features, "--save-features")


def _check_recorded(request: EvaluateRequest, dataset: Optional[str], split: Optional[str]) -> None:
    """DataError when a --features file says it holds another dataset or split than asked for."""
    from ..errors import DataError

    redo = (f"evaluate it with the --dataset/--split it was written for, or write it again with "
            f"`vehiclenet evaluate --dataset {request.dataset} --data ROOT"
            + (f" --split {request.split}" if request.split else "") + " --save-features FILE`")
    if dataset is not None and dataset != request.dataset:
        raise DataError(f"{request.source}: features of dataset {dataset!r}, not {request.dataset!r}; {redo}")
    if split is not None and request.split is not None and split != request.split:
        raise DataError(f"{request.source}: features of split {split!r}, not {request.split!r}; {redo}")


def _embed_images(args: argparse.Namespace, groups: "List[List[str]]", inputs: "List[str]") -> "List[np.ndarray]":
    """Features of each group of image paths of ``--data``, one network for all; --save-features is
    checked against the images, the lists and the weights first (before the network)."""
    import numpy as np

    from ..weights.choice import WeightsChoice, weights_files
    from ..fileio import check_output_file

    weights = WeightsChoice.of(args.checkpoint)  # the published weights unless --checkpoint
    if args.save_features:
        check_output_file(args.save_features, "--save-features",
                          [*(p for g in groups for p in g), *weights_files(args.checkpoint), *inputs])
    from ..embedding.features import extract_features

    net = build_network(weights, args.precision, mode="graph")
    return [np.asarray(extract_features(net, paths, batch_size=args.batch_size, flip=not args.no_flip,
                                        size=image_size(args), progress=progress(args)), dtype=np.float32)
            for paths in groups]


def _embed_query_gallery(args: argparse.Namespace, request: EvaluateRequest) -> Evaluated:
    """The features of ``--data``'s query and gallery images, also written to --save-features if given."""
    from ..datasets import get_dataset
    from ..embedding.files import FeatureSet, save_features_npz
    from ..interrupts import kept

    data = get_dataset(request.dataset).read(args.data, request.split)
    query, gallery = data.query, data.gallery
    feats = _embed_images(args, [query.paths, gallery.paths], list(data.sources))
    fs = FeatureSet(feats[0], query.ids, query.cams, feats[1], gallery.ids, gallery.cams,
                    dataset=request.dataset, split=request.split)
    if args.save_features:
        save_features_npz(args.save_features, fs)
        kept(f"{args.save_features} written")
    return Evaluated(fs, request.split, data.query_in_gallery)


def _evaluate_vehicleid(args: argparse.Namespace, request: EvaluateRequest) -> int:
    """VehicleID: features of every test image (embedded or from --features), then the seeded trials."""
    from ..errors import UsageError
    from ..retrieval.protocols import evaluate_vehicleid, timed

    timings: Dict[str, float] = {}
    with timed(timings, "features_s"):
        got = _vehicleid_features(args, request)
    vf = got.features
    try:
        result = evaluate_vehicleid(vf.features, vf.ids, trials=request.trials, seed=request.seed,
                                    rerank=request.rerank, ap=request.ap, timings=timings)
    except ValueError as exc:
        if request.rerank is not None:
            raise UsageError(f"re-ranking: {exc}") from None
        raise
    _print_evaluation(args, request, got, result, result.num_gallery, timings,
                      roc=_vehicleid_verification(vf, timings), pairs="every pair of test images")
    return 0


def _vehicleid_features(args: argparse.Namespace, request: EvaluateRequest) -> Evaluated:
    """VehicleID's test features: read from --features, or embedded (and saved with --save-features)."""
    import os

    from ..datasets import vehicleid
    from ..interrupts import kept

    if args.features is not None:
        vf = vehicleid.load_vehicleid_features(args.features)
        _check_recorded(request, "vehicleid", vf.split)
        return Evaluated(vf, request.split or vf.split)
    images = vehicleid.read_vehicleid(args.data, request.split)
    (feats,) = _embed_images(args, [images.paths], [vehicleid.vehicleid_list_path(args.data, request.split)])
    names = [os.path.splitext(os.path.basename(p))[0] for p in images.paths]
    vf = vehicleid.VehicleIDFeatures(feats, images.ids, names, request.split)
    if args.save_features:
        vehicleid.save_vehicleid_features(args.save_features, vf)
        kept(f"{args.save_features} written")
    return Evaluated(vf, request.split)


def _vehicleid_verification(vf: "VehicleIDFeatures", timings: Dict[str, float]) -> Dict[str, float]:
    """TPR at FPR 1e-4, 1e-3, 1e-2 over every unordered pair of VehicleID test images: the trials
    only redraw which image is the gallery's, so the pairs of the whole list are the steadier measure."""
    from ..retrieval.calibration import pair_histograms, roc
    from ..retrieval.protocols import timed

    with timed(timings, "roc_s"):
        return roc(*pair_histograms(vf.features, vf.ids))


def _print_evaluation(args: argparse.Namespace, request: EvaluateRequest, got: Evaluated,
                      result: "Union[EvalResult, TrialsResult]", num_gallery: int, timings: Dict[str, float],
                      roc: Optional[Dict[str, float]] = None, pairs: str = "every query-gallery pair") -> None:
    """The figures as two lines, and with --json as one JSON object on a last line.

    VehicleID's figures are means over its trials, each followed by ``± std``."""
    import json

    out = _report(request, got, result, num_gallery, timings)
    std = out.get("std") or {}

    def figure(key: str) -> str:
        return f"{100 * out[key]:.2f}" + (f" ± {100 * std[key]:.2f}" if key in std else "")

    split = got.split
    where = "" if request.dataset == "veri" else f" [{request.dataset}{' ' + split if split else ''}]"
    trials = (f", {out['trials']} trial(s) with seed {out['seed']}: one random gallery image per identity"
              if "trials" in out else "")
    rerank = out["rerank"]
    print(f"{request.source}{where}: {out['num_query']} queries ({out['num_valid_query']} with a valid match), "
          f"{out['num_gallery']} gallery images{trials}"
          + (f", re-ranked (k1={rerank['k1']}, k2={rerank['k2']}, lambda={rerank['lambda']})" if rerank else ""))
    print(f"mAP {figure('mAP')} | rank-1 {figure('rank1')} | rank-5 {figure('rank5')} | "
          f"rank-10 {figure('rank10')} | mINP {figure('mINP')}  ({request.ap} AP"
          + (", mean ± std over trials)" if std else ")"))
    if roc:
        out["roc"] = roc
        print("verification: " + " | ".join(f"TPR@FPR={k} {100 * v:.2f}" for k, v in roc.items())
              + f"  ({pairs}, cosine distance)")
    if args.json:
        print(json.dumps(out))


def _report(request: EvaluateRequest, got: Evaluated, result: "Union[EvalResult, TrialsResult]", num_gallery: int,
            timings: Dict[str, float]) -> Dict[str, Any]:
    """The figures and what produced them, as ``--json`` prints them."""
    out = result.to_dict()
    out["num_gallery"] = num_gallery
    rerank = request.rerank
    if rerank is not None:  # the k1, k2 used: lowered to the data on small sets (logged by re-ranking)
        from ..retrieval.rerank import neighbour_counts

        k1, k2 = neighbour_counts(rerank.k1, rerank.k2, out["num_query"] + num_gallery)
        out["rerank"] = {"k1": k1, "k2": k2, "lambda": rerank.lambda_value, "neighbours": rerank.neighbours,
                         "nprobe": rerank.nprobe}
    else:
        out["rerank"] = None
    out["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if request.dataset != "veri":  # VeRi-776's output stays as it was
        out.update(dataset=request.dataset, split=got.split)
        if got.query_in_gallery is not None:
            out["query_in_gallery"] = got.query_in_gallery
    return out
