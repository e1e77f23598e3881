"""Chunked, resumable, data-parallel embedding: a folder of feature chunks and its manifest.

A long embedding job writes its features in chunks of ``chunk_size`` consecutive inputs
(the sorted input list of :func:`vehiclenet.embedding.inputs.list_images`), each to its own file
``chunk-00000.npz``, ``chunk-00001.npz``, ... with a ``.sha256`` line beside it
(``sha256sum -c`` reads it). Each chunk and each ``.sha256`` is written atomically (a crash
leaves the old file or none), the ``.sha256`` after its chunk, so a chunk without one is
unfinished. ``manifest.json`` records everything that shapes the result (:class:`ShardJob`):
a re-run with the same job skips the chunks that pass verification (recorded sha256, readable,
the expected inputs in order, consistent rows) and redoes the others with a warning; a re-run
with another job into the same folder is refused, naming what differs.

Under MindSpore's launcher ``msrun`` every worker runs the same command: chunk ``c`` goes to
rank ``c % world_size`` (round robin, so every rank gets a share of the early and the late
chunks and no rank needs to know how fast the others are). Workers exchange nothing: no
collective communication, only files in one folder (which must be shared between machines
when msrun spans several). Because a chunk's content depends only on its inputs and the job,
a folder can be finished by a run with another worker count, or by a single process. The
rank is msrun's ``MS_NODE_ID`` (see :func:`vehiclenet.env.launcher_rank`); msrun's scheduler
process, which runs the command too, embeds nothing.

:func:`load_feature_shards` reads a finished folder as one
:class:`~vehiclenet.embedding.features.FeatureResult` in input order: the same paths and features as
one ``embed`` of all inputs (bit-identical in the tests on this 2-core CPU; they allow 1e-6,
as chunks run in other batch shapes than one call over everything).
"""
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError, UsageError
from .checks import checked_features
from ..fileio import atomic_write, open_regular, read_npz, remove_stale_temps
from ..interrupts import doing, held

if TYPE_CHECKING:
    from .result import FeatureResult
    from ..weights.choice import WeightsChoice

__all__ = ["ShardJob", "ShardPlan", "inputs_digest", "load_feature_shards", "make_job", "merge_shards", "plan_shards",
           "prepare_folder", "run_shards", "unfinished_chunks"]

LOG = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

FORMAT = "vehiclenet-feature-shards"
FORMAT_VERSION = 2  # 2: each chunk holds its job's digest
_READABLE_VERSIONS = (1, 2)  # a version-1 folder's chunks lack the digest: read (and resumed) without it
MANIFEST = "manifest.json"
_MANIFEST_MAX_BYTES = 1 << 16  # a job's manifest is ~500 bytes
_CHUNK_KEYS = ("features", "paths", "inputs", "kept", "skipped_reasons")  # and "job" (format 2)

