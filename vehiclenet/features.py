"""Retrieval features: images in, L2-normalised 512-d embeddings out.

The published evaluation's recipe: embedding of the image plus embedding of its
horizontal flip, summed, then L2-normalised (``flip=True``, the default). Every image
goes through :func:`vehiclenet.preprocessing.preprocess`, the reference pre-processing.

Inputs (any mix, in a list or alone): image file paths; folders, expanded recursively to
their image files (by extension, hidden files and folders skipped, links followed but each
real folder and file taken once, sorted by path);
uint8 arrays (HxW, HxWxC RGB/RGBA, or a 4-D NxHxWxC stack); PIL images; encoded bytes.
In-memory inputs are named ``"<array i>"`` / ``"<image i>"`` / ``"<bytes i>"`` in
``FeatureResult.paths`` (``i`` = position after expanding folders and stacks).

Pipeline: a thread pool decodes and resizes the next batches while the network runs
(Pillow releases the GIL while decoding). On a 2-core CPU pre-processing costs ~3-4 ms
per image against ~0.25-0.35 s of network time per flipped image, so the pipeline runs at
95-98 % of the network-alone rate (benchmarks/embed_pipeline.py); the prefetch matters more
on accelerators. Batches are all one shape, so the graph compiles once: the batch size is
evened out over the run (20 images at batch 16 run as 2 x 10, not 16 + 4) and the last
batch is padded with copies, whose outputs are dropped. Without ``skip_bad`` a bad file
stops the run when its turn comes (earlier batches have already gone through the network).
"""
import errno
import heapq
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image

from .errors import DataError
from .feature_checks import checked_features
from .fileio import atomic_write, is_image_path, read_npz
from .interrupts import doing, held
from .preprocessing import INPUT_SIZE, ImageSource, load_image, preprocess

__all__ = ["FeatureResult", "embed", "extract_features", "input_size", "list_images", "load_features",
           "save_features"]

LOG = logging.getLogger(__name__)

Inputs = Union[ImageSource, Sequence[ImageSource]]


@dataclass
class FeatureResult:
    """Features with the names of the images they came from, in input order.

    ``features[i]`` belongs to ``paths[i]``. ``skipped`` lists ``(path, reason)`` of the
    inputs left out (only with ``skip_bad=True``). ``extra`` holds any other arrays of a
    features file read by :func:`load_features`; ``seconds`` the wall time of :func:`embed`.
    """

    features: np.ndarray
    paths: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    extra: Dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)


# Evaluation cannot skip images (its ids would no longer line up), so the advice names both ways.
_BAD_IMAGE_ADVICE = "; replace or remove the file (embedding and ranking can skip it: skip_bad=True / --skip-bad)"


def _walk_images(folder: str) -> List[str]:
    """Image files below ``folder``, sorted: each real folder searched once, each file listed once.

    Links are followed, but a link to a folder above ``folder``, and a folder already
    searched (a link loop, two links to one folder), are skipped and logged, and a file
    reached under several names is listed under one. Folders reached without a link are searched first (a heap ordered by
    "through a link", then path), so a file keeps its plain name over a linked one.
    """
    seen: Set[Tuple[int, int]] = set()
    files: Dict[Tuple[int, int], Tuple[bool, str]] = {}
    unreadable: List[str] = []  # dangling links and the like: listed, so embedding names them
    heap: List[Tuple[bool, str]] = [(False, folder)]
    root = os.path.realpath(folder)
    while heap:
        linked, path = heapq.heappop(heap)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                LOG.info("skipped %s: a link to a folder already searched (a link loop or a second link)", path)
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            if path != folder and exc.errno not in (errno.ENOENT, errno.ELOOP):  # gone meanwhile, dangling link
                LOG.warning("skipped the folder %s: cannot list it (%s)%s", path, exc.strerror or exc,
                            "; move its images to a shorter path" if exc.errno == errno.ENAMETOOLONG else "")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            via_link = linked or entry.is_symlink()
            if _is_folder(entry):
                if entry.is_symlink() and _holds(os.path.realpath(entry.path), root):
                    LOG.info("skipped %s: a link to a folder that holds %s (a parent)", entry.path, folder)
                    continue
                heapq.heappush(heap, (via_link, entry.path))
            elif is_image_path(entry.name):
                _add_file(entry, via_link, files, unreadable)
    return sorted([p for _, p in files.values()] + unreadable)


