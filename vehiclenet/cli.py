"""Command line: a thin layer over the library.

Each sub-command imports what it needs inside its handler, so commands that need no
network graph (download, verify, info, evaluate --features) never import mindspore.
Exit codes: 0 success, 1 failure (mismatch, missing file, download error), 2 usage or
manifest errors, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); see interrupts.py.
"""
import argparse
import contextlib
import logging
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

from . import __version__
from .errors import VehicleNetError

if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    import numpy as np

    from .evaluation import EvalResult, FeatureSet
    from .features import FeatureResult
    from .index import GalleryIndex
    from .protocols import TrialsResult
    from .ranking import Ranking


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vehiclenet",
        description="VehicleNet vehicle re-identification: weights, embeddings, search, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"vehiclenet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Each concern registers its own sub-commands below.
    _add_asset_commands(sub)
    _add_evaluate_command(sub)
    _add_embed_command(sub)
    _add_rank_command(sub)
    _add_index_commands(sub)
    _add_finetune_command(sub)
    _add_export_command(sub)
    return parser


# --------------------------------------------------------------------------- assets
# download / verify / info: none of these import mindspore except `info` (for the device).


def _add_asset_commands(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "download",
        help="fetch an asset into the cache and verify its sha256",
        description="Download an asset of the manifest (default: the published checkpoint) into the cache, "
        "verifying its sha256. The last line of stdout is the file's path.",
    )
    p.add_argument("name", nargs="?", help="asset name (default: the manifest's first asset)")
    p.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no messages, only the path")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser(
        "verify",
        help="check files (default: every cached asset) against the manifest's sha256",
        description="Check files against their sha256, like `sha256sum -c`. A file is matched to the manifest "
        "by its name; --sha256 gives the expected hash instead. Exit 0 all good, 1 any mismatch or "
        "missing file, 2 usage or manifest errors.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="files to check (default: every cached asset)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 for the FILEs instead of the manifest's")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "info",
        help="versions, device, cache folder and cached assets",
        description="Report versions, the device that would be chosen, the cache folder and which assets are "
        "cached and verified.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument(
        "--no-device", action="store_true",
        help="do not import mindspore to find the device, nor compile the CPU kernels (faster)"
    )
    p.set_defaults(func=_cmd_info)


def _cmd_download(args: argparse.Namespace) -> int:
    from .download import fetch
    from .interrupts import doing, kept

    if args.quiet:
        logging.getLogger("vehiclenet").setLevel(logging.WARNING)
    if not args.verbose:
        # urllib3 logs every retry with its internal state; our own messages say what failed.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    doing(f"downloading {args.name or 'the default asset'}")
    kept("what was downloaded stays in the cache as <file>.part; the next download resumes it")
    path = fetch(args.name, force=args.force, progress=False if args.quiet else None)
    print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .download import cache_dir
    from .errors import UsageError
    from .verify import MISSING, verify_cache, verify_files

    if args.files:
        results = verify_files(args.files, sha256=args.sha256)
    elif args.sha256:
        raise UsageError("--sha256 needs at least one FILE to check")
    else:
        results = verify_cache()
    ok = bool(results) and all(r.ok for r in results)
    message = "" if results else (
        f"no cached assets in {cache_dir()}; run `vehiclenet download` or give FILE arguments"
    )
    if args.json:
        print(json.dumps({"ok": ok, "results": [r.to_dict() for r in results], "message": message}, indent=2))
        return 0 if ok else 1
    if message:
        print(f"vehiclenet verify: {message}", file=sys.stderr)
        return 1
    failed = 0
    for r in results:
        if r.ok:
            if not args.quiet:
                print(f"{r.path}: OK", flush=True)
            continue
        failed += 1
        print(f"{r.path}: FAILED{' open or read' if r.status == MISSING else ''}", flush=True)
        what, _, todo = r.message.partition("; ")
        lines = [f"{r.path}: {what}"]
        if r.asset:
            lines.append(f"  asset:    {r.asset}")
        if r.status != MISSING:
            if r.got is not None:
                lines += [f"  expected: {r.expected}", f"  got:      {r.got}"]
            else:
                lines += [f"  expected: {r.expected_size} bytes (sha256 {r.expected})", f"  got:      {r.size} bytes"]
        if todo:
            lines.append(f"  to fix:   {todo}")
        print("\n".join(lines), file=sys.stderr, flush=True)
    if failed:
        print(f"vehiclenet verify: WARNING: {failed} of {len(results)} file(s) did NOT verify", file=sys.stderr)
        return 1
    return 0


