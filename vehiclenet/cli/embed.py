"""`embed`, `embed-merge` and `rank`: embedding and ranking build the network, so their handlers import
mindspore (lazily, via the library); `embed-merge` only reads chunk files."""
import argparse
import logging
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from ._network import NetworkRequest, add_network_args, list_inputs
from .index import embed_queries
from ._common import (add_command, add_filter_args, add_threshold_arg, emit, load_threshold,
                      query_cameras, row_filter, same_vehicle_field, same_vehicle_mark, shown)

MAX_THUMB = 1024  # a picture holds top-k + 1 thumbnails side by side: 11 x 1024 pixels is plenty


if TYPE_CHECKING:  # annotations only: each handler imports what it needs when it runs
    from ..embedding.result import FeatureResult
    from ..embedding.inputs import ImageInputs
    from ..retrieval.index import GalleryIndex
    from ..retrieval.ranking import Ranking


_CHUNK_SIZE = 1000  # about 5 minutes of a 2-core CPU per chunk, flip on


def add_embed_commands(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "embed",
        json_help="print what was written (file, images, skipped, seconds...) as one JSON object",
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
    p.add_argument("--meta", metavar="CSV|veri|veri-wild:ROOT",
                   help="with --out: store the images' cameras, times and tags beside their features, for filtered "
                   "`rank --gallery FEATS.npz` (a CSV file with header path,camera,time,tags, `veri` or "
                   "`veri-wild:ROOT`; `vehiclenet index build --meta` takes the same)")
    p.add_argument("--tracklets", metavar="LIST.csv",
                   help="with --out: one row per track, the mean of its images' features (normalised again), named "
                   "by the track, for image-to-track and track-to-track search (a CSV file with header path,track "
                   "listing every image)")
    add_network_args(p)
    p.set_defaults(func=_cmd_embed)

    p = add_command(
        sub, "embed-merge",
        json_help="print what was merged as one JSON object",
        help="merge the chunks of `embed --out-dir` into one .npz",
        description="Verify every chunk of a finished `vehiclenet embed --out-dir` folder and write them as one "
        ".npz (features and paths in input order, as `embed --out` writes). Exit 1 when chunks are missing or "
        "damaged (the same embed command finishes or redoes them).",
    )
    p.add_argument("folder", metavar="DIR", help="folder written by `vehiclenet embed --out-dir`")
    p.add_argument("--out", "-o", required=True, metavar="FEATS.npz", help="output file")
    p.set_defaults(func=_cmd_embed_merge)


def add_rank_command(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "rank",
        json_help="print the rankings (and pictures) as one JSON object",
        help="top-k gallery images for each query image, printed and drawn",
        description="Rank a gallery (a folder of images, an .npz from `vehiclenet embed` or a gallery index from "
        "`vehiclenet index build`) by cosine distance "
        "(1 - cos) to each query image; print rank, distance, path and write a picture of the query beside its "
        "top-k matches (green/red frames when VeRi file names give the vehicle ids; with several queries "
        "--out's name numbered: ranked-1.png, ranked-2.png, ...). A query's own file is left out of its "
        "gallery.",
    )
    p.add_argument("--query", required=True, nargs="+", metavar="IMG",
                   help="query image files or folders (as `search --query`)")
    p.add_argument("--gallery", required=True, metavar="DIR|FEATS.npz|INDEX",
                   help="gallery folder, features file or gallery index (`vehiclenet index build`)")
    p.add_argument("--top-k", type=int, default=10, help="matches to show (default 10)")
    p.add_argument("--out", "-o", default="ranked.png", metavar="PNG", help="picture to write (default ranked.png)")
    p.add_argument("--no-picture", action="store_true", help="print the ranking only")
    p.add_argument("--thumb", type=int, default=128,
                   help=f"thumbnail side in pixels, 16 to {MAX_THUMB} (default 128)")
    add_network_args(p)
    add_threshold_arg(p)
    add_filter_args(p)
    p.set_defaults(func=_cmd_rank)


def _cmd_embed(args: argparse.Namespace) -> int:
    from ..env import launcher_rank, msrun_scheduler
    from ..errors import UsageError
    from ..embedding.features import input_size
    from ..embedding.result import save_features
    from ..fileio import check_output_file, is_image_path
    from ..interrupts import doing, kept

    if msrun_scheduler():  # the workers embed; the scheduler would run the whole job once more
        print("msrun's scheduler process: the workers embed, nothing to do here")
        return 0
    if args.out_dir is not None:
        if args.meta is not None or args.tracklets is not None:
            raise UsageError("--meta and --tracklets go with --out (a chunk folder holds images); for a chunk "
                             "folder give --meta to `vehiclenet index build`")
        return _cmd_embed_chunks(args)
    if args.out is None:
        raise UsageError("give --out FEATS.npz, or --out-dir DIR for resumable chunks")
    if args.chunk_size is not None:
        raise UsageError("--chunk-size is for --out-dir: give --out-dir DIR too, or drop --chunk-size")
    if launcher_rank()[1] > 1:
        raise UsageError("under msrun every worker would embed every image: give --out-dir DIR, and each worker "
                         "embeds its share of the chunks")
    request = NetworkRequest.from_args(args)
    # Folders stand for the images embed reads from them (an .npz beside them is no input).
    check_output_file(args.out, "--out", [*args.inputs, *request.files(), *_side_files(args)],
                      accept=is_image_path)
    images = list_inputs(args.inputs, request.skip_bad)
    names = [name for name, _ in images.items]
    meta = _image_meta(args.meta, names)  # a bad source or track list fails before embedding
    track_of = _track_names(args.tracklets, names)
    kept(f"nothing written ({args.out} untouched)")
    net = request.network(len(images))
    res = request.embed(net, images)
    doing(f"writing {args.out}")  # atomically: an interrupt leaves the old file or none
    weights = request.identity()
    recorded = {} if weights is None else {"weights": weights}
    size = request.size or input_size(net)
    if meta is not None:
        recorded.update(meta(res.paths))
    feats, rows_named = _rows_to_save(res, track_of, recorded)
    out = save_features(args.out, feats, rows_named, flip=request.flip, image_size=list(size), **recorded)
    kept(f"{out} written")
    n = len(res)
    skipped = f"skipped {len(res.skipped)}" + (
        f" ({', '.join(shown(p) for p, _ in res.skipped[:5])}{', ...' if len(res.skipped) > 5 else ''})" if res.skipped else ""
    )
    as_tracks = "" if track_of is None else f" as {len(rows_named)} track(s)"
    line = (f"embedded {n} image(s){as_tracks} -> {out} ({res.features.shape[1]}-d, flip "
            f"{'on' if request.flip else 'off'}); {skipped}; {res.seconds:.1f} s, {n / max(res.seconds, 1e-9):.2f} img/s")
    emit(args, [line], {"out": str(out), "images": n, "rows": len(rows_named), "dimension": int(res.features.shape[1]),
                        "flip": request.flip, "weights": weights, "precision": request.precision,
                        "image_size": list(size),
                        "skipped": [{"path": p, "reason": r} for p, r in res.skipped],
                        "seconds": round(res.seconds, 3)})
    return 0


def _side_files(args: argparse.Namespace) -> List[str]:
    """The metadata and track lists a command reads (never to be overwritten by its output)."""
    return [f for f in (getattr(args, "meta", None), getattr(args, "tracklets", None))
            if f is not None and f != "veri" and not f.startswith("veri-wild:")]


def _track_names(track_list: Optional[str], names: List[str]) -> Optional[dict]:
    """Each image's track from ``--tracklets`` (None without it)."""
    if track_list is None:
        return None
    from ..embedding.tracklets import read_tracklets

    return dict(zip(names, read_tracklets(track_list, names)))


def _rows_to_save(res: "FeatureResult", track_of: Optional[dict], recorded: dict) -> tuple:
    """The features and row names to write: the images', or with ``track_of`` one row per track
    (``recorded``'s per-image metadata replaced by the tracks')."""
    if track_of is None:
        return res.features, res.paths
    from ..embedding.tracklets import aggregate

    tracks = aggregate(res.features, [track_of[p] for p in res.paths], recorded)
    recorded.update(tracks.extra, track_sizes=tracks.sizes)
    return tracks.features, tracks.names


def _image_meta(source: Optional[str], names: List[str]):
    """None, or a function giving the features-file columns of some of ``names`` (the images
    embedded, skipped ones left out) from the metadata ``source``."""
    if source is None:
        return None
    import numpy as np

    from ..embedding.metadata import check_source, read_meta

    check_source(source)
    columns = read_meta(source, names).as_extra()
    row = {name: i for i, name in enumerate(names)}

    def pick(paths: List[str]) -> dict:
        rows = np.asarray([row[p] for p in paths], dtype=np.int64)
        return {key: value[rows] for key, value in columns.items()}

    return pick


def _cmd_embed_chunks(args: argparse.Namespace) -> int:
    """``embed --out-dir``: this worker's chunks (all of them outside msrun), then the merged
    ``--out`` if every chunk is finished. The worker that finishes last sees every chunk and
    merges; none waits for another, so a worker that died never leaves one hanging."""
    from ..model.checkpoint import check_checkpoint_file
    from ..env import launcher_rank
    from ..embedding.inputs import list_images
    from ..fileio import check_output_file, is_image_path
    from ..interrupts import kept
    from ..embedding.shards import make_job, merge_shards, plan_shards, run_shards, unfinished_chunks

    request = NetworkRequest.from_args(args)
    if args.out:
        check_output_file(args.out, "--out", [*args.inputs, *request.files()], accept=is_image_path,
                          owned=[args.out_dir])
    if request.weights.checkpoint:
        check_checkpoint_file(request.weights.checkpoint)
    rank, world = launcher_rank()
    paths = list_images(args.inputs)
    job = make_job(paths, chunk_size=_CHUNK_SIZE if args.chunk_size is None else args.chunk_size,
                   weights=request.weights, flip=request.flip, precision=request.precision,
                   skip_bad=request.skip_bad, image_size=request.size)
    plan = plan_shards(args.out_dir, job, paths, rank, world)
    kept(f"finished chunks stay in {args.out_dir}; the same command resumes")
    written = []
    if plan.todo:
        written = run_shards(request.network(plan.images_todo), plan, batch_size=request.batch_size)
    lines = [f"rank {rank} of {world}: {len(plan.done)} chunk(s) already done, verified; {len(written)} embedded "
             f"-> {args.out_dir} ({job.chunks} chunks in all)"]
    result = {"out_dir": args.out_dir, "rank": rank, "workers": world, "chunks": job.chunks,
              "verified_before": len(plan.done), "embedded": written, "weights": job.weights, "out": None}
    if args.out:
        missing = unfinished_chunks(args.out_dir)
        if missing:
            lines.append(f"{len(missing)} chunk(s) of other workers not finished yet: the last worker to finish "
                         f"writes {args.out} (or run `vehiclenet embed-merge {args.out_dir} --out {args.out}`)")
        else:
            res = merge_shards(args.out_dir, args.out)
            lines.append(f"merged {len(res)} image(s) -> {args.out}; skipped {len(res.skipped)}")
            result.update(out=args.out, images=len(res), skipped=len(res.skipped))
    emit(args, lines, result)
    return 0


def _cmd_embed_merge(args: argparse.Namespace) -> int:
    from ..fileio import check_output_file
    from ..embedding.shards import merge_shards

    check_output_file(args.out, "--out", owned=[args.folder])
    res = merge_shards(args.folder, args.out)
    emit(args, [f"merged {len(res)} image(s) from {args.folder} -> {args.out}; skipped {len(res.skipped)}"],
         {"out": args.out, "folder": args.folder, "images": len(res), "skipped": len(res.skipped)})
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from ..embedding.inputs import ImageInputs
    from ..embedding.preprocessing import load_image
    from ..retrieval.visualize import draw_ranking

    request = _check_rank_args(args)
    threshold = load_threshold(args)
    rows_kept = row_filter(args)
    stored = _stored_gallery(args, request)
    if rows_kept and stored is None:
        from ..errors import UsageError

        raise UsageError(f"filters read the gallery's cameras, times and tags: give --gallery a features file or "
                         f"index that has them (`vehiclenet index build FEATURES --meta ...`), not the folder "
                         f"{args.gallery}")
    queries = list_inputs(args.query, False)  # a query is what was asked about: never skipped
    for name, _ in queries.items:
        load_image(name)  # a bad query fails here, before the network is built
    pictures = _picture_names(args, request, [name for name, _ in queries.items])
    # A gallery folder is listed once and embedded with the queries, in one run.
    gallery = None if stored is not None else list_inputs([args.gallery], request.skip_bad)
    images = queries if gallery is None else ImageInputs(queries.items + gallery.items, gallery.empty,
                                                         gallery.missing)
    net = request.network(len(images))
    rankings = _rankings(args, request, net, stored, images, len(queries), rows_kept)
    results, lines = [], []
    for (query, qid, ranking, ids), picture in zip(rankings, pictures):
        lines.extend(_ranking_lines(query, ranking, qid, ids, threshold))
        if picture is not None:
            picture = str(draw_ranking(query, ranking.paths, ranking.distances, picture, query_id=qid, ids=ids,
                                       thumb=args.thumb))
            lines.append(f"picture: {shown(picture)}")
        results.append({"query": query, "id": qid, "num_gallery": ranking.num_gallery, "picture": picture,
                        "matches": [{"rank": r, "path": p, "distance": d, "id": g,
                                     **same_vehicle_field(d, threshold)} for r, (p, d, g)
                                    in enumerate(zip(ranking.paths, ranking.distances, ids), 1)]})
    emit(args, lines, {"gallery": args.gallery, "top_k": args.top_k, "results": results})
    return 0


def _rankings(args: argparse.Namespace, request: NetworkRequest, net, stored, images: "ImageInputs", queries: int,
              rows_kept) -> list:
    """(query, its VeRi id, Ranking, the matches' ids) per query: the first ``queries`` of
    ``images``, the rest being the gallery folder's images when nothing is ``stored``;
    ``rows_kept`` the :class:`vehiclenet.retrieval.filters.RowFilter` of the gallery rows to rank."""
    from ..retrieval.index import GalleryIndex
    from ..datasets.veri import veri_id
    from ..retrieval.ranking import rank_gallery, rank_index

    if isinstance(stored, GalleryIndex):
        feats = embed_queries(request, net, images, stored)
        masks = _query_masks(args, rows_kept, stored.columns(), len(stored), feats.paths)
        ranked = [rank_index(feats.features[i], stored, args.top_k, leave_out=q, allowed=masks[i])
                  for i, q in enumerate(feats.paths)]
    else:
        feats, gallery = _embed_query_and_gallery(request, net, stored, images, queries)
        columns = {key: gallery.extra.get(key) for key in ("cams", "times", "tags")}
        masks = _query_masks(args, rows_kept, columns, len(gallery.paths), feats.paths)
        ranked = [rank_gallery(feats.features[i], gallery, args.top_k, leave_out=q, source=args.gallery,
                               allowed=masks[i]) for i, q in enumerate(feats.paths)]
    return [(q, veri_id(q), r, [veri_id(p) for p in r.paths]) for q, r in zip(feats.paths, ranked)]


def _query_masks(args: argparse.Namespace, rows_kept, columns: dict, n: int, queries: List[str]) -> list:
    """Per query the gallery rows it may be matched with (None: all)."""
    if not rows_kept:
        return [None] * len(queries)
    cams = query_cameras(args, queries) if rows_kept.exclude_same_camera else None
    masks: list = [None] * len(queries)
    for members, mask in rows_kept.groups(columns, n, cams, len(queries), args.gallery):
        for i in members:
            masks[i] = mask
    return masks


def _picture_names(args: argparse.Namespace, request: NetworkRequest, queries: List[str]) -> List[Optional[str]]:
    """Where each query's picture goes: --out for one query; for several, --out's name with
    the query's number (ranked.png: ranked-1.png, ranked-2.png, ...); None with --no-picture.
    Checked now, before any work, like every output."""
    from pathlib import Path

    from ..fileio import check_output_file, is_image_path

    if args.no_picture:
        return [None] * len(queries)
    if len(queries) == 1:
        return [args.out]
    out = Path(args.out)
    names = [str(out.with_name(f"{out.stem}-{i}{out.suffix}")) for i in range(1, len(queries) + 1)]
    for name in names:
        check_output_file(name, "--out", [*queries, args.gallery, *request.files()], accept=is_image_path)
    return names


def _check_rank_args(args: argparse.Namespace) -> NetworkRequest:
    """The network request of ``rank``; its usage errors are reported here, before any work."""
    from ..errors import UsageError
    from ..fileio import check_output_file, is_image_path
    from ..retrieval.visualize import picture_format

    request = NetworkRequest.from_args(args)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if not 16 <= args.thumb <= MAX_THUMB:
        raise UsageError(f"--thumb must be from 16 to {MAX_THUMB} pixels, got {args.thumb}")
    if not args.no_picture:
        check_output_file(args.out, "--out", [*args.query, args.gallery, *request.files()],
                          accept=is_image_path)
        picture_format(args.out)
    return request


def _stored_gallery(args: argparse.Namespace,
                    request: NetworkRequest) -> "Optional[Union[FeatureResult, GalleryIndex]]":
    """The features of an .npz ``--gallery`` or the index of a gallery index file; None for a
    folder, whose images are checked now."""
    import os

    from ..errors import DataError
    from ..embedding.checks import stored_flag
    from ..embedding.files import load_features
    from ..retrieval.index import is_index_file, load_index
    from ..weights.choice import check_same_weights, stored_identity

    if is_index_file(args.gallery):
        index = load_index(args.gallery)
        check_same_weights(index.weights, request.identity(), args.gallery)
        return index
    if os.path.isfile(args.gallery) and args.gallery.lower().endswith(".npz"):
        gallery = load_features(args.gallery)
        check_same_weights(stored_identity(gallery.extra, args.gallery), request.identity(), args.gallery)
        stored, flip = stored_flag(gallery.extra, "flip", args.gallery), request.flip
        if stored is not None and stored != flip:
            logging.getLogger("vehiclenet").warning(
                "%s was embedded with flip %s but the query uses flip %s; distances mix the two",
                args.gallery, "on" if stored else "off", "on" if flip else "off")
        return gallery
    if os.path.isdir(args.gallery):
        return None
    raise DataError(f"{args.gallery}: neither a folder, an .npz features file nor a gallery index")


def _embed_query_and_gallery(request: NetworkRequest, net, stored: "Optional[FeatureResult]",
                             images: "ImageInputs", queries: int) -> "Tuple[FeatureResult, FeatureResult]":
    """Query and gallery features: the gallery's are ``stored``, or embedded with the
    queries' (``images``: the ``queries`` query images, then the gallery folder's images)."""
    from ..embedding.result import FeatureResult

    if stored is not None:
        return request.embed(net, images, skip_bad=False), stored
    # Queries and gallery in one run: one batch shape, so the graph compiles once. Skipped
    # gallery files are logged (WARNING) by embed; the queries decoded before.
    both = request.embed(net, images)
    return (FeatureResult(both.features[:queries], both.paths[:queries]),
            FeatureResult(both.features[queries:], both.paths[queries:]))


def _ranking_lines(query: str, ranking: "Ranking", qid: Optional[int], ids: List[Optional[int]],
                   threshold: Optional[float] = None) -> List[str]:
    """The ranking as ``rank``'s lines: a heading, then rank, distance, path, same/other id and,
    with a calibrated ``threshold``, "same vehicle" below it."""
    lines = [f"query {shown(query)}" + (f" (id {qid})" if qid is not None else "")
             + f": top {len(ranking.paths)} of {ranking.num_gallery} gallery images, cosine distance 1 - cos"]
    for r, (d, p, g) in enumerate(zip(ranking.distances, ranking.paths, ids), 1):
        mark = "" if qid is None or g is None else ("  same id" if g == qid else "  other id")
        lines.append(f"{r:4d}  {d:.4f}  {shown(p)}{mark}{same_vehicle_mark(d, threshold)}")
    return lines
