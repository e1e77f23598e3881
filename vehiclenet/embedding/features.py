"""Retrieval features: images in, L2-normalised 512-d embeddings out.

The published evaluation's recipe: embedding of the image plus embedding of its
horizontal flip, summed, then L2-normalised (``flip=True``, the default). Every image
goes through :func:`vehiclenet.embedding.preprocessing.preprocess`, the reference pre-processing.

Inputs (any mix, in a list or alone): image file paths; folders, expanded recursively to
their image files; uint8 arrays (HxW, HxWxC RGB/RGBA, or a 4-D NxHxWxC stack); PIL images;
encoded bytes (:mod:`vehiclenet.embedding.inputs` says how they are walked and named).

Pipeline: a thread pool decodes and resizes the next batches while the network runs
(Pillow releases the GIL while decoding), so decoding hides behind the network
(docs/benchmarks.md, ``benchmarks/embed_pipeline.py``). Batches are all one shape, so the graph compiles once: the batch size is
evened out over the run (20 images at batch 16 run as 2 x 10, not 16 + 4) and the last
batch is padded with copies, whose outputs are dropped. Without ``skip_bad`` a bad file
stops the run when its turn comes (earlier batches have already gone through the network).
"""
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import DataError
from ..interrupts import doing, held
from .inputs import ImageInputs, Inputs, expand_inputs
from .preprocessing import INPUT_SIZE, load_image, preprocess
from .result import FeatureResult

__all__ = ["embed", "extract_features", "input_size", "batch_plan"]

LOG = logging.getLogger(__name__)


# Evaluation cannot skip images (its ids would no longer line up), so the advice names both ways.
_BAD_IMAGE_ADVICE = "; replace or remove the file (embedding and ranking can skip it: skip_bad=True / --skip-bad)"


def batch_plan(n: int, batch_size: int) -> int:
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
    listed = images if isinstance(images, ImageInputs) else expand_inputs(images)  # a caller's list is not walked again
    items, skipped = listed.items, list(listed.empty)
    _check_anything_to_embed(items, skipped, skip_bad)
    b = batch_size if fixed_batch else batch_plan(len(items), batch_size)
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