def _describe_blas(lib: dict) -> str:
    """``OpenBLAS 0.3.30 (libscipy_openblas), SkylakeX kernel`` from a threadpoolctl entry."""
    name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(str(lib.get("internal_api")), lib.get("internal_api"))
    kernel = f", {lib['architecture']} kernel" if lib.get("architecture") else ""
    return f"{name} {lib.get('version')} ({lib.get('prefix')}){kernel}"


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from . import env
    from .assets import manifest_path, redact_url
    from .blas import blas_libraries, evaluation_blas
    from .cpu_kernels import bf16_status
    from .cpu_kernels import status as cpu_kernels_status

    report = {
        "versions": _info_versions(),
        "device": "not checked (--no-device)" if args.no_device else _info_device(),
        # What CPU inference convolves with (no mindspore import). --no-device promises a quick
        # look: it reports the kernels without compiling them; otherwise they are built if needed.
        "cpu_kernels": cpu_kernels_status(build=not args.no_device),
        "bf16": bf16_status(build=not args.no_device),
        "blas": {"evaluation": evaluation_blas(), "loaded": blas_libraries()},
        "manifest": str(manifest_path()),
        "cache": str(env.cache_dir()),
        "cache_source": env.HOME if env.is_set(env.HOME) else "platform user cache folder",
        "offline": env.offline(),
        "mirror": redact_url(env.mirror()) or None,
        "assets": _info_assets(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0


def _info_versions() -> Dict[str, Optional[str]]:
    import platform
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {"vehiclenet": __version__, "python": platform.python_version()}
    for dist in ("mindspore", "numpy", "requests", "urllib3", "filelock", "platformdirs", "tqdm", "Pillow", "scipy",
                 "onednn-cpu-gomp"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _info_device() -> str:
    import os

    # MindSpore warns about every missing device plugin while probing; the report below
    # says what was chosen, so keep its log to errors unless the user set GLOG_v.
    os.environ.setdefault("GLOG_v", "3")
    try:
        from .device import choose_device
        from .interrupts import import_mindspore

        import_mindspore()
        return choose_device()
    except Exception as exc:  # info must report, not crash, on a broken install
        return f"unknown ({type(exc).__name__}: {exc})"


def _info_assets() -> List[Dict[str, Any]]:
    from .assets import load_manifest
    from .download import cached_path
    from .verify import check_file

    assets = []
    for i, asset in enumerate(load_manifest()):
        path = cached_path(asset)
        entry = {"name": asset.name, "default": i == 0, "file": asset.file, "path": str(path), "cached": path.exists()}
        if path.exists():
            result = check_file(path, asset.sha256, asset)
            entry.update(verified=result.ok, size=result.size, problem=result.message or None)
        assets.append(entry)
    return assets


def _print_info(report: Dict[str, Any]) -> None:
    from . import env

    blas = report["blas"]
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()))
    print(f"device:   {report['device']}")
    print(f"cpu convolutions: {report['cpu_kernels']}")
    print(f"bf16 inference: {report['bf16']}")
    print(f"evaluation BLAS: {_describe_blas(blas['evaluation'])}; also loaded: "
          + ", ".join(_describe_blas(lib) for lib in blas["loaded"] if lib != blas["evaluation"]))
    print(f"manifest: {report['manifest']}")
    print(f"cache:    {report['cache']} ({report['cache_source']})")
    print(f"network:  {'offline (' + env.OFFLINE + ')' if report['offline'] else 'online'}"
          + (f", mirror {report['mirror']}" if report["mirror"] else ""))
    print("assets:")
    for a in report["assets"]:
        state = "not cached"
        if a["cached"] and a["size"] is None:  # something that is not a file sits at the cache path
            state = f"FAILED: {a['problem']}"
        elif a["cached"]:
            state = f"cached, {a['size']} bytes, " + ("verified OK" if a["verified"] else f"FAILED: {a['problem']}")
        print(f"  {a['name']}{' (default)' if a['default'] else ''}: {state}")
        print(f"    {a['path']}")


# --------------------------------------------------------------------------- evaluate
# `evaluate --features` needs numpy/scipy only; `--data` builds the network (mindspore).


def _add_evaluate_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "evaluate",
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
    p.add_argument("--trials", type=int, default=None, help="vehicleid: random gallery draws (default 10)")
    p.add_argument("--seed", type=int, default=None, help="vehicleid: seed of the draws (default 0)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (the published figures use it)")
    p.add_argument("--k1", type=int, default=100, help="re-ranking k1 (default 100)")
    p.add_argument("--k2", type=int, default=15, help="re-ranking k2 (default 15)")
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.0, help="re-ranking lambda (default 0)")
    p.add_argument("--neighbours", choices=("exact", "ivf-sq8", "ivf-flat", "hnsw-sq8"), default=None,
                   help="re-ranking: where the k1-neighbour lists come from: exact (default, brute force) or a "
                   "gallery index of that kind over query + gallery (approximate re-ranking)")
    p.add_argument("--nprobe", type=int, default=None, help="--neighbours ivf-*: cells searched per item")
    p.add_argument("--ap", choices=("trapezoid", "standard"), default="trapezoid",
                   help="AP form: the reference's trapezoidal (default) or non-interpolated")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch for --data (default 32)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights for --data (default: the published checkpoint)")
    p.add_argument("--no-flip", action="store_true", help="--data: skip the horizontal-flip feature sum")
    p.add_argument("--save-features", metavar="F.npz", help="--data: also write the features for later --features runs")
    _add_precision_arg(p, "; --data only")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_evaluate_args(args)
    if args.dataset == "vehicleid":
        return _evaluate_vehicleid(args)
    from . import evaluation

    timings: Dict[str, float] = {}
    with _timed(timings, "features_s"):
        if args.features is not None:
            fs = evaluation.load_features_npz(args.features)
            _check_recorded(args, fs.dataset, fs.split)
            args.split = args.split or fs.split
        else:
            fs = _embed_query_gallery(args)
    result = _evaluate_split(args, fs, timings)
    _print_evaluation(args, result, int(fs.gallery_features.shape[0]), timings)
    return 0


def _evaluate_split(args: argparse.Namespace, fs: "FeatureSet", timings: Dict[str, float]) -> "EvalResult":
    """Query vs gallery evaluation of ``fs`` (the one call of the evaluation engine for VeRi and VERI-Wild)."""
    from .errors import UsageError
    from .protocols import evaluate_split

    try:
        return evaluate_split(fs.query_features, fs.gallery_features, fs.query_ids, fs.gallery_ids, fs.query_cams,
                              fs.gallery_cams, rerank=_rerank(args), ap=args.ap, timings=timings)
    except ValueError as exc:
        if args.rerank:
            raise UsageError(f"re-ranking: {exc}") from None
        raise


