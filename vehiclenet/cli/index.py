"""`index build` / `index add` / `search`: gallery indexes (faiss, imported lazily); only
`search --query` builds the network."""
import argparse
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ._network import (INDEX_KINDS, add_network_args, check_network_args, embedding_network, image_size, list_inputs,
                       weights_choice)
from ._common import (add_command, add_threshold_arg, emit, load_threshold, progress, same_vehicle_field,
                      same_vehicle_mark, shown)

INDEX_PARAM_LIMIT = 2 ** 31 - 1

if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    import numpy as np

    from ..features import FeatureResult, ImageInputs
    from ..index import GalleryIndex


def add_index_commands(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "index",
        help="build or grow a persisted gallery index from features files",
        description="A gallery index: features, image paths (and ids/cams when the features files have them), "
        "searchable by cosine distance, memory-mapped when read. Exit codes: 0 success, 1 unusable features "
        "or index file, 2 usage.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    b = add_command(
        actions, "build",
        json_help="print the index written (count, dimension, kind, parameters, size) as one JSON object",
        help="index features files (or folders of them), in the order given",
        description="Index the features of FEATURES (.npz files written by `vehiclenet embed`, or folders of "
        "them, read in sorted order), concatenated in the order given. --kind auto is exact up to 50,000 "
        "features and ivf-sq8 beyond. The features are held in memory while the index is built.",
    )
    b.add_argument("features", nargs="+", metavar="FEATURES", help="features .npz files or folders of them")
    b.add_argument("--out", "-o", required=True, metavar="INDEX", help="index file to write")
    b.add_argument("--kind", choices=INDEX_KINDS, default="auto",
                   help="exact, hnsw-sq8, ivf-sq8, ivf-flat, or auto (default: exact up to 50,000 features)")
    b.add_argument("--nlist", type=int, default=None, help="ivf kinds: coarse cells (default ~sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None, help="ivf kinds: cells searched per query (default 64)")
    b.add_argument("--ef-search", type=int, default=None,
                   help="hnsw-sq8: candidates kept while searching (default 64)")
    b.set_defaults(func=_cmd_index_build)
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
    a.set_defaults(func=_cmd_index_add)

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
    add_network_args(p)
    p.set_defaults(func=_cmd_search)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from ..fileio import check_output_file
    from ..index import build_index
    from ..interrupts import doing, kept

    _check_index_tuning(args)
    check_output_file(args.out, "--out", args.features, accept=lambda name: name.endswith(".npz"),
                      owned=_chunk_folders(args.features))
    kept(f"nothing written ({args.out} untouched)")
    start = time.perf_counter()
    doing("building the index")
    index = build_index(args.features, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe,
                        ef_search=args.ef_search)
    doing(f"writing {args.out}")
    out = index.save(args.out)
    kept(f"{out} written")
    _print_index_summary(args, "built", out, index, time.perf_counter() - start)
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from .. import env
    from ..errors import DataError
    from ..fileio import check_output_file, locked_for_update
    from ..index import add_to_index, load_index
    from ..interrupts import doing, kept

    check_output_file(args.index, "INDEX", args.features, accept=lambda name: name.endswith(".npz"),
                      owned=_chunk_folders(args.features))
    start = time.perf_counter()
    doing(f"waiting for other updates of {args.index}")
    try:
        # Read, add and write under the lock: of two concurrent adds, each keeps the other's rows.
        with locked_for_update(args.index, env.lock_timeout(), on_error=load_index):
            index = load_index(args.index)
            kept(f"nothing written ({args.index} untouched)")
            doing("adding features")
            added = add_to_index(index, args.features)
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
    from ..shards import MANIFEST

    return [name for name in inputs if os.path.isfile(os.path.join(name, MANIFEST))]


def _check_index_tuning(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    for option in ("nlist", "nprobe", "ef_search"):
        value = getattr(args, option, None)
        if value is not None and not 1 <= value <= INDEX_PARAM_LIMIT:
            raise UsageError(f"--{option.replace('_', '-')} must be from 1 to {INDEX_PARAM_LIMIT} "
                             f"(faiss takes a C int), got {value}")


def _print_index_summary(args: argparse.Namespace, done: str, out: Any, index: "GalleryIndex", seconds: float,
                         added: Optional[int] = None) -> None:
    params = ", ".join(f"{k} {v}" for k, v in index.params.items() if k != "seed")
    size = out.stat().st_size
    line = (f"{done} {out}: {index.count} features, {index.dimension}-d, kind {index.kind}"
            + (f" ({params})" if params else "") + f", {size / 2 ** 20:.1f} MiB; {seconds:.1f} s")
    result = {"index": str(out), "count": index.count, "dimension": index.dimension, "kind": index.kind,
              "params": dict(index.params), "weights": index.weights, "bytes": size, "seconds": round(seconds, 3)}
    emit(args, [line], result if added is None else {"added": added, **result})


def _cmd_search(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..features import load_features
    from ..index import load_index
    from ..ranking import search_leaving_out
    from ..weights import check_same_weights, stored_identity

    _check_index_tuning(args)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    threshold = load_threshold(args)
    if args.features is not None:
        check_network_args(args)
        if (args.checkpoint or args.no_pretrained or args.no_flip or args.skip_bad or args.precision != "fp32"
                or args.image_size is not None):
            raise UsageError("--checkpoint, --no-pretrained, --no-flip, --skip-bad, --precision and --image-size "
                             "apply to --query only")
    else:
        check_network_args(args)
        images = list_inputs(args.query, args.skip_bad)
    index = load_index(args.index)  # a bad index fails before the network is built
    if args.features is not None:
        queries = load_features(args.features)
        check_same_weights(index.weights, stored_identity(queries.extra, args.features), args.index,
                           what=args.features)
    else:
        check_same_weights(index.weights, weights_choice(args).identity(), args.index)
        queries = embed_queries(args, embedding_network(args, len(images)), images, index)
    if args.keep_self:
        dist, rows = index.search(queries.features, args.top_k, nprobe=args.nprobe, ef_search=args.ef_search)
    else:
        dist, rows, _ = search_leaving_out(index, queries.features, queries.paths, args.top_k, nprobe=args.nprobe,
                                           ef_search=args.ef_search)
    _print_search(args, index, queries.paths, dist, rows, threshold)
    return 0


def embed_queries(args: argparse.Namespace, net, images: "ImageInputs", index: "GalleryIndex") -> "FeatureResult":
    """Query features embedded like the index's (a flip mismatch is warned about)."""
    from ..features import embed

    flip = not args.no_flip
    if index.flip is not None and index.flip != flip:
        logging.getLogger("vehiclenet").warning(
            "%s was embedded with flip %s but the queries use flip %s; distances mix the two",
            index.source, "on" if index.flip else "off", "on" if flip else "off")
    return embed(net, images, batch_size=args.batch_size, flip=flip, skip_bad=args.skip_bad, progress=progress(args),
                 size=image_size(args))


def _print_search(args: argparse.Namespace, index: "GalleryIndex", names: List[str], dist: "np.ndarray",
                  rows: "np.ndarray", threshold: Optional[float] = None) -> None:
    """Per query a heading and rank, distance, path (id, cam) lines; with --json one JSON object."""

    def extra(r: int) -> Dict[str, int]:
        out = {}
        if index.ids is not None:
            out["id"] = int(index.ids[r])
        if index.cams is not None:
            out["cam"] = int(index.cams[r])
        return out

    results = [{"query": name, "matches": [{"rank": i + 1, "row": int(r), "path": index.path(r),
                                            "distance": float(d), **extra(r),
                                            **same_vehicle_field(float(d), threshold)}
                                           for i, (r, d) in enumerate(zip(rs, ds)) if r >= 0]}
               for name, rs, ds in zip(names, rows, dist)]
    lines = []
    for res in results:
        lines.append(f"query {shown(res['query'])}: top {len(res['matches'])} of {index.count} ({index.kind} index), "
                     "cosine distance 1 - cos")
        for m in res["matches"]:
            tail = "".join(f"  {k} {m[k]}" for k in ("id", "cam") if k in m)
            lines.append(f"{m['rank']:4d}  {m['distance']:.4f}  {shown(m['path'])}{tail}"
                         f"{same_vehicle_mark(m['distance'], threshold)}")
    emit(args, lines, {"index": args.index, "kind": index.kind, "count": index.count, "top_k": args.top_k,
                       "results": results})