def _holds(outer: str, inner: str) -> bool:
    """Whether the real folder ``outer`` is one of ``inner``'s parents (a link to ``inner``
    itself is a loop, which the walk's record of searched folders catches)."""
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _add_file(entry: os.DirEntry, via_link: bool, files: Dict[Tuple[int, int], Tuple[bool, str]],
              unreadable: List[str]) -> None:
    """Keep ``entry`` unless its file is already listed under a plainer or earlier name."""
    try:
        st = entry.stat()
    except OSError:
        unreadable.append(entry.path)
        return
    key, candidate = (st.st_dev, st.st_ino), (via_link, entry.path)
    if key in files:
        LOG.debug("%s and %s are the same file: embedded once", files[key][1], entry.path)
        candidate = min(candidate, files[key])
    files[key] = candidate


def _as_list(inputs: Inputs) -> List[Any]:
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
        return [inputs]
    return list(inputs)


def _expand(inputs: Inputs) -> Tuple[List[Tuple[str, Any]], List[Tuple[str, str]]]:
    """(name, source) per image, plus (folder, reason) for folders holding no image."""
    items: List[Tuple[str, Any]] = []
    empty: List[Tuple[str, str]] = []
    for src in _as_list(inputs):
        if isinstance(src, (str, os.PathLike)):
            name = os.fspath(src)
            if os.path.isdir(name):
                files = _walk_images(name)
                if not files:
                    empty.append((name, "folder holds no image files"))
                items.extend((f, f) for f in files)
            else:
                items.append((name, name))  # a named file is taken whatever its extension
        elif isinstance(src, np.ndarray) and src.ndim == 4:
            items.extend((f"<array {len(items)}>", a) for a in src)
        elif isinstance(src, np.ndarray):
            items.append((f"<array {len(items)}>", src))
        elif isinstance(src, Image.Image):
            items.append((f"<image {len(items)}>", src))
        elif isinstance(src, (bytes, bytearray)):
            items.append((f"<bytes {len(items)}>", src))
        else:
            raise DataError(f"cannot use {type(src).__name__} as an image: give paths, folders, uint8 arrays, "
                            "PIL images or encoded bytes")
    return items, empty


@dataclass
class ImageInputs:
    """Inputs expanded once (:func:`expand_inputs`): what :func:`embed` takes without walking
    the folders again. ``items`` are (name, source) per image in input order; ``empty`` the
    folders holding no image and ``missing`` the named paths that do not exist, each with why."""

    items: List[Tuple[str, Any]]
    empty: List[Tuple[str, str]]
    missing: List[Tuple[str, str]]

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """DataError for the first missing path or folder without images, as :func:`list_images`."""
        for name, reason in (*self.missing, *self.empty):
            raise DataError(f"{name}: {reason}")


def expand_inputs(inputs: Inputs) -> ImageInputs:
    """``inputs`` with every folder searched (once): see :class:`ImageInputs`."""
    items, empty = _expand(inputs)
    named = [os.fspath(src) for src in _as_list(inputs) if isinstance(src, (str, os.PathLike))]
    missing = [(name, "no such file or folder") for name in named if not os.path.exists(name)]
    return ImageInputs(items, empty, missing)


def list_images(inputs: Inputs) -> List[str]:
    """File paths of ``inputs`` (files and folders; folders expanded recursively, sorted).

    Raises:
        DataError: a path does not exist, a folder holds no image, or an input is not a path.
    """
    paths = []
    for src in _as_list(inputs):
        if not isinstance(src, (str, os.PathLike)):
            raise DataError(f"list_images takes paths, got {type(src).__name__}")
        name = os.fspath(src)
        if os.path.isdir(name):
            files = _walk_images(name)
            if not files:
                raise DataError(f"{name}: folder holds no image files")
            paths.extend(files)
        elif os.path.exists(name):
            paths.append(name)
        else:
            raise DataError(f"{name}: no such file or folder")
    return paths