def _rerank(args: argparse.Namespace):
    from .protocols import Rerank

    if not args.rerank:
        return None
    return Rerank(args.k1, args.k2, args.lambda_value, neighbours=args.neighbours or "exact", nprobe=args.nprobe)


def _check_evaluate_args(args: argparse.Namespace) -> None:
    """Usage errors of ``evaluate`` and an unusable --save-features path, reported before any work."""
    from .datasets import get_dataset
    from .errors import UsageError
    from .fileio import check_output_file

    if args.data is None and (args.save_features or args.checkpoint or args.no_flip or args.precision != "fp32"):
        raise UsageError("--save-features, --checkpoint, --no-flip and --precision apply to --data only")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
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
    if args.trials < 1:
        raise UsageError("--trials must be >= 1")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if args.save_features:
        check_output_file(args.save_features, "--save-features")


def _check_recorded(args: argparse.Namespace, dataset: Optional[str], split: Optional[str]) -> None:
    """DataError when a --features file says it holds another dataset or split than asked for."""
    from .errors import DataError

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

    from .download import weights_files
    from .fileio import check_output_file

    if args.save_features:
        check_output_file(args.save_features, "--save-features",
                          [*(p for g in groups for p in g), *weights_files(args.checkpoint), *inputs])
    from .features import extract_features

    net = _build_network(args.checkpoint, args.checkpoint is None, args.precision, mode="graph")
    return [np.asarray(extract_features(net, paths, batch_size=args.batch_size, flip=not args.no_flip),
                       dtype=np.float32) for paths in groups]


def _embed_query_gallery(args: argparse.Namespace) -> "FeatureSet":
    """The features of ``--data``'s query and gallery images, also written to --save-features if given."""
    from . import evaluation
    from .datasets import get_dataset
    from .interrupts import kept

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

    from .datasets import vehicleid
    from .errors import UsageError
    from .interrupts import kept
    from .protocols import evaluate_vehicleid

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
    _print_evaluation(args, result, result.num_gallery, timings)
    return 0


def _print_evaluation(args: argparse.Namespace, result: "Union[EvalResult, TrialsResult]", num_gallery: int,
                      timings: Dict[str, float]) -> None:
    """The figures as two lines, and with --json as one JSON object on a last line.

    VehicleID's figures are means over its trials, each followed by ``± std``."""
    import json

    out = result.to_dict()
    out["num_gallery"] = num_gallery
    out["rerank"] = {"k1": args.k1, "k2": args.k2, "lambda": args.lambda_value,
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
          + (f", re-ranked (k1={args.k1}, k2={args.k2}, lambda={args.lambda_value})" if args.rerank else ""))
    print(f"mAP {figure('mAP')} | rank-1 {figure('rank1')} | rank-5 {figure('rank5')} | "
          f"rank-10 {figure('rank10')} | mINP {figure('mINP')}  ({args.ap} AP"
          + (", mean ± std over trials)" if std else ")"))
    if args.json:
        print(json.dumps(out))


# --------------------------------------------------------------------------- embed / rank
# Both build the network, so their handlers import mindspore (lazily, via the library).


def _add_network_args(p: argparse.ArgumentParser, batch_default: int = 16) -> None:
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (default: the published checkpoint)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random weights, nothing downloaded (for tests and timing only)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontal-flip feature sum (2x faster)")
    p.add_argument("--batch-size", type=int, default=batch_default,
                   help=f"images per network call (default {batch_default})")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip missing, corrupt or non-image files (listed on stderr) instead of failing")
    _add_precision_arg(p)


def _add_precision_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="CPU inference arithmetic: fp32 (default, the published model exactly) or bf16 "
                   "(bfloat16 convolutions, float32 accumulation: about 2x faster on CPUs with AVX512-BF16 or "
                   f"AMX, features within cosine 0.9999 of fp32){note}")


_CHUNK_SIZE = 1000  # about 5 minutes of a 2-core CPU per chunk, flip on


def _add_embed_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "embed",
        help="512-d L2-normalised embeddings of images into an .npz",
        description="Embed image files and folders (recursively, sorted) with the published pre-processing "
        "and flip-sum. Writes an .npz with `features` (float32 N x 512) and `paths` (--out), or resumable "
        "chunks into a folder (--out-dir), also from several msrun workers at once (each embeds chunk rank, "
        "rank + workers, ...). Exit codes: 0 success, 1 bad input (the message names the file) or weights "
        "problem, 2 usage.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", "-o", metavar="FEATS.npz",
                   help="output file (with --out-dir: all chunks merged, written once the last one is done)")
    p.add_argument("--out-dir", metavar="DIR",
                   help="resumable: write the features in chunks into DIR (manifest.json, chunk-NNNNN.npz); the same "
                   "command again skips verified chunks; under msrun each worker embeds chunks rank, rank + N, ...")
    p.add_argument("--chunk-size", type=int, metavar="N",
                   help=f"images per chunk with --out-dir (default {_CHUNK_SIZE}; what a killed run loses at most)")
    _add_network_args(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "embed-merge",
        help="merge the chunks of `embed --out-dir` into one .npz",
        description="Verify every chunk of a finished `vehiclenet embed --out-dir` folder and write them as one "
        ".npz (features and paths in input order, as `embed --out` writes). Exit 1 when chunks are missing or "
        "damaged (the same embed command finishes or redoes them).",
    )
    p.add_argument("folder", metavar="DIR", help="folder written by `vehiclenet embed --out-dir`")
    p.add_argument("--out", "-o", required=True, metavar="FEATS.npz", help="output file")
    p.set_defaults(func=_cmd_embed_merge)