# Where each field of the job comes from on the command line, for the message refusing another job.
_ARGUMENT_NAMES = {
    "images": "INPUT arguments",
    "inputs_sha256": "INPUT arguments: other images, names or order",
    "chunk_size": "--chunk-size",
    "weights": "--checkpoint, --seed, or the published asset",
    "flip": "--no-flip",
    "precision": "--precision",
    "image_size": "--image-size, or the weights' input size",
    "skip_bad": "--skip-bad",
    "version": "the vehiclenet version",
}


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything that shapes a folder's features; recorded in its ``manifest.json``.

    ``weights`` identifies the weights by content (``sha256:<hex>``); ``image_size`` is
    (height, width); ``version`` the vehiclenet version that embeds.
    """

    images: int
    inputs_sha256: str
    chunk_size: int
    weights: str
    flip: bool
    precision: str
    image_size: Tuple[int, int]
    skip_bad: bool
    version: str

    @property
    def chunks(self) -> int:
        """How many chunks the job has."""
        return -(-self.images // self.chunk_size)

    def chunk_range(self, index: int) -> Tuple[int, int]:
        """``[start, stop)`` of chunk ``index`` in the input list."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.images)

    def to_json(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "image_size": list(self.image_size)}

    @property
    def digest(self) -> str:
        """sha256 of the job: stored in each chunk, so a chunk of another job is never taken for one of this."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode("ascii")).hexdigest()

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ShardJob":
        """The job a manifest records; ValueError naming the first field of the wrong type or
        out of range (a manifest is a file anyone can edit: its sizes drive loops and allocations)."""
        if not isinstance(data, dict):
            raise ValueError(f"job is a {type(data).__name__}, not an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data)
        if missing:
            raise ValueError(f"job lacks {', '.join(sorted(missing))}")
        for name, ok in _JOB_FIELDS.items():
            if not ok(data[name]):
                raise ValueError(f"job field {name} is {data[name]!r}")
        job = cls(**{**{k: data[k] for k in fields}, "image_size": tuple(data["image_size"])})
        if job.chunks > MAX_CHUNKS:
            raise ValueError(f"job has {job.chunks} chunks, more than {MAX_CHUNKS}")
        return job


def _whole(low: int, high: int):
    return lambda v: type(v) is int and low <= v <= high


MAX_IMAGES = 10 ** 10
MAX_CHUNKS = 10 ** 7
_JOB_FIELDS = {
    "images": _whole(1, MAX_IMAGES),
    "inputs_sha256": lambda v: isinstance(v, str) and len(v) == 64,
    "chunk_size": _whole(1, MAX_IMAGES),
    "weights": lambda v: isinstance(v, str),
    "flip": lambda v: isinstance(v, bool),
    "precision": lambda v: v in ("fp32", "bf16"),
    "image_size": lambda v: isinstance(v, list) and len(v) == 2 and all(type(s) is int and 1 <= s <= 1 << 16 for s in v),
    "skip_bad": lambda v: isinstance(v, bool),
    "version": lambda v: isinstance(v, str),
}


def inputs_digest(paths: Sequence[str]) -> str:
    """sha256 of the input list (names and order); any str, even with undecodable bytes, hashes."""
    return hashlib.sha256(json.dumps(list(paths)).encode("ascii")).hexdigest()


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.npz"


def make_job(paths: Sequence[str], *, chunk_size: int, weights: "WeightsChoice", flip: bool = True,
             precision: str = "fp32", skip_bad: bool = False,
             image_size: Optional[Tuple[int, int]] = None) -> ShardJob:
    """The :class:`ShardJob` of embedding ``paths`` with these settings and ``weights``
    (nothing is downloaded; a checkpoint file is hashed, once per choice). ``image_size``
    replaces the weights' input size.

    Raises:
        UsageError: ``chunk_size`` below 1, or unseeded random weights (``pretrained`` off
            without a checkpoint or seed): every process would draw other ones, and chunks
            must fit together.
    """
    from .. import __version__

    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {chunk_size}")
    identity, size = weights.identity_and_input_size()
    if identity is None:
        raise UsageError("unseeded random weights differ in every process, so chunks of a resumed or parallel "
                         "job would not fit together: give a seed (--seed), a --checkpoint or the published weights")
    return ShardJob(images=len(paths), inputs_sha256=inputs_digest(paths), chunk_size=int(chunk_size),
                    weights=identity, flip=bool(flip), precision=precision,
                    image_size=tuple(size if image_size is None else image_size),
                    skip_bad=bool(skip_bad), version=__version__)


# --------------------------------------------------------------------------- the manifest


def _read_manifest(folder: Path) -> ShardJob:
    return _load_manifest(folder)[0]


def _load_manifest(folder: Path) -> Tuple[ShardJob, int]:
    """The job a folder's manifest records, and the manifest's format version."""
    path = folder / MANIFEST
    try:
        with open(open_regular(path, os.O_RDONLY, follow=True), "rb") as fh:
            raw = fh.read(_MANIFEST_MAX_BYTES + 1)
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise ValueError(f"larger than {_MANIFEST_MAX_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT or data.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(f"format {data.get('format')!r} version {data.get('format_version')!r}, "
                             f"not {FORMAT!r} version {FORMAT_VERSION}")
        return ShardJob.from_json(data["job"]), int(data["format_version"])
    except FileNotFoundError:
        raise DataError(f"{folder}: no {MANIFEST}; not a folder of feature chunks written by "
                        "`vehiclenet embed --out-dir`") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise DataError(f"{path}: unreadable manifest of feature chunks ({exc}); delete the folder and embed "
                        "again, or use another folder") from None


def prepare_folder(folder: PathLike, job: ShardJob) -> None:
    """Make ``folder`` the home of ``job``: write its manifest, or check the one there.

    Every worker calls this. The manifest is created only where none is, so of workers (or
    jobs) starting together one writes it and every other compares its job with it.

    Raises:
        UsageError: the folder holds another job's chunks (names the differing argument),
            or files but no manifest, or is not a folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {str(folder)!r} is a file, not a folder: give a folder for the chunks")
    # Listed once: a manifest another worker published meanwhile is among the entries, not a stranger.
    entries = [p.name for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if MANIFEST not in entries and entries:
        raise UsageError(f"--out-dir {str(folder)!r} holds files but no {MANIFEST}: it is not a folder of feature "
                         "chunks; give an empty or new folder")
    if MANIFEST not in entries:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "job": job.to_json()}, indent=2)
        try:
            # Created only where none is: of jobs starting together, one writes it and the others compare.
            with atomic_write(folder / MANIFEST, "w", exclusive=True) as fh:
                fh.write(text + "\n")
            return
        except FileExistsError:
            pass
    try:
        recorded = _read_manifest(folder)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    _refuse_other_job(folder, recorded, job)


