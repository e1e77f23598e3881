"""`index build` / `index add` / `search`: gallery indexes (faiss, imported lazily); only
`search --query` builds the network."""
import argparse
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ._network import INDEX_KINDS, NetworkRequest, add_network_args, list_inputs
from ._common import (add_command, add_filter_args, add_threshold_arg, emit, load_threshold,
                      query_cameras, row_filter, same_vehicle_field, same_vehicle_mark, shown)

INDEX_PARAM_LIMIT = 2 ** 31 - 1
# The library's defaults (vehiclenet/retrieval/index_tuning.py), repeated for --help: importing it would import numpy.
TARGET_RECALL = 0.95
TUNE_QUERIES = 2000
META_HELP = ("cameras, times and tags of the images, for filtered search: a CSV file (header path,camera,time,tags; "
             "any of the last three), `veri` (cameras from VeRi-776 file names) or `veri-wild:ROOT` (cameras and "
             "times from VERI-Wild's vehicle_info.txt); replaces the features files' own cams/times/tags")

if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    import numpy as np

    from ..embedding.result import FeatureResult
    from ..embedding.inputs import ImageInputs
    from ..retrieval.index import GalleryIndex


def add_index_commands(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "index",
        help="build or grow a persisted gallery index from features files",
        description="A gallery index: features, image paths (and ids, cameras, times, tags when the features files or --meta "
        "have them), "
        "searchable by cosine distance, memory-mapped when read. Exit codes: 0 success, 1 unusable features "
        "or index file, 2 usage.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    _add_build(actions)
    _add_info_and_add(actions)
    _add_search(sub)


def _add_build(actions: "argparse._SubParsersAction") -> None:
    b = add_command(
        actions, "build",
        json_help="print the index written (count, dimension, kind, parameters, size) as one JSON object",
        help="index features files (or folders of them), in the order given",
        description="Index the features of FEATURES (.npz files written by `vehiclenet embed`, or folders of "
        "them, read in sorted order), concatenated in the order given. --kind auto is exact up to 50,000 "
        "features and ivf-sq8 beyond, or exact where ivf-sq8 cannot reach --target-recall. The search effort "
        "(nprobe, efSearch) is the smallest that reaches --target-recall on a sample of the gallery's own "
        "features, measured against exact search; `vehiclenet index info` shows it. The features are held in "
        "memory while the index is built.",
    )
    b.add_argument("features", nargs="+", metavar="FEATURES", help="features .npz files or folders of them")
    b.add_argument("--out", "-o", required=True, metavar="INDEX", help="index file to write")
    b.add_argument("--kind", choices=INDEX_KINDS, default="auto",
                   help="exact, hnsw-sq8, ivf-sq8, ivf-flat, or auto (default: exact up to 50,000 features)")
    b.add_argument("--nlist", type=int, default=None, help="ivf kinds: coarse cells (default ~sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None,
                   help="ivf kinds: cells searched per query (default: tuned for --target-recall)")
    b.add_argument("--ef-search", type=int, default=None,
                   help="hnsw-sq8: candidates kept while searching (default: tuned for --target-recall)")
    b.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help=f"recall@10 against exact search the default search settings must reach, measured on "
                   f"the gallery's own features (default {TARGET_RECALL})")
    b.add_argument("--tune-queries", type=int, default=None, metavar="N",
                   help=f"gallery features searched to measure recall (default {TUNE_QUERIES}; each costs one exact "
                   "pass over the gallery)")
    b.add_argument("--meta", metavar="CSV|veri|veri-wild:ROOT", help=META_HELP)
    b.add_argument("--no-tune", action="store_true",
                   help="keep the fixed defaults (nprobe 64, efSearch 64) without measuring recall")
    b.set_defaults(func=_cmd_index_build)