def _add_rank_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "rank",
        help="top-k gallery images for a query image, printed and drawn",
        description="Rank a gallery (a folder of images, an .npz from `vehiclenet embed` or a gallery index from "
        "`vehiclenet index build`) by cosine distance "
        "(1 - cos) to a query image; print rank, distance, path and write a picture of the query beside its "
        "top-k matches (green/red frames when VeRi file names give the vehicle ids). The query file itself "
        "is left out of the gallery.",
    )
    p.add_argument("--query", required=True, metavar="IMG", help="query image file")
    p.add_argument("--gallery", required=True, metavar="DIR|FEATS.npz|INDEX",
                   help="gallery folder, features file or gallery index (`vehiclenet index build`)")
    p.add_argument("--top-k", type=int, default=10, help="matches to show (default 10)")
    p.add_argument("--out", "-o", default="ranked.png", metavar="PNG", help="picture to write (default ranked.png)")
    p.add_argument("--no-picture", action="store_true", help="print the ranking only")
    p.add_argument("--thumb", type=int, default=128, help="thumbnail side in pixels (default 128)")
    _add_network_args(p)
    p.set_defaults(func=_cmd_rank)


def _check_network_args(args: argparse.Namespace) -> None:
    from .errors import UsageError

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.checkpoint and args.no_pretrained:
        raise UsageError("--checkpoint and --no-pretrained exclude each other")


def _network_files(args: argparse.Namespace) -> List[str]:
    """The weights file the network of ``embed``/``rank`` will read (an input like the images)."""
    from .download import weights_files

    return weights_files(args.checkpoint, not args.no_pretrained)


def _check_inputs(inputs: List[str], skip_bad: bool) -> None:
    """Missing inputs and folders without images, reported before the network is built (and
    MindSpore imported); with --skip-bad, embed skips them instead."""
    from .features import list_images

    if not skip_bad:
        list_images(inputs)


def _embedding_network(args: argparse.Namespace, inputs: List[str]):
    """The embedding network for a job over ``inputs`` (files and folders): PyNative for a
    handful of images, where compiling the graph would take longer than the job."""
    from .checkpoint import check_checkpoint_file
    from .device import mode_for_images

    if args.checkpoint:  # a FIFO or device is refused here, before the network is built
        check_checkpoint_file(args.checkpoint)
    if args.no_pretrained:
        logging.getLogger("vehiclenet").warning("--no-pretrained: random weights, the features mean nothing")
    images = _image_count(inputs)
    mode = mode_for_images(images)
    logging.getLogger("vehiclenet").info(
        "execution mode %s for %d image(s): %s", mode, images,
        "sooner than compiling the graph" if mode == "pynative" else "the graph is compiled once")
    return _build_network(args.checkpoint, not args.no_pretrained, args.precision, mode=mode)


def _image_count(inputs: List[str]) -> int:
    """How many images ``inputs`` hold (0 when they cannot be listed: embedding will say why)."""
    from .errors import DataError
    from .features import list_images

    try:
        return len(list_images(inputs))
    except DataError:
        return 0


def _build_network(checkpoint: Optional[str], pretrained: bool, precision: str, mode: str):
    """The embedding network, with MindSpore imported and the network built with signals held
    (see interrupts.py); only the download of the weights stays interruptible at once."""
    import os

    from .interrupts import doing, held, import_mindspore

    # MindSpore logs a warning per missing device plugin; our own log says which device is used.
    # GLOG_v is read when mindspore is first imported, so set it before importing it.
    os.environ.setdefault("GLOG_v", "3")
    import_mindspore()
    from .model import create_network, weights_path

    doing("fetching the weights")
    weights_path(checkpoint, pretrained)  # downloads here, interruptible; create_network finds it verified
    with held("building the network"):
        # pretrained passed on: the asset's input_size and last_stride come with it (net.weights_meta).
        return create_network(pretrained=pretrained, checkpoint=checkpoint, include_top=False, precision=precision,
                              mode=mode)


def _cmd_embed(args: argparse.Namespace) -> int:
    from .env import launcher_rank, msrun_scheduler
    from .errors import UsageError
    from .features import embed, save_features
    from .fileio import check_output_file, is_image_path
    from .interrupts import doing, kept

    if msrun_scheduler():  # the workers embed; the scheduler would run the whole job once more
        print("msrun's scheduler process: the workers embed, nothing to do here")
        return 0
    if args.out_dir is not None:
        return _cmd_embed_chunks(args)
    if args.out is None:
        raise UsageError("give --out FEATS.npz, or --out-dir DIR for resumable chunks")
    if args.chunk_size is not None:
        raise UsageError("--chunk-size is for --out-dir: give --out-dir DIR too, or drop --chunk-size")
    if launcher_rank()[1] > 1:
        raise UsageError("under msrun every worker would embed every image: give --out-dir DIR, and each worker "
                         "embeds its share of the chunks")
    _check_network_args(args)
    # Folders stand for the images embed reads from them (an .npz beside them is no input).
    check_output_file(args.out, "--out", [*args.inputs, *_network_files(args)], accept=is_image_path)
    _check_inputs(args.inputs, args.skip_bad)
    kept(f"nothing written ({args.out} untouched)")
    net = _embedding_network(args, args.inputs)
    res = embed(net, args.inputs, batch_size=args.batch_size, flip=not args.no_flip, skip_bad=args.skip_bad)
    doing(f"writing {args.out}")  # atomically: an interrupt leaves the old file or none
    out = save_features(args.out, res.features, res.paths, flip=not args.no_flip)
    kept(f"{out} written")
    n = len(res)
    skipped = f"skipped {len(res.skipped)}" + (
        f" ({', '.join(p for p, _ in res.skipped[:5])}{', ...' if len(res.skipped) > 5 else ''})" if res.skipped else ""
    )
    print(f"embedded {n} image(s) -> {out} ({res.features.shape[1]}-d, flip {'on' if not args.no_flip else 'off'}); "
          f"{skipped}; {res.seconds:.1f} s, {n / max(res.seconds, 1e-9):.2f} img/s")
    return 0