def _refuse_other_job(folder: Path, recorded: ShardJob, job: ShardJob) -> None:
    differing = [f.name for f in dataclasses.fields(ShardJob) if getattr(recorded, f.name) != getattr(job, f.name)]
    if not differing:
        return
    shown = "; ".join(f"{name} {getattr(recorded, name)!r} there, {getattr(job, name)!r} now ({_ARGUMENT_NAMES[name]})"
                      for name in differing)
    raise UsageError(f"--out-dir {str(folder)!r} holds the chunks of another job ({shown}); its chunks would not "
                     "fit this job's: give another --out-dir, or delete that folder to start over")


# --------------------------------------------------------------------------- chunks


def _recorded_sha256(folder: Path, index: int) -> Optional[str]:
    """The sha256 the ``.sha256`` line of chunk ``index`` records; None when there is none
    (the chunk is unfinished). DataError for one that is there but unusable."""
    path = folder / (chunk_name(index) + ".sha256")
    if not os.path.lexists(path):
        return None
    try:
        line = _read_own_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unusable checksum line ({getattr(exc, 'strerror', None) or exc})") from None
    parts = line.split()
    if len(parts) != 2 or parts[1] != chunk_name(index) or len(parts[0]) != 64:
        raise DataError(f"{path}: not a checksum line for {chunk_name(index)} (damaged)")
    return parts[0].lower()


def _read_own_file(path: Path) -> bytes:
    """The bytes of a file of the folder, read once: a link or anything but a regular file is
    refused (NotRegularFileError), as a chunk the job wrote is neither."""
    with open(open_regular(path, os.O_RDONLY), "rb") as fh:
        return fh.read()


def _verified_chunk(folder: Path, index: int, job: ShardJob, expected: Optional[Sequence[str]],
                    legacy: bool = False) -> Dict[str, Any]:
    """The arrays of chunk ``index``, read once and checked against its recorded sha256 and
    ``job`` (and, unless None, the ``expected`` inputs). DataError saying why not."""
    path = folder / chunk_name(index)
    recorded = _recorded_sha256(folder, index)
    if recorded is None:
        raise DataError(f"{path}: no recorded sha256 (unfinished)")
    try:
        data = _read_own_file(path)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise DataError(f"{path}: sha256 {actual[:12]}... is not the recorded {recorded[:12]}... (damaged)")
    return _read_chunk(path, data, job, expected, legacy)


def _read_chunk(path: Path, data: bytes, job: ShardJob, expected: Optional[Sequence[str]],
                legacy: bool = False) -> Dict[str, Any]:
    """The arrays of a chunk file's ``data``, consistent, of ``job`` and (unless None) holding the
    ``expected`` inputs; ``inputs`` and ``paths`` as lists of str. DataError if not. In a
    ``legacy`` (format 1) folder a chunk without its job's digest is taken as before."""
    arrays = read_npz(path, _CHUNK_KEYS, "a chunk of features", "embed again with the same arguments to redo it",
                      data=data)
    if "job" not in arrays and not legacy:
        raise DataError(f"{path}: a chunk without its job's sha256 (format 1) in a format {FORMAT_VERSION} folder")
    if "job" in arrays and str(arrays["job"]) != job.digest:
        raise DataError(f"{path}: a chunk of another job (its job sha256 {str(arrays['job'])[:12]}... is not "
                        f"{job.digest[:12]}... of {MANIFEST}), copied or linked here")
    inputs = arrays["inputs"] = [str(p) for p in arrays["inputs"].tolist()]
    paths = arrays["paths"] = [str(p) for p in arrays["paths"].tolist()]
    kept = arrays["kept"].astype(bool)
    feats = arrays["features"]
    if expected is not None and inputs != list(expected):
        raise DataError(f"{path}: holds other inputs than this chunk's {len(expected)}")
    lined_up = (kept.shape == (len(inputs),) and paths == [p for p, k in zip(inputs, kept) if k]
                and feats.ndim == 2 and feats.shape[0] == len(paths)
                and len(arrays["skipped_reasons"]) == len(inputs) - len(paths))
    if not lined_up:
        raise DataError(f"{path}: features, paths and inputs do not line up")
    if paths:
        arrays["features"] = checked_features(feats, os.fspath(path))
    return arrays