def _batch_plan(n: int, batch_size: int) -> int:
    """The one batch size used for n images: at most batch_size, padding minimised."""
    batches = -(-n // batch_size)
    return max(1, -(-n // max(1, batches)))


def input_size(net) -> Tuple[int, int]:
    """The (height, width) images are resized to for ``net``: ``net.weights_meta.input_size``
    (set by ``create_network`` from the weights' manifest asset), else the published 384x384."""
    meta = getattr(net, "weights_meta", None)
    return tuple(meta.input_size) if meta is not None else INPUT_SIZE


def _prepare(src: Any, size: Tuple[int, int]) -> np.ndarray:
    return preprocess(load_image(src, size), size)  # a large JPEG is drafted for this size


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _run_net(net, batch: np.ndarray, flip: bool):
    """Summed (original + flipped) embeddings of a batch, one network call of 2B when flipping."""
    import mindspore as ms

    if flip:
        # Flip along W of the preprocessed CHW input; original and flip share one graph call:
        # fewer, larger calls suit Ascend/GPU, and on this 2-core CPU one call of 2B and two of
        # B were indistinguishable within noise (benchmarks/embed_pipeline.py --flip-layouts).
        both = np.concatenate([batch, batch[..., ::-1]], axis=0)
        out = net(ms.Tensor(both)).asnumpy().astype(np.float32)
        b = batch.shape[0]
        return out[:b] + out[b:]
    return net(ms.Tensor(batch)).asnumpy().astype(np.float32)


def _want_progress(progress: Optional[bool], n: int, batch: int) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and n > 2 * batch


def embed(
    net,
    images: Inputs,
    *,
    batch_size: int = 16,
    flip: bool = True,
    skip_bad: bool = False,
    progress: Optional[bool] = None,
    num_workers: Optional[int] = None,
    size: Optional[Tuple[int, int]] = None,
    fixed_batch: bool = False,
) -> FeatureResult:
    """Embed images with ``net`` (from ``create_network(include_top=False)``).

    Args:
        net: a Cell mapping (B, 3, H, W) float32 to (B, D) embeddings, in inference mode.
        images: paths, folders, uint8 arrays, PIL images, bytes, or a list mixing them; or
            :func:`expand_inputs`'s result, which is not listed again.
        batch_size: largest number of images per network call (twice that many inputs
            go through the network when ``flip``).
        flip: add the embedding of the horizontally flipped image before normalising
            (the published evaluation does).
        skip_bad: leave out missing, corrupt or non-image inputs and list them in
            ``skipped`` instead of raising.
        progress: tqdm bar on stderr; ``None`` shows it on a terminal for runs longer
            than two batches.
        num_workers: decoding threads (default: ``min(4, cpu count)``).
        size: network input (height, width); ``None``: :func:`input_size` of ``net`` (the
            size its weights' asset gives, else the published 384x384).
        fixed_batch: run every network call at exactly ``batch_size`` images (the last
            batch padded) instead of evening the batch size out over this call's images:
            for callers that embed many parts with one network and want one graph shape.

    Returns:
        FeatureResult: ``features`` (N, D) float32 with unit L2 norm, in input order.

    Raises:
        DataError: a bad input (without ``skip_bad``; names the file) or no image at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    if isinstance(images, ImageInputs):  # listed by the caller already
        items, skipped = images.items, list(images.empty)
    else:
        items, skipped = _expand(images)
    _check_anything_to_embed(items, skipped, skip_bad)
    b = batch_size if fixed_batch else _batch_plan(len(items), batch_size)
    size = input_size(net) if size is None else tuple(size)
    doing(f"embedding images (0 of {len(items)} done)")
    workers = num_workers or min(4, os.cpu_count() or 1)
    bar = _progress_bar(len(items)) if _want_progress(progress, len(items), b) else None
    job = _EmbedRun(net, items, batch=b, flip=flip, size=size, skip_bad=skip_bad, skipped=skipped, bar=bar)
    job.run(workers)
    if not job.features:
        raise DataError(f"no usable image among {len(items)} input(s); first problem: "
                        f"{skipped[0][0]}: {skipped[0][1]}")
    return FeatureResult(
        features=_l2_normalise(np.concatenate(job.features)),
        paths=job.names,
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )


def _check_anything_to_embed(items: List[Tuple[str, Any]], skipped: List[Tuple[str, str]], skip_bad: bool) -> None:
    """DataError for a folder without images (unless ``skip_bad``) or when there is no image at all."""
    if skipped and not skip_bad:
        raise DataError(f"{skipped[0][0]}: {skipped[0][1]}{_BAD_IMAGE_ADVICE}")
    if not items:
        raise DataError("no images to embed" + (f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""))


def _progress_bar(total: int) -> Any:
    """A tqdm bar on stderr counting ``total`` images."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, desc="embedding", dynamic_ncols=True)


class _EmbedRun:
    """One :func:`embed` run: decodes ahead in a thread pool, batches in input order, calls the network.

    ``features`` and ``names`` grow batch by batch; bad inputs are appended to ``skipped``
    (with ``skip_bad``) or stop the run with a DataError.
    """

    def __init__(self, net: Any, items: List[Tuple[str, Any]], *, batch: int, flip: bool, size: Tuple[int, int],
                 skip_bad: bool, skipped: List[Tuple[str, str]], bar: Any) -> None:
        self.net, self.items, self.batch, self.flip, self.size = net, items, batch, flip, size
        self.skip_bad, self.skipped, self.bar = skip_bad, skipped, bar
        self.features: List[np.ndarray] = []
        self.names: List[str] = []
        self.pending: Deque[Tuple[str, Future]] = deque()  # (name, decoding) in input order
        self.batch_arrays: List[np.ndarray] = []
        self.batch_names: List[str] = []

    def run(self, workers: int) -> None:
        """Decode with ``workers`` threads and embed every item; closes the progress bar."""
        window = 2 * self.batch + workers  # keeps the next batch ready while the network works on this one
        todo = iter(self.items)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vehiclenet-decode") as pool:
                try:
                    self._top_up(pool, todo, window)
                    while self.pending:
                        self._receive(*self.pending.popleft())
                        self._top_up(pool, todo, window)
                        if len(self.batch_arrays) == self.batch:
                            self._flush()
                    if self.batch_arrays:
                        self._flush()
                except BaseException:  # Ctrl-C or an error: stop before the pool's shutdown decodes the rest
                    self._cancel_pending()
                    raise
        finally:
            if self.bar is not None:
                self.bar.close()

    def _top_up(self, pool: ThreadPoolExecutor, todo: Iterator[Tuple[str, Any]], window: int) -> None:
        """Start decoding the next items until ``window`` are pending."""
        while len(self.pending) < window:
            item = next(todo, None)
            if item is None:
                return
            self.pending.append((item[0], pool.submit(_prepare, item[1], self.size)))

    def _cancel_pending(self) -> None:
        """Cancel the decodings not yet started."""
        for _, other in self.pending:
            other.cancel()

    def _receive(self, name: str, decoding: Future) -> None:
        """Add the decoded image ``name`` to the batch being collected, or skip it if it is bad."""
        try:
            arr = decoding.result()
        except DataError as exc:
            self._bad_input(name, exc)
            return
        self.batch_arrays.append(arr)
        self.batch_names.append(name)

    def _bad_input(self, name: str, exc: DataError) -> None:
        """Skip and log input ``name`` with ``skip_bad``; else stop the run with a DataError naming it."""
        if not self.skip_bad:
            self._cancel_pending()
            raise DataError(f"{exc}{_BAD_IMAGE_ADVICE}") from None
        reason = str(exc)
        prefix = f"{name}: "
        self.skipped.append((name, reason[len(prefix):] if reason.startswith(prefix) else reason))
        LOG.warning("skipped %s", reason)
        if self.bar is not None:
            self.bar.update(1)

    def _flush(self) -> None:
        """Embed the collected batch and start a new one."""
        batch = np.stack(self.batch_arrays)
        real = batch.shape[0]
        if real < self.batch:  # pad with copies of the first image: same graph shape, outputs dropped
            batch = np.concatenate([batch, np.repeat(batch[:1], self.batch - real, axis=0)])
        # Held: the first call compiles the graph, calling back into Python, where a
        # KeyboardInterrupt makes MindSpore print pages and write rank_0/om/analyze_fail.ir.
        with held("compiling the network and embedding the first batch" if not self.names else None):
            self.features.append(_run_net(self.net, batch, self.flip)[:real])
        self.names.extend(self.batch_names)
        doing(f"embedding images ({len(self.names)} of {len(self.items)} done)")
        if self.bar is not None:
            self.bar.update(real)
        self.batch_arrays, self.batch_names = [], []


def extract_features(net, images: Inputs, **options: Any) -> np.ndarray:
    """(N, D) float32 L2-normalised features of ``images``, in order: ``embed(net, images, **options).features``,
    with :func:`embed`'s keyword options (``batch_size``, ``flip``, ``skip_bad``, ``progress``, ...).

    With ``skip_bad=True`` rows no longer line up with the inputs; use :func:`embed` to
    learn which images were kept.
    """
    return embed(net, images, **options).features


# --------------------------------------------------------------------------- npz files


def save_features(path: Union[str, os.PathLike], features: np.ndarray, paths: Sequence[str], **extra: Any) -> Path:
    """Write ``features`` (float32) and ``paths`` (str) plus ``extra`` arrays to an .npz file.

    The file is written under a temporary name and renamed, so a crash never leaves a
    half-written file; the name is used as given (no ``.npz`` appended).
    """
    feats = np.asarray(features, dtype=np.float32)
    names = np.asarray([str(p) for p in paths], dtype=str)
    if feats.ndim != 2 or feats.shape[0] != names.shape[0]:
        raise ValueError(f"features {feats.shape} and {names.shape[0]} paths do not match")
    for key in ("features", "paths"):
        if key in extra:
            raise ValueError(f"extra key {key!r} is reserved")
    with atomic_write(path) as fh:
        np.savez(fh, features=feats, paths=names, **{k: np.asarray(v) for k, v in extra.items()})
    return Path(path)


def load_features(path: Union[str, os.PathLike]) -> FeatureResult:
    """Read a file written by :func:`save_features` (or ``vehiclenet embed``), or a folder of
    chunks written by ``vehiclenet embed --out-dir`` (:func:`vehiclenet.shards.load_feature_shards`).

    Raises:
        DataError: missing file, not an .npz, keys ``features``/``paths`` missing or inconsistent;
            for a folder, chunks missing or failing verification.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        from .shards import load_feature_shards

        return load_feature_shards(name)
    remedy = "run `vehiclenet embed` to write it"
    arrays = read_npz(name, ("features", "paths"), "a features .npz written by `vehiclenet embed`", remedy)
    feats = checked_features(arrays.pop("features"), name, remedy=remedy)
    names = arrays.pop("paths")
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"{name}: paths must be a 1-D array of text, got shape {names.shape} dtype {names.dtype}")
    paths = [str(p) for p in names.tolist()]
    if feats.shape[0] != len(paths):
        raise DataError(f"{name}: features shape {feats.shape} does not match {len(paths)} paths")
    return FeatureResult(features=feats, paths=paths, extra=arrays)


_NEAREST_TILE = 4096


def nearest(query: np.ndarray, gallery: np.ndarray, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances (1 - cos) of the ``k`` gallery rows closest to ``query``.

    Both are L2-normalised features (as :func:`extract_features` returns); equal
    distances keep gallery order.
    """
    from .blas import matmul_nt

    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    # Gallery rows as the tiled side: the same bits for any thread count, few BLAS calls.
    sims = matmul_nt(np.asarray(gallery, dtype=np.float32), q, tile_rows=_NEAREST_TILE).reshape(-1)
    order = np.argsort(-sims, kind="stable")[:k]
    return order, (1.0 - sims[order]).astype(np.float32)