def _cmd_embed_chunks(args: argparse.Namespace) -> int:
    """``embed --out-dir``: this worker's chunks (all of them outside msrun), then the merged
    ``--out`` if every chunk is finished. The worker that finishes last sees every chunk and
    merges; none waits for another, so a worker that died never leaves one hanging."""
    from .checkpoint import check_checkpoint_file
    from .device import mode_for_images
    from .env import launcher_rank
    from .features import list_images
    from .fileio import check_output_file, is_image_path
    from .interrupts import kept
    from .shards import make_job, merge_shards, plan_shards, run_shards, unfinished_chunks

    _check_network_args(args)
    if args.out:
        check_output_file(args.out, "--out", [*args.inputs, *_network_files(args)], accept=is_image_path)
    if args.checkpoint:
        check_checkpoint_file(args.checkpoint)
    rank, world = launcher_rank()
    paths = list_images(args.inputs)
    job = make_job(paths, chunk_size=_CHUNK_SIZE if args.chunk_size is None else args.chunk_size, checkpoint=args.checkpoint, pretrained=not args.no_pretrained,
                   flip=not args.no_flip, precision=args.precision, skip_bad=args.skip_bad)
    plan = plan_shards(args.out_dir, job, paths, rank, world)
    kept(f"finished chunks stay in {args.out_dir}; the same command resumes")
    written = []
    if plan.todo:
        net = _build_network(args.checkpoint, True, args.precision, mode=mode_for_images(plan.images_todo))
        written = run_shards(net, plan, batch_size=args.batch_size)
    print(f"rank {rank} of {world}: {len(plan.done)} chunk(s) already done, verified; {len(written)} embedded "
          f"-> {args.out_dir} ({job.chunks} chunks in all)")
    if args.out:
        missing = unfinished_chunks(args.out_dir)
        if missing:
            print(f"{len(missing)} chunk(s) of other workers not finished yet: the last worker to finish writes "
                  f"{args.out} (or run `vehiclenet embed-merge {args.out_dir} --out {args.out}`)")
        else:
            res = merge_shards(args.out_dir, args.out)
            print(f"merged {len(res)} image(s) -> {args.out}; skipped {len(res.skipped)}")
    return 0


def _cmd_embed_merge(args: argparse.Namespace) -> int:
    from .fileio import check_output_file
    from .shards import merge_shards

    check_output_file(args.out, "--out")
    res = merge_shards(args.folder, args.out)
    print(f"merged {len(res)} image(s) from {args.folder} -> {args.out}; skipped {len(res.skipped)}")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from .preprocessing import load_image
    from .index import GalleryIndex
    from .ranking import rank_gallery, rank_index, veri_id
    from .visualize import draw_ranking

    _check_rank_args(args)
    stored = _stored_gallery(args)
    load_image(args.query)  # a bad query fails here, before the network is built
    net = _embedding_network(args, [args.query] if stored is not None else [args.query, args.gallery])
    if isinstance(stored, GalleryIndex):
        query = _embed_queries(args, net, [args.query], stored)
        ranking = rank_index(query.features[0], stored, args.top_k, leave_out=args.query)
    else:
        query, gallery = _embed_query_and_gallery(args, net, stored)
        ranking = rank_gallery(query.features[0], gallery, args.top_k, leave_out=args.query, source=args.gallery)
    qid, ids = veri_id(args.query), [veri_id(p) for p in ranking.paths]
    _print_ranking(args.query, ranking, qid, ids)
    if not args.no_picture:
        out = draw_ranking(args.query, ranking.paths, ranking.distances, args.out, query_id=qid, ids=ids,
                           thumb=args.thumb)
        print(f"picture: {out}")
    return 0


def _check_rank_args(args: argparse.Namespace) -> None:
    """Usage errors of ``rank`` and a query that is no file, reported before any work."""
    import os

    from .errors import DataError, UsageError
    from .fileio import check_output_file, is_image_path
    from .visualize import picture_format

    _check_network_args(args)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if args.thumb < 16:
        raise UsageError("--thumb must be >= 16")
    if not args.no_picture:
        check_output_file(args.out, "--out", [args.query, args.gallery, *_network_files(args)],
                          accept=is_image_path)
        picture_format(args.out)
    if os.path.isdir(args.query):
        raise UsageError(f"--query {args.query!r} is a folder: give one image file (the gallery can be a folder)")
    if not os.path.isfile(args.query):
        raise DataError(f"{args.query}: query image not found")