def _write_chunk(folder: Path, job: ShardJob, index: int, inputs: Sequence[str], res: Any) -> None:
    """Write chunk ``index`` (a FeatureResult of ``inputs``), then its sha256 line, each atomically."""
    skipped = dict(res.skipped)
    buffer = io.BytesIO()
    np.savez(buffer, features=np.asarray(res.features, np.float32), paths=np.asarray(res.paths, dtype=str),
             inputs=np.asarray(list(inputs), dtype=str), kept=np.array([p not in skipped for p in inputs], bool),
             skipped_reasons=np.asarray([skipped[p] for p in inputs if p in skipped], dtype=str),
             job=np.asarray(job.digest))
    data = buffer.getvalue()
    name = chunk_name(index)
    with held(f"writing {name}"):  # a signal waits: the chunk and its sha256 belong together
        with atomic_write(folder / name) as fh:
            fh.write(data)
        with atomic_write(folder / (name + ".sha256"), "w") as fh:
            fh.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


# --------------------------------------------------------------------------- a worker's run


@dataclasses.dataclass
class ShardPlan:
    """What one worker does: its chunks (``rank``, ``rank + world_size``, ...), of which
    ``done`` passed verification and ``todo`` are to embed (``redo`` of them failed it, with the reason)."""

    folder: Path
    job: ShardJob
    paths: List[str]
    rank: int
    world_size: int
    done: List[int]
    todo: List[int]
    redo: Dict[int, str]

    @property
    def images_todo(self) -> int:
        return sum(b - a for a, b in map(self.job.chunk_range, self.todo))


def plan_shards(folder: PathLike, job: ShardJob, paths: Sequence[str], rank: int = 0,
                world_size: int = 1) -> ShardPlan:
    """Prepare ``folder`` for ``job`` over ``paths`` and sort this rank's chunks into done and to do.

    Raises:
        UsageError: another job's folder (see :func:`prepare_folder`), or a bad rank.
    """
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not one of 0..{world_size - 1}")
    if len(paths) != job.images or inputs_digest(paths) != job.inputs_sha256:
        raise ValueError("paths are not the job's inputs")
    folder = Path(folder)
    prepare_folder(folder, job)
    # A run killed between publishing a file and removing its temporary folder leaves that
    # folder behind a finished chunk, which no later write of that chunk would clear; only
    # dead processes' leftovers go (workers running beside this one keep theirs).
    remove_stale_temps(folder)
    legacy = _load_manifest(folder)[1] == 1
    done, todo, redo = [], [], {}
    for index in range(rank, job.chunks, world_size):
        a, b = job.chunk_range(index)
        try:
            _verified_chunk(folder, index, job, paths[a:b], legacy)
            done.append(index)
            continue
        except DataError as exc:
            problem = str(exc).replace(f"{folder / chunk_name(index)}: ", "", 1)
        todo.append(index)
        if os.path.lexists(folder / chunk_name(index)):
            redo[index] = problem
            LOG.warning("%s failed verification (%s): embedding it again", folder / chunk_name(index), problem)
    LOG.info("rank %d of %d: %d chunk(s) of %d image(s) in all, %d for this rank: %d chunks already done, "
             "verified; %d to embed", rank, world_size, job.chunks, job.images, len(done) + len(todo), len(done),
             len(todo))
    return ShardPlan(folder, job, list(paths), rank, world_size, done, todo, redo)