def _add_info_and_add(actions: "argparse._SubParsersAction") -> None:
    i = add_command(
        actions, "info",
        json_help="print the index's description as one JSON object",
        help="what an index holds and how it searches",
        description="Print an index's kind, size, search settings and the recall they were tuned for and "
        "measured at, the weights that embedded its features and the files it was built from. The index is "
        "checked (every part's sha256) as a search would check it.",
    )
    i.add_argument("index", metavar="INDEX", help="index file written by `vehiclenet index build`")
    i.set_defaults(func=_cmd_index_info)
    a = add_command(
        actions, "add",
        json_help="print the rows added and the index written as one JSON object",
        help="append features to an index (replaced atomically)",
        description="Append the features of FEATURES to INDEX and write it back under the same name "
        "atomically (a reader sees the old or the new index, never half of one). ivf kinds keep their cells. "
        "Images whose path the index already holds are skipped, with a warning.",
    )
    a.add_argument("index", metavar="INDEX", help="index file written by `vehiclenet index build`")
    a.add_argument("features", nargs="+", metavar="FEATURES", help="features .npz files or folders of them")
    a.add_argument("--meta", metavar="CSV|veri|veri-wild:ROOT", help=META_HELP)
    a.set_defaults(func=_cmd_index_add)


def _add_search(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "search",
        json_help="print the results as one JSON object",
        help="top-k gallery images of a gallery index for query images or features",
        description="Search a gallery index (`vehiclenet index build`) by cosine distance (1 - cos) for query "
        "images (embedded like `rank` does) or for the features of an .npz. A query's own file is left out of "
        "its matches, as `rank` leaves it out (--keep-self keeps it). Exit codes: 0 success, 1 unusable file, "
        "2 usage.",
    )
    p.add_argument("--index", required=True, metavar="INDEX", help="gallery index file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", nargs="+", metavar="IMG", help="query image files or folders")
    src.add_argument("--features", metavar="F.npz", help="query features file from `vehiclenet embed`")
    p.add_argument("--top-k", type=int, default=10, help="matches per query (default 10)")
    p.add_argument("--nprobe", type=int, default=None, help="ivf kinds: cells searched (default: the index's)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="hnsw-sq8: candidates kept while searching (default: the index's)")
    p.add_argument("--keep-self", action="store_true",
                   help="keep a query's own file among its matches (left out by default, as `rank` does: "
                   "a query embedded into the index would otherwise be its own first match)")
    add_threshold_arg(p)
    add_filter_args(p)
    add_network_args(p)
    p.set_defaults(func=_cmd_search)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from ..fileio import check_output_file
    from ..retrieval.index import build_index
    from ..interrupts import doing, kept

    _check_index_tuning(args)
    target = _target_recall(args)
    _check_meta(args)
    check_output_file(args.out, "--out", [*args.features, *_meta_file(args)],
                      accept=lambda name: name.endswith(".npz"),
                      owned=_chunk_folders(args.features))
    kept(f"nothing written ({args.out} untouched)")
    start = time.perf_counter()
    doing("building the index" + ("" if target is None else f" and tuning it for recall@10 {target:g}"))
    index = build_index(args.features, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                        ef_search=args.ef_search, target_recall=target,
                        tune_queries=args.tune_queries or TUNE_QUERIES, meta=args.meta)
    doing(f"writing {args.out}")
    out = index.save(args.out)
    kept(f"{out} written")
    _print_index_summary(args, "built", out, index, time.perf_counter() - start)
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from .. import env
    from ..errors import DataError
    from ..fileio import check_output_file, locked_for_update
    from ..retrieval.index import add_to_index, load_index
    from ..interrupts import doing, kept

    _check_meta(args)
    check_output_file(args.index, "INDEX", [*args.features, *_meta_file(args)],
                      accept=lambda name: name.endswith(".npz"),
                      owned=_chunk_folders(args.features))
    start = time.perf_counter()
    doing(f"waiting for other updates of {args.index}")
    try:
        # Read, add and write under the lock: of two concurrent adds, each keeps the other's rows.
        with locked_for_update(args.index, env.lock_timeout(), on_error=load_index):
            index = load_index(args.index)
            kept(f"nothing written ({args.index} untouched)")
            doing("adding features")
            added = add_to_index(index, args.features, meta=args.meta)
            doing(f"writing {args.index}")
            out = index.save(args.index)
    except TimeoutError as exc:
        raise DataError(f"{exc}; waited {env.lock_timeout():.0f} s (VEHICLENET_LOCK_TIMEOUT): run again when "
                        "the other `vehiclenet index add` has finished") from None
    kept(f"{out} written")
    _print_index_summary(args, f"added {added} to", out, index, time.perf_counter() - start, added=added)
    return 0


def _chunk_folders(inputs: List[str]) -> List[str]:
    """The inputs that are folders of feature chunks (they hold a manifest): every file in them
    is the input's. A plain folder of .npz files only stands for its .npz files."""
    from ..embedding.shards import MANIFEST

    return [name for name in inputs if os.path.isfile(os.path.join(name, MANIFEST))]


def _meta_file(args: argparse.Namespace) -> List[str]:
    """--meta when it names a file: an input the output must not replace."""
    return [args.meta] if args.meta is not None and args.meta != "veri" and not args.meta.startswith("veri-wild:") \
        else []


def _check_meta(args: argparse.Namespace) -> None:
    if args.meta is not None:
        from ..embedding.metadata import check_source

        check_source(args.meta)


def _target_recall(args: argparse.Namespace) -> Optional[float]:
    """--target-recall (None with --no-tune), checked before any work."""
    import math

    from ..errors import UsageError

    if args.no_tune:
        if args.target_recall is not None or args.tune_queries is not None:
            raise UsageError("--no-tune keeps the fixed search defaults: drop --target-recall and --tune-queries")
        return None
    target = TARGET_RECALL if args.target_recall is None else args.target_recall
    if math.isnan(target) or not 0 < target <= 1:
        raise UsageError(f"--target-recall must be above 0 and at most 1 (a share of the true top 10), got "
                         f"{args.target_recall}")
    return target


def _check_index_tuning(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    for option in ("nlist", "nprobe", "ef_search", "tune_queries"):
        value = getattr(args, option, None)
        if value is not None and not 1 <= value <= INDEX_PARAM_LIMIT:
            raise UsageError(f"--{option.replace('_', '-')} must be from 1 to {INDEX_PARAM_LIMIT} "
                             f"(faiss takes a C int), got {value}")


def _print_index_summary(args: argparse.Namespace, done: str, out: Any, index: "GalleryIndex", seconds: float,
                         added: Optional[int] = None) -> None:
    size = out.stat().st_size
    line = (f"{done} {shown(str(out))}: {index.count} features, {index.dimension}-d, kind {index.kind}"
            + _params_text(index) + f", {size / 2 ** 20:.1f} MiB; {seconds:.1f} s")
    tuning = index.tuning
    lines = [line] + ([f"search settings: {tuning.describe()}"] if tuning is not None else [])
    result = {"index": str(out), "count": index.count, "dimension": index.dimension, "kind": index.kind,
              "params": dict(index.params), "tuning": None if tuning is None else tuning.to_json(),
              "weights": index.weights, "bytes": size, "seconds": round(seconds, 3)}
    emit(args, lines, result if added is None else {"added": added, **result})


def _params_text(index: "GalleryIndex") -> str:
    params = ", ".join(f"{k} {v}" for k, v in index.params.items() if k != "seed")
    return f" ({params})" if params else ""


def _cmd_index_info(args: argparse.Namespace) -> int:
    from ..retrieval.index import load_index
    from ..weights.choice import describe

    index = load_index(args.index)
    tuning = index.tuning
    flip = {None: "unknown", True: "on", False: "off"}[index.flip]
    columns = index.labels
    lines = [f"{shown(args.index)}: {index.count} features, {index.dimension}-d, kind {index.kind}{_params_text(index)}",
             "search settings: " + ("not tuned, recall not measured (built with --no-tune, by an earlier version, or "
                                    "from one row)" if tuning is None
                                    else tuning.describe()),
             f"weights: {describe(index.weights) if index.weights else 'unknown'}; flip {flip}",
             f"labels: {', '.join(columns) if columns else 'none'}",
             f"built from: {', '.join(shown(s) for s in index.sources) or 'unknown'}"]
    if tuning is not None and tuning.tried:
        lines.append("recall@%d by %s: %s" % (tuning.k, tuning.param,
                                               ", ".join(f"{int(v)} {r:.3f}" for v, r in tuning.tried)))
    emit(args, lines, {"index": args.index, "count": index.count, "dimension": index.dimension, "kind": index.kind,
                       "params": dict(index.params), "tuning": None if tuning is None else tuning.to_json(),
                       "weights": index.weights, "flip": index.flip, "labels": columns, "sources": index.sources,
                       "bytes": os.path.getsize(args.index)})
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..embedding.files import load_features
    from ..retrieval.index import load_index
    from ..retrieval.ranking import search_filtered
    from ..weights.choice import check_same_weights, stored_identity

    _check_index_tuning(args)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    threshold = load_threshold(args)
    rows_kept = row_filter(args)
    request = NetworkRequest.from_args(args)
    if args.features is not None:
        if (args.checkpoint or args.no_pretrained or args.no_flip or args.skip_bad or args.precision != "fp32"
                or args.image_size is not None):
            raise UsageError("--checkpoint, --no-pretrained, --no-flip, --skip-bad, --precision and --image-size "
                             "apply to --query only")
    else:
        images = list_inputs(args.query, request.skip_bad)
    index = load_index(args.index)  # a bad index fails before the network is built
    if args.features is not None:
        queries = load_features(args.features)
        check_same_weights(index.weights, stored_identity(queries.extra, args.features), args.index,
                           what=args.features)
    else:
        check_same_weights(index.weights, request.identity(), args.index)
        queries = embed_queries(request, request.network(len(images)), images, index)
    cams = None
    if rows_kept.exclude_same_camera:
        cams = query_cameras(args, queries.paths, queries.extra.get("cams") if args.features is not None else None)
    dist, rows, among = search_filtered(index, queries.features, queries.paths, args.top_k, rows_kept, cams,
                                        keep_self=args.keep_self, nprobe=args.nprobe, ef_search=args.ef_search)
    _print_search(args, index, queries.paths, dist, rows, threshold, among, rows_kept.describe())
    return 0


def embed_queries(request: NetworkRequest, net, images: "ImageInputs", index: "GalleryIndex") -> "FeatureResult":
    """Query features embedded like the index's (a flip mismatch is warned about)."""
    flip = request.flip
    if index.flip is not None and index.flip != flip:
        logging.getLogger("vehiclenet").warning(
            "%s was embedded with flip %s but the queries use flip %s; distances mix the two",
            index.source, "on" if index.flip else "off", "on" if flip else "off")
    return request.embed(net, images)


def _print_search(args: argparse.Namespace, index: "GalleryIndex", names: List[str], dist: "np.ndarray",
                  rows: "np.ndarray", threshold: Optional[float], among: "np.ndarray",
                  filters: Dict[str, Any]) -> None:
    """Per query a heading and rank, distance, path (id, cam, time, tags) lines; with --json one
    JSON object."""
    def extra(r: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if index.ids is not None:
            out["id"] = int(index.ids[r])
        if index.cams is not None:
            out["cam"] = int(index.cams[r])
        if index.times is not None:
            out["time"] = _time_text(int(index.times[r]))
        if "tags" in index.labels:
            out["tags"] = index.tag(r)
        return out

    results = [{"query": name, "among": int(n), "matches": [{"rank": i + 1, "row": int(r), "path": index.path(r),
                                                             "distance": float(d), **extra(r),
                                                             **same_vehicle_field(float(d), threshold)}
                                                            for i, (r, d) in enumerate(zip(rs, ds)) if r >= 0]}
               for name, rs, ds, n in zip(names, rows, dist, among)]
    lines = []
    scope = "" if not filters else ", filtered: " + "; ".join(
        (k.replace("_", " ") + " " + _filter_text(k, v)).strip() for k, v in filters.items())
    for res in results:
        lines.append(f"query {shown(res['query'])}: top {len(res['matches'])} of {res['among']} ({index.kind} index"
                     f"{scope}), cosine distance 1 - cos")
        for m in res["matches"]:
            tail = "".join(f"  {k} {shown(str(m[k]))}" for k in ("id", "cam", "time", "tags") if m.get(k) not in
                           (None, ""))
            lines.append(f"{m['rank']:4d}  {m['distance']:.4f}  {shown(m['path'])}{tail}"
                         f"{same_vehicle_mark(m['distance'], threshold)}")
    emit(args, lines, {"index": args.index, "kind": index.kind, "count": index.count, "top_k": args.top_k,
                       "filters": filters, "results": results})


def _time_text(seconds: int) -> Optional[str]:
    """A stored time as ISO 8601 UTC; None where unknown."""
    from datetime import datetime, timezone

    from ..embedding.metadata import UNKNOWN_TIME

    if seconds == UNKNOWN_TIME:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # beyond the calendar (a file from elsewhere): the number itself
        return str(seconds)


def _filter_text(key: str, value: Any) -> str:
    if key in ("after", "before"):
        return _time_text(value) or str(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "" if value is True else str(value)