def _stored_gallery(args: argparse.Namespace) -> "Optional[Union[FeatureResult, GalleryIndex]]":
    """The features of an .npz ``--gallery`` or the index of a gallery index file; None for a
    folder, whose images are checked now."""
    import os

    from .errors import DataError
    from .features import load_features
    from .index import is_index_file, load_index

    if is_index_file(args.gallery):
        return load_index(args.gallery)
    if os.path.isfile(args.gallery) and args.gallery.lower().endswith(".npz"):
        gallery = load_features(args.gallery)
        stored, flip = gallery.extra.get("flip"), not args.no_flip
        if stored is not None and bool(stored) != flip:
            logging.getLogger("vehiclenet").warning(
                "%s was embedded with flip %s but the query uses flip %s; distances mix the two",
                args.gallery, "on" if bool(stored) else "off", "on" if flip else "off")
        return gallery
    if os.path.isdir(args.gallery):
        _check_inputs([args.gallery], args.skip_bad)
        return None
    raise DataError(f"{args.gallery}: neither a folder, an .npz features file nor a gallery index")


def _embed_query_and_gallery(args: argparse.Namespace, net,
                             stored: "Optional[FeatureResult]") -> "Tuple[FeatureResult, FeatureResult]":
    """Query and gallery features: the gallery's are ``stored``, or embedded with the query's."""
    from .features import FeatureResult, embed

    flip = not args.no_flip
    if stored is not None:
        return embed(net, [args.query], batch_size=1, flip=flip), stored
    # Query and gallery in one run: one batch shape, so the graph compiles once. Skipped
    # files are logged (WARNING) by embed.
    both = embed(net, [args.query, args.gallery], batch_size=args.batch_size, flip=flip, skip_bad=args.skip_bad)
    return FeatureResult(both.features[:1], both.paths[:1]), FeatureResult(both.features[1:], both.paths[1:])


def _print_ranking(query: str, ranking: "Ranking", qid: Optional[int], ids: List[Optional[int]]) -> None:
    """The ranking as ``rank``'s lines: a heading, then rank, distance, path and same/other id."""
    print(f"query {query}" + (f" (id {qid})" if qid is not None else "")
          + f": top {len(ranking.paths)} of {ranking.num_gallery} gallery images, cosine distance 1 - cos")
    for r, (d, p, g) in enumerate(zip(ranking.distances, ranking.paths, ids), 1):
        mark = "" if qid is None or g is None else ("  same id" if g == qid else "  other id")
        print(f"{r:4d}  {d:.4f}  {p}{mark}")

# --------------------------------------------------------------------------- index / search
# `index build`/`index add` and `search --features` need numpy and faiss only; `search --query`
# builds the network like `rank`.