def run_shards(net: Any, plan: ShardPlan, *, batch_size: int = 16, progress: Optional[bool] = False,
               num_workers: Optional[int] = None) -> List[int]:
    """Embed and write the chunks ``plan`` has to do, in order; returns their indices.

    One batch shape for every chunk (the chunk size evened out over ``batch_size``, the last
    batch padded), so a graph is compiled once per worker.
    """
    from .result import FeatureResult
    from .features import batch_plan as _batch_plan, embed

    job = plan.job
    batch = _batch_plan(job.chunk_size, batch_size)
    written = []
    for index in plan.todo:
        a, b = job.chunk_range(index)
        inputs = plan.paths[a:b]
        doing(f"embedding {chunk_name(index)} ({len(written)} of {len(plan.todo)} chunks done)")
        start = time.perf_counter()
        try:
            res = embed(net, inputs, batch_size=batch, flip=job.flip, skip_bad=job.skip_bad, progress=progress,
                        num_workers=num_workers, size=job.image_size, fixed_batch=True)
        except DataError:
            if not job.skip_bad:
                raise
            res = FeatureResult(np.zeros((0, 0), np.float32), [], _reasons_all_bad(inputs, job.image_size))
        _write_chunk(plan.folder, job, index, inputs, res)
        written.append(index)
        LOG.info("embedded chunk %d (%s): %d image(s), %d skipped, %.1f s", index, chunk_name(index), len(res),
                 len(res.skipped), time.perf_counter() - start)
    return written


def _reasons_all_bad(inputs: Sequence[str], size: Tuple[int, int]) -> List[Tuple[str, str]]:
    """(path, reason) for a chunk none of whose images could be used (``embed`` raises then)."""
    from .preprocessing import load_image

    reasons = []
    for path in inputs:
        try:
            load_image(path, size)
            reasons.append((path, "unusable"))
        except DataError as exc:
            text = str(exc)
            reasons.append((path, text[len(path) + 2:] if text.startswith(f"{path}: ") else text))
    return reasons


# --------------------------------------------------------------------------- reading a folder


def unfinished_chunks(folder: PathLike) -> List[int]:
    """The chunks of ``folder``'s job not finished yet (no recorded sha256); [] when all are."""
    folder = Path(folder)
    job = _read_manifest(folder)
    return [i for i in range(job.chunks) if not os.path.lexists(folder / (chunk_name(i) + ".sha256"))]


def load_feature_shards(folder: PathLike) -> "FeatureResult":
    """Every chunk of a finished ``folder`` as one FeatureResult, in input order (``extra``
    holds ``flip``), each chunk verified against its recorded sha256 and the manifest.

    Raises:
        DataError: no manifest, chunks missing or failing verification (names them and says
            to run the same embed command again to finish or redo them).
    """
    from .result import FeatureResult

    folder = Path(folder)
    job, version = _load_manifest(folder)
    missing = unfinished_chunks(folder)
    if missing:
        shown = ", ".join(chunk_name(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{folder}: {len(missing)} of {job.chunks} chunk(s) not finished ({shown}); run the same "
                        "`vehiclenet embed --out-dir` command again to finish them")
    feats, paths, skipped, inputs = [], [], [], []
    for index in range(job.chunks):
        try:
            arrays = _verified_chunk(folder, index, job, None, version == 1)  # inputs: checked below, at once
        except DataError as exc:
            raise DataError(f"{exc}; run the same `vehiclenet embed --out-dir` command again to redo it") from None
        inputs.extend(arrays["inputs"])
        if arrays["paths"]:
            if feats and arrays["features"].shape[1] != feats[0].shape[1]:
                raise DataError(f"{folder / chunk_name(index)}: {arrays['features'].shape[1]}-d features, the "
                                f"chunks before it hold {feats[0].shape[1]}-d: not a chunk of this job; delete it "
                                "and run the same `vehiclenet embed --out-dir` command again")
            feats.append(arrays["features"])
            paths.extend(arrays["paths"])
        kept = arrays["kept"].astype(bool)
        skipped.extend(zip([p for p, k in zip(arrays["inputs"], kept) if not k],
                           [str(r) for r in arrays["skipped_reasons"].tolist()]))
    if len(inputs) != job.images or inputs_digest(inputs) != job.inputs_sha256:
        raise DataError(f"{folder}: the chunks' inputs are not the ones {MANIFEST} records; delete the folder "
                        "and embed again")
    if not feats:
        raise DataError(f"{folder}: no image of the job could be embedded (all {job.images} skipped)")
    return FeatureResult(features=np.concatenate(feats), paths=paths, skipped=skipped,
                         extra={"flip": np.asarray(job.flip), "weights": np.asarray(job.weights)})


def merge_shards(folder: PathLike, out: PathLike) -> "FeatureResult":
    """Write ``folder``'s features as one .npz at ``out`` (like ``vehiclenet embed --out``),
    atomically; returns the FeatureResult written."""
    from .result import save_features

    res = load_feature_shards(folder)
    save_features(out, res.features, res.paths, **res.extra)
    return res