def _add_index_commands(sub: "argparse._SubParsersAction") -> None:
    from .index import KINDS

    p = sub.add_parser(
        "index",
        help="build or grow a persisted gallery index from features files",
        description="A gallery index: features, image paths (and ids/cams when the features files have them), "
        "searchable by cosine distance, memory-mapped when read. Exit codes: 0 success, 1 unusable features "
        "or index file, 2 usage.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    b = actions.add_parser(
        "build", help="index features files (or folders of them), in the order given",
        description="Index the features of FEATURES (.npz files written by `vehiclenet embed`, or folders of "
        "them, read in sorted order), concatenated in the order given. --kind auto is exact up to 50,000 "
        "features and ivf-sq8 beyond. The features are held in memory while the index is built.",
    )
    b.add_argument("features", nargs="+", metavar="FEATURES", help="features .npz files or folders of them")
    b.add_argument("--out", "-o", required=True, metavar="INDEX", help="index file to write")
    b.add_argument("--kind", choices=KINDS, default="auto",
                   help="exact, hnsw-sq8, ivf-sq8, ivf-flat, or auto (default: exact up to 50,000 features)")
    b.add_argument("--nlist", type=int, default=None, help="ivf kinds: coarse cells (default ~sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None, help="ivf kinds: cells searched per query (default 64)")
    b.add_argument("--ef-search", type=int, default=None,
                   help="hnsw-sq8: candidates kept while searching (default 64)")
    b.set_defaults(func=_cmd_index_build)
    a = actions.add_parser(
        "add", help="append features to an index (replaced atomically)",
        description="Append the features of FEATURES to INDEX and write it back under the same name "
        "atomically (a reader sees the old or the new index, never half of one). ivf kinds keep their cells.",
    )
    a.add_argument("index", metavar="INDEX", help="index file written by `vehiclenet index build`")
    a.add_argument("features", nargs="+", metavar="FEATURES", help="features .npz files or folders of them")
    a.set_defaults(func=_cmd_index_add)

    p = sub.add_parser(
        "search",
        help="top-k gallery images of a gallery index for query images or features",
        description="Search a gallery index (`vehiclenet index build`) by cosine distance (1 - cos) for query "
        "images (embedded like `rank` does) or for the features of an .npz. Exit codes: 0 success, 1 unusable "
        "file, 2 usage.",
    )
    p.add_argument("--index", required=True, metavar="INDEX", help="gallery index file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", nargs="+", metavar="IMG", help="query image files or folders")
    src.add_argument("--features", metavar="F.npz", help="query features file from `vehiclenet embed`")
    p.add_argument("--top-k", type=int, default=10, help="matches per query (default 10)")
    p.add_argument("--nprobe", type=int, default=None, help="ivf kinds: cells searched (default: the index's)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="hnsw-sq8: candidates kept while searching (default: the index's)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _add_network_args(p)
    p.set_defaults(func=_cmd_search)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from .fileio import check_output_file
    from .index import build_index
    from .interrupts import doing, kept

    _check_index_tuning(args)
    check_output_file(args.out, "--out", args.features, accept=lambda name: name.endswith(".npz"))
    kept(f"nothing written ({args.out} untouched)")
    start = time.perf_counter()
    doing("building the index")
    index = build_index(args.features, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                        ef_search=args.ef_search)
    doing(f"writing {args.out}")
    out = index.save(args.out)
    kept(f"{out} written")
    _print_index_summary("built", out, index, time.perf_counter() - start)
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from .fileio import check_output_file
    from .index import add_to_index, load_index
    from .interrupts import doing, kept

    check_output_file(args.index, "INDEX", args.features, accept=lambda name: name.endswith(".npz"))
    start = time.perf_counter()
    index = load_index(args.index)
    kept(f"nothing written ({args.index} untouched)")
    doing("adding features")
    added = add_to_index(index, args.features)
    doing(f"writing {args.index}")
    out = index.save(args.index)
    kept(f"{out} written")
    _print_index_summary(f"added {added} to", out, index, time.perf_counter() - start)
    return 0


def _check_index_tuning(args: argparse.Namespace) -> None:
    from .errors import UsageError

    for option in ("nlist", "nprobe", "ef_search"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {value}")


def _print_index_summary(done: str, out: Any, index: "GalleryIndex", seconds: float) -> None:
    params = ", ".join(f"{k} {v}" for k, v in index.params.items() if k != "seed")
    print(f"{done} {out}: {index.count} features, {index.dimension}-d, kind {index.kind}"
          + (f" ({params})" if params else "") + f", {out.stat().st_size / 2 ** 20:.1f} MiB; {seconds:.1f} s")


def _cmd_search(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .features import load_features
    from .index import load_index

    _check_index_tuning(args)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if args.features is not None:
        _check_network_args(args)
        if args.checkpoint or args.no_pretrained or args.no_flip or args.skip_bad or args.precision != "fp32":
            raise UsageError("--checkpoint, --no-pretrained, --no-flip, --skip-bad and --precision apply to "
                             "--query only")
    else:
        _check_network_args(args)
        _check_inputs(args.query, args.skip_bad)
    index = load_index(args.index)  # a bad index fails before the network is built
    if args.features is not None:
        queries = load_features(args.features)
    else:
        queries = _embed_queries(args, _embedding_network(args, args.query), args.query, index)
    dist, rows = index.search(queries.features, args.top_k, nprobe=args.nprobe, ef_search=args.ef_search)
    _print_search(args, index, queries.paths, dist, rows)
    return 0


def _embed_queries(args: argparse.Namespace, net, images: List[str], index: "GalleryIndex") -> "FeatureResult":
    """Query features embedded like the index's (a flip mismatch is warned about)."""
    from .features import embed

    flip = not args.no_flip
    if index.flip is not None and index.flip != flip:
        logging.getLogger("vehiclenet").warning(
            "%s was embedded with flip %s but the queries use flip %s; distances mix the two",
            index.source, "on" if index.flip else "off", "on" if flip else "off")
    return embed(net, images, batch_size=args.batch_size, flip=flip, skip_bad=args.skip_bad)


def _print_search(args: argparse.Namespace, index: "GalleryIndex", names: List[str], dist: "np.ndarray",
                  rows: "np.ndarray") -> None:
    """Per query a heading and rank, distance, path (id, cam) lines; with --json one JSON object."""
    import json

    def extra(r: int) -> Dict[str, int]:
        out = {}
        if index.ids is not None:
            out["id"] = int(index.ids[r])
        if index.cams is not None:
            out["cam"] = int(index.cams[r])
        return out

    results = [{"query": name, "matches": [{"rank": i + 1, "row": int(r), "path": index.path(r),
                                            "distance": float(d), **extra(r)}
                                           for i, (r, d) in enumerate(zip(rs, ds)) if r >= 0]}
               for name, rs, ds in zip(names, rows, dist)]
    if args.json:
        print(json.dumps({"index": args.index, "kind": index.kind, "count": index.count, "top_k": args.top_k,
                          "results": results}))
        return
    for res in results:
        print(f"query {res['query']}: top {len(res['matches'])} of {index.count} ({index.kind} index), "
              "cosine distance 1 - cos")
        for m in res["matches"]:
            tail = "".join(f"  {k} {m[k]}" for k in ("id", "cam") if k in m)
            print(f"{m['rank']:4d}  {m['distance']:.4f}  {m['path']}{tail}")


# --------------------------------------------------------------------------- finetune / export


def _add_finetune_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune on your own identities (ROOT/<id>/*.jpg or VeRi image_train/)",
        description="Fine-tune VehicleNet: published backbone and bottleneck, a new last layer for your "
        "identities. Writes labels.json and vehiclenet-eNNN.ckpt (network + SGD state + epoch) into --out; "
        "create_network(checkpoint=FILE, num_classes=N) loads them. Under msrun every worker trains on its "
        "shard with averaged gradients and only rank 0 writes files.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="ROOT/<id>/*.jpg, or a VeRi-776 folder (image_train/)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for labels.json and checkpoints")
    p.add_argument("--epochs", type=int, default=40, help="total epochs (default 40, the reference VeRi stage)")
    p.add_argument("--batch-size", type=int, default=24, help="images per step and worker (default 24)")
    p.add_argument("--lr", type=float, default=0.02, help="head learning rate; the rest trains at 0.1x (default 0.02)")
    p.add_argument("--image-size", type=int, default=384, help="square training size (default 384)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights, not the published ones")
    p.add_argument("--checkpoint", metavar="CKPT", help="start from the weights of this file instead")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint (weights, SGD state, epoch)")
    p.add_argument("--num-workers", type=int, default=2, help="data pre-processing threads (default 2)")
    p.add_argument("--save-every", type=int, default=1, metavar="E", help="checkpoint every E epochs (default 1)")
    p.add_argument("--keep-max", type=int, default=5, metavar="K", help="keep the newest K checkpoints (default 5)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up epochs (default min(5, epochs // 8): none below 8 epochs)")
    p.add_argument("--decay-epochs", type=int, nargs="*", default=None, metavar="E",
                   help="epochs where the lr drops 10x (default 3/4 of --epochs)")
    p.add_argument("--eval-data", metavar="DIR", help="VeRi-style folder with image_query/ and image_test/")
    p.add_argument("--eval-every", type=int, default=0, metavar="E", help="evaluate on --eval-data every E epochs")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help="seed for weights, data order and augmentations")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .errors import UsageError

    # Epochs, sizes, lr and the schedule are checked by finetune() itself, before it writes anything.
    if args.num_workers < 1:
        raise UsageError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.eval_every and not args.eval_data:
        raise UsageError("--eval-every needs --eval-data")
    if args.resume and args.checkpoint:
        raise UsageError("--resume continues a run with its own weights; drop --checkpoint")

    from .finetune import finetune, note_start
    from .interrupts import import_mindspore

    note_start(args.resume)
    import_mindspore()

    def show(stats) -> None:
        line = (f"epoch {stats.epoch}/{args.epochs}: loss {stats.loss:.4f}, {stats.images_per_second:.2f} images/s, "
                f"step {stats.step}, {stats.seconds:.1f} s")
        if stats.compile_seconds is not None:
            line += f" (first step incl. compilation {stats.compile_seconds:.1f} s, not in images/s)"
        if stats.evaluation:
            line += f", mAP {stats.evaluation['mAP']:.4f}, rank-1 {stats.evaluation['rank1']:.4f}"
        if stats.checkpoint:
            line += f", saved {stats.checkpoint}"
        print(line, flush=True)

    result = finetune(
        args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        pretrained=not args.no_pretrained, checkpoint=args.checkpoint, resume=args.resume,
        num_workers=args.num_workers, save_every=args.save_every, keep_max=args.keep_max,
        warmup_epochs=args.warmup_epochs, decay_epochs=args.decay_epochs, eval_data=args.eval_data,
        eval_every=args.eval_every, max_steps_per_epoch=args.max_steps_per_epoch, seed=args.seed, on_epoch=show,
    )
    if result.rank == 0:
        print(f"{result.num_classes} identities, labels in {result.labels_file}"
              + (f", {result.group_size} workers" if result.group_size > 1 else ""))
        if result.checkpoints:
            print(result.checkpoints[-1])
    return 0


def _add_export_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "export",
        help="export the embedding network (image -> 512-d) to MindIR or ONNX, or a checkpoint's weights alone",
        description="Export the embedding network for a B x 3 x S x S float32 input (pre-processed) to "
        "MindIR (reload with mindspore.load + nn.GraphCell; B fixed) or ONNX (onnxruntime; any B, the input x "
        "has a dynamic batch axis). CKPT writes the network "
        "weights of --checkpoint (head included) without the optimizer state of a fine-tuning checkpoint, a "
        "third of its size, for create_network(checkpoint=..., num_classes=N); --image-size and --batch-size "
        "do not apply to it. The last line of stdout is the file written.",
    )
    p.add_argument("--format", required=True, type=str.upper, choices=["MINDIR", "ONNX", "CKPT"],
                   help="MINDIR, ONNX or CKPT")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (the format's suffix is added if absent)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to export (default: the published checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="identities of the checkpoint's head, checked against the file")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size (default: the weights' input size, 384x384 for the published ones)")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch dimension of MINDIR (default 1); "
                   "ONNX takes any batch")
    p.add_argument("--no-pretrained", action="store_true", help="export random weights (testing only)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_embedding
    from .interrupts import kept

    kept(f"nothing written ({args.out} untouched)")
    path = export_embedding(args.out, file_format=args.format, checkpoint=args.checkpoint,
                            pretrained=not args.no_pretrained, num_classes=args.num_classes,
                            image_size=args.image_size, batch_size=args.batch_size)
    if args.format == "CKPT":
        print(f"CKPT: network weights, no training state ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    else:
        from .model import weights_meta

        batch = "N" if args.format == "ONNX" else args.batch_size
        height, width = ((args.image_size,) * 2 if args.image_size else
                         weights_meta(args.checkpoint, not args.no_pretrained).input_size)
        print(f"{args.format}: embedding network, input {batch}x3x{height}x{width} "
              "float32 -> 512-d" + (" (any batch N)" if args.format == "ONNX" else ""))
    print(path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .interrupts import exit_code, handling, report

    command = None
    # First, before any thread starts: the threads inherit the signal mask handling() sets.
    with handling():
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            return _run(args)
        except KeyboardInterrupt as exc:
            # Ctrl-C (or SIGTERM): one line saying what was interrupted and what is kept.
            print(report(command, exc), file=sys.stderr)
            return exit_code(exc)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Images get vehiclenet's own, configurable pixel limit (VEHICLENET_MAX_PIXELS); Pillow's
    # warning above 89 million pixels would only repeat it, worded as an attack.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        return int(args.func(args) or 0)
    except VehicleNetError as exc:
        print(f"vehiclenet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A file the command reads or writes failed at the system level (a folder where a
        # file should be, a read-only folder, a full disk): name it rather than dump a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vehiclenet {args.command}: error: {where}{exc.strerror or exc} "
              "(check the path, its permissions and the free space)", file=sys.stderr)
        return 1
