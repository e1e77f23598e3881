"""Fine-tuning VehicleNet: the pieces a training script composes, and :func:`finetune`.

Every piece is usable alone::

    import vehiclenet
    from vehiclenet.datasets.folders import save_label_map, scan_training_data
    from vehiclenet.training import finetune as ft

    data = scan_training_data("my_vehicles/")             # ROOT/<id>/*.jpg or VeRi image_train/
    save_label_map(data, "runs/exp1")                     # runs/exp1/labels.json: id -> label
    dataset = ft.build_train_dataset(data, batch_size=24, image_size=384)
    net = vehiclenet.create_network(num_classes=data.num_classes)   # published backbone, new last layer
    lr = ft.lr_schedule(0.02, dataset.get_dataset_size(), epochs=40)
    optimizer = ft.create_optimizer(net, lr)              # head at lr, the rest at 0.1x; SGD 0.9, wd 1e-4
    step = ft.build_train_step(net, optimizer)
    saver = ft.CheckpointSaver("runs/exp1", keep_max=5)
    for epoch in range(40):
        for images, labels in dataset.create_tuple_iterator():
            loss = step(images, labels)
        saver.save(step, epoch=epoch + 1, step=optimizer.global_step.asnumpy().item())

or in one call: ``ft.finetune("my_vehicles/", "runs/exp1", epochs=40)`` (what
``vehiclenet finetune`` runs). Checkpoints hold the network, the SGD state and
``epoch_num``/``step_num``; ``create_network(checkpoint=...)`` loads them
(the head sized from the file) and :func:`resume_training` continues from them.

Data-parallel: under ``msrun`` (or any launcher that sets ``MS_WORKER_NUM`` /
``RANK_SIZE``) :func:`init_data_parallel` joins the collective group, gradients are
averaged across workers, each worker reads its shard of the data and only rank 0
writes files.
"""
import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError, DataError, ImageDecodeError, TrainingError, UsageError
from ..datasets.folders import LABELS_FILE, TrainingData, load_label_map, save_label_map, scan_training_data
from ..fileio import atomic_output, remove_stale_temps
from ..interrupts import doing, held, import_mindspore, kept

LOG = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "vehiclenet"
HEAD_PREFIX = "classifier."
BACKBONE_LR_FACTOR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
_CKPT_NAME = re.compile(r"^" + CHECKPOINT_PREFIX + r"-e(\d+)\.ckpt$")
# Temporary names of versions before the private folders: MindSpore wrote .tmp-<name>.tmp, renamed
# it to .tmp-<name>.ckpt, which was renamed to <name>; a killed run left either behind.
_OLD_TEMP_NAME = re.compile(r"^\.tmp-" + CHECKPOINT_PREFIX + r"-e\d+\.(ckpt|tmp)$")

PathLike = Union[str, os.PathLike]


class _ImageSource:
    """Random-access source for GeneratorDataset: (HWC uint8 RGB, int32 label).

    Images are decoded by :func:`vehiclenet.embedding.preprocessing.load_image`, as for evaluation: the
    same pixels (16-bit images scaled, not clipped) and the same ``VEHICLENET_MAX_PIXELS`` guard.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.failure: Optional[ImageDecodeError] = None  # the first image that could not be decoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from ..embedding.preprocessing import load_image

        path = self.paths[index]
        try:
            image = load_image(path)
        except ImageDecodeError as exc:
            # MindSpore's pipeline re-raises any error here as a RuntimeError holding only text:
            # the training loop raises this typed error instead (see _train_pipeline).
            self.failure = self.failure or ImageDecodeError(
                path, f"cannot decode training image {exc}; remove or replace it")
            raise self.failure from None
        return image, np.int32(self.labels[index])


def build_train_dataset(data: TrainingData, *, batch_size: int = 24, image_size=384, num_workers: int = 2,
                        shuffle: bool = True, augment: bool = True, rank: int = 0, group_size: int = 1,
                        seed: Optional[int] = None):
    """A batched ``mindspore.dataset`` of (image CHW float32, label int32) with the reference augmentations.

    With ``group_size > 1`` each rank reads its own shard. The last incomplete batch is
    dropped (BatchNorm needs more than one sample, and a fixed shape avoids recompiling).
    """
    return _train_pipeline(data, batch_size=batch_size, image_size=image_size, num_workers=num_workers,
                           shuffle=shuffle, augment=augment, rank=rank, group_size=group_size, seed=seed)[0]


def _train_pipeline(data: TrainingData, *, batch_size: int, image_size, num_workers: int, shuffle: bool = True,
                    augment: bool = True, rank: int = 0, group_size: int = 1, seed: Optional[int] = None):
    """:func:`build_train_dataset` and its image source, whose ``failure`` tells why the pipeline failed."""
    import mindspore.dataset as ds

    from .augment import size_pair, train_transforms
    from ..embedding.preprocessing import eval_transforms

    per_rank = len(data) // group_size
    if per_rank < batch_size:
        raise DataError(f"{data.root!r} has {len(data)} images, {per_rank} per worker: fewer than one batch of "
                        f"{batch_size}; lower --batch-size or add images")
    if seed is not None:
        ds.config.set_seed(seed)
    shard = {"num_shards": group_size, "shard_id": rank} if group_size > 1 else {}
    # One worker in this process: the pipeline uses ``source`` itself (GeneratorDataset copies
    # the pipeline but never its source), so its ``failure`` is the one the loop sees.
    source = _ImageSource(data.paths, data.labels)
    dataset = ds.GeneratorDataset(source, ["image", "label"], shuffle=shuffle,
                                  num_parallel_workers=1, python_multiprocessing=False, **shard)
    ops = train_transforms(image_size) if augment else eval_transforms(size_pair(image_size))
    dataset = dataset.map(ops, input_columns="image", num_parallel_workers=max(1, num_workers))
    return dataset.batch(batch_size, drop_remainder=True), source


# --------------------------------------------------------------------------- optimisation


def param_groups(net, lr, *, backbone_factor: float = BACKBONE_LR_FACTOR,
                 weight_decay: float = WEIGHT_DECAY) -> List[Dict]:
    """Two SGD groups: everything but the head at ``backbone_factor * lr``, the head at ``lr``.

    ``lr`` is a float or a per-step array. Group 0 is the backbone (``model.*``),
    group 1 the head (``classifier.*``), the order of the published checkpoint's
    ``learning_rate_group_0/1``.
    """
    params = net.trainable_params()
    head = [p for p in params if p.name.startswith(HEAD_PREFIX)]
    rest = [p for p in params if not p.name.startswith(HEAD_PREFIX)]
    if not head:
        raise ValueError("no head parameters (classifier.*) found: is this a VehicleNet network?")
    if isinstance(lr, (int, float)):
        low, high = float(lr) * backbone_factor, float(lr)
    else:
        high = np.asarray(lr, np.float32)
        low = (high * backbone_factor).astype(np.float32)
        low, high = low.tolist(), high.tolist()
    return [{"params": rest, "lr": low, "weight_decay": weight_decay},
            {"params": head, "lr": high, "weight_decay": weight_decay}]


def lr_schedule(base_lr: float, steps_per_epoch: int, epochs: int, *, warmup_epochs: Optional[float] = None,
                decay_epochs: Optional[Sequence[int]] = None, gamma: float = 0.1,
                warmup_start: float = 0.1) -> np.ndarray:
    """Per-step learning rate: linear warm-up from ``warmup_start * base_lr``, then step decay.

    Defaults scale with the run: warm-up ``min(5, epochs // 8)`` epochs, one decay by
    ``gamma`` at epoch ``3 * epochs // 4`` (40 epochs: warm-up 5, decay at 30; runs
    under 8 epochs have no warm-up, under 4 no decay).
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch}, {epochs}")
    if warmup_epochs is None:
        warmup_epochs = min(5, epochs // 8)
    if decay_epochs is None:
        decay_epochs = [max(1, (3 * epochs) // 4)] if epochs >= 4 else []
    total = steps_per_epoch * epochs
    step = np.arange(total, dtype=np.float64)
    epoch = step / steps_per_epoch
    lr = base_lr * gamma ** np.searchsorted(sorted(decay_epochs), epoch, side="right")
    warm = int(round(warmup_epochs * steps_per_epoch))
    if warm > 0:
        ramp = warmup_start + (1 - warmup_start) * np.minimum(step / warm, 1.0)
        lr = np.where(step < warm, lr * ramp, lr)
    return lr.astype(np.float32)


def create_optimizer(net, lr, *, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY,
                     backbone_factor: float = BACKBONE_LR_FACTOR):
    """``nn.SGD`` (momentum 0.9, weight decay 1e-4) over :func:`param_groups`."""
    import mindspore.nn as nn

    groups = param_groups(net, lr, backbone_factor=backbone_factor, weight_decay=weight_decay)
    return nn.SGD(groups, learning_rate=groups[1]["lr"], momentum=momentum, weight_decay=weight_decay)


def build_train_step(net, optimizer, precision: Optional[str] = None):
    """Softmax cross-entropy + one optimizer step, as a cell: ``loss = step(images, labels)``.

    Sets the network to training mode. Under data-parallel mode (see
    :func:`init_data_parallel`) the gradients are all-reduced and averaged. The step computes
    in the precision the network was created with (``create_network(precision="bf16")``: the
    convolutions in bf16 and bf16 activations between the ops; BatchNorm statistics, weights,
    gradients and the optimizer float32); ``precision``, if given, must be that one. On CPU
    the first step's compiled graph is kept in the compile cache (docs/caches.md): a later
    process training with the same settings loads it instead of compiling again.
    """
    import mindspore.nn as nn

    from .. import OPENMP_SPIN_SHORTENED
    from ..model.backend import check_precision
    from .step import TrainStep

    backend = getattr(getattr(net, "model", None), "backend", None)
    has = backend.precision if backend is not None else "fp32"
    if precision is not None and check_precision(precision) != has:
        raise ValueError(f"the network computes in {has}: create it with create_network(..., precision="
                         f"{precision!r}) to train in {precision}")
    on_kernels = getattr(getattr(net, "model", None), "train_ops", None) is not None
    if on_kernels and not OPENMP_SPIN_SHORTENED:
        LOG.warning("GNU OpenMP was loaded before vehiclenet could shorten its spin-wait (mindspore was imported "
                    "first): training on the oneDNN CPU kernels runs about 8 % slower. Import vehiclenet before "
                    "mindspore, or set GOMP_SPINCOUNT=10000 in the environment.")
    net.set_train(True)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = TrainStep(nn.WithLossCell(net, loss), optimizer)
    step.set_train(True)
    return step


# --------------------------------------------------------------------------- data parallel


def distributed_env() -> bool:
    """True when a launcher (msrun, mpirun, rank tables) started this process as one of several workers."""
    for key in ("MS_WORKER_NUM", "RANK_SIZE"):
        try:
            if int(os.environ.get(key, "1")) > 1:
                return True
        except ValueError:
            continue  # not a count, so no launcher set it for us
    return False


def init_data_parallel(device_target: Optional[str] = None) -> Tuple[int, int]:
    """Join the collective group and switch MindSpore to data-parallel mode with averaged gradients.

    Returns ``(rank, group_size)``. Call it before building the train step. On CPU
    MindSpore uses its "mccl" backend; under msrun nothing needs configuring.
    """
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from ..model.device import configure

    configure(device_target, mode="graph")
    init()
    rank, size = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=size)
    LOG.info("data-parallel: rank %d of %d", rank, size)
    return rank, size


# --------------------------------------------------------------------------- checkpoints


class CheckpointSaver:
    """Writes ``vehiclenet-eNNN.ckpt`` (network + SGD state + epoch/step) and keeps the newest ``keep_max``."""

    def __init__(self, out_dir: PathLike, keep_max: int = 5, *, enabled: bool = True) -> None:
        if keep_max < 1:
            raise ValueError(f"keep_max must be >= 1, got {keep_max}")
        self.out_dir = Path(out_dir)
        self.keep_max = keep_max
        self.enabled = enabled  # False on ranks other than 0

    def existing(self) -> List[Path]:
        """Checkpoints of this saver's naming in ``out_dir``, oldest epoch first."""
        if not self.out_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.out_dir.iterdir() if (m := _CKPT_NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, train_step, *, epoch: int, step: int) -> Optional[Path]:
        """Save ``train_step``'s parameters (network and optimizer) after ``epoch`` epochs / ``step`` steps."""
        ms = import_mindspore()

        if not self.enabled:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{CHECKPOINT_PREFIX}-e{epoch:03d}.ckpt"
        # Written in a private folder then renamed, so a crash never leaves a half-written file
        # under the final name, and a killed run's leftovers are known by their process id.
        with atomic_output(path) as tmp:  # tmp keeps the .ckpt suffix save_checkpoint insists on
            LOG.debug("writing %s in %s", path.name, tmp.parent)
            ms.save_checkpoint(train_step, str(tmp), append_dict={"epoch_num": int(epoch), "step_num": int(step)})
        # The file just written always stays, even when a resumed run left higher epoch numbers.
        others = [p for p in self.existing() if p != path]
        for old in others[:max(0, len(others) - (self.keep_max - 1))]:
            old.unlink()
        LOG.info("saved %s", path)
        return path


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The newest ``vehiclenet-eNNN.ckpt`` in ``out_dir``, or None."""
    found = CheckpointSaver(out_dir).existing()
    return found[-1] if found else None


def resume_training(train_step, optimizer, path: PathLike) -> Tuple[int, int]:
    """Load network weights, SGD state and the position from a fine-tuning checkpoint.

    Returns ``(epoch, step)`` it was saved at. Raises CheckpointError when the file is
    of another model (network entries missing or of other shapes, another number of
    identities) or holds no optimizer state / epoch (e.g. the published weights: use
    them with ``checkpoint=`` / ``--checkpoint`` instead).

    The learning-rate schedule stays the one ``optimizer`` was built with, so a run
    can be extended with more epochs; when its rate at the resume step differs from
    the saved run's, a warning gives both.
    """
    import mindspore as ms

    from ..model.checkpoint import load_weights, read_checkpoint

    path = os.fspath(path)
    net = train_step.network.backbone_network  # TrainOneStepCell -> WithLossCell -> VehicleNet
    params = read_checkpoint(path, keep_training_state=True)
    params.pop("__training_state__", None)
    if "epoch_num" not in params or "step_num" not in params:
        raise CheckpointError(f"{path!r} holds no epoch_num/step_num: it was not written by VehicleNet fine-tuning, "
                              "so there is nothing to resume. Start from its weights with --checkpoint instead.")
    report = load_weights(net, path)
    if report.reinitialized:
        raise CheckpointError(f"cannot resume from {path!r}: its head has {report.file_num_classes} identities, the "
                              f"training data {net.num_classes}. Resume with the data it was trained on, or start "
                              "from its weights with --checkpoint.")
    state = {}
    problems = []
    for p in optimizer.get_parameters():
        if p.name.startswith("learning_rate") or p.name == "momentum":
            # Rebuilt from the arguments of this run; given its own value so that MindSpore
            # does not warn that they were "not loaded".
            state[p.name] = ms.Parameter(p.value().copy(), name=p.name)
            continue
        if p.name not in params:
            problems.append(f"{p.name} missing")
        elif tuple(params[p.name].shape) != tuple(p.shape):
            problems.append(f"{p.name}: file {tuple(params[p.name].shape)} vs {tuple(p.shape)}")
        else:
            state[p.name] = params[p.name]
    if problems:
        shown = ", ".join(problems[:4]) + (f", ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
        raise CheckpointError(f"{path!r} does not hold this optimizer's state ({shown}); resume needs a checkpoint "
                              "written by `vehiclenet finetune`. Use --checkpoint to start from its weights.")
    not_loaded, _ = ms.load_param_into_net(optimizer, state, strict_load=True)
    if not_loaded:
        raise CheckpointError(f"MindSpore did not load {not_loaded[:4]} from {path!r}")
    epoch = int(np.asarray(params["epoch_num"].asnumpy()).reshape(-1)[0])
    step = int(np.asarray(params["step_num"].asnumpy()).reshape(-1)[0])
    _warn_if_schedule_changed(optimizer, params, path, step)
    LOG.info("resumed from %s: epoch %d, step %d", path, epoch, step)
    return epoch, step


def _lr_at(values: np.ndarray, step: int) -> float:
    values = np.asarray(values, np.float64).reshape(-1)
    return float(values[min(step, values.size - 1)])  # MindSpore holds the last rate past the end


def _warn_if_schedule_changed(optimizer, saved: Dict, path: str, step: int) -> None:
    for p in optimizer.get_parameters():
        if not p.name.startswith("learning_rate") or p.name not in saved:
            continue
        before, now = _lr_at(saved[p.name].asnumpy(), step), _lr_at(p.asnumpy(), step)
        if not np.isclose(before, now, rtol=1e-5, atol=0.0):
            LOG.warning("%s: the saved run's %s at step %d was %.6g, this run's schedule gives %.6g (--lr, --epochs "
                        "or the schedule differ); training continues with this run's schedule",
                        path, p.name, step, before, now)


# --------------------------------------------------------------------------- evaluation


def evaluate_query_gallery(net, root: PathLike, *, image_size=384, batch_size: int = 16) -> Dict[str, float]:
    """mAP / rank-1 of ``net``'s embedding on a VeRi-style query/gallery split (no re-ranking).

    ``root`` holds ``image_query/`` and ``image_test/`` (names ``VVVV_cCCC_...jpg``).
    Features as in the published protocol (``vehiclenet.embedding.features``: image + flip,
    L2-normalised). ``net`` is put in inference mode for the evaluation and back in
    training mode afterwards.
    """
    from .augment import size_pair
    from ..retrieval.exact import cosine_distance
    from ..retrieval.metrics import evaluate
    from ..datasets.veri import read_veri
    from ..embedding.features import embed
    from ..model.network import Embedding

    query, gallery = read_veri(os.fspath(root))
    size = size_pair(image_size)
    embedding = Embedding(net)
    net.set_train(False)
    try:
        qf, gf = (embed(embedding, split.paths, batch_size=batch_size, size=size, progress=False).features
                  for split in (query, gallery))
    finally:
        net.set_train(True)
    result = evaluate(cosine_distance(qf, gf), query.ids, gallery.ids, query.cams, gallery.cams)
    return {"mAP": float(result.mAP), "rank1": result.rank(1)}


# --------------------------------------------------------------------------- the loop


def note_start(resume: Optional[PathLike]) -> None:
    """Say what an interruption keeps until this run's first checkpoint (see interrupts.kept)."""
    kept(f"kept {os.fspath(resume)}: continue with --resume {os.fspath(resume)}" if resume else "no checkpoint yet")


def _held_steps(iterator):
    """The batches of ``iterator``, each fetched with signals held: an interrupt is taken between
    steps, never inside MindSpore's data pipeline code."""
    batches = iter(iterator)
    while True:
        with held():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _save(saver: "CheckpointSaver", step_cell, stats: "EpochStats", checkpoints: List[str]) -> None:
    """Save after ``stats.epoch`` with signals held, say it is kept, note the file in ``stats`` and ``checkpoints``."""
    # Held: an interrupt waits for the file to be complete.
    with held(f"saving the checkpoint of epoch {stats.epoch}"):
        path = saver.save(step_cell, epoch=stats.epoch, step=stats.step)
        if path is not None:
            kept(f"kept {path} (epoch {stats.epoch} complete): continue with --resume {path}")
    stats.checkpoint = str(path) if path else None
    if path:
        checkpoints.append(str(path))


def _remove_leftovers(out: PathLike) -> None:
    """Remove the temporary files that killed runs left in ``out`` (this run owns it now)."""
    out = Path(out)
    if not out.is_dir():
        return
    remove_stale_temps(out)
    for entry in out.iterdir():
        if _OLD_TEMP_NAME.match(entry.name) and not entry.is_dir():
            with contextlib.suppress(OSError):  # a cleanup must not stop the run
                entry.unlink()
                LOG.info("removed %s, left by an interrupted run", entry)


@dataclass
class EpochStats:
    """Figures of one epoch (images/s counts every worker's images)."""

    epoch: int
    step: int
    loss: float
    images_per_second: float
    seconds: float
    checkpoint: Optional[str] = None
    evaluation: Optional[Dict[str, float]] = None
    compile_seconds: Optional[float] = None  # first step of the run (graph compilation), not in images/s


@dataclass
class FinetuneResult:
    """What :func:`finetune` did."""

    out_dir: str
    num_classes: int
    start_epoch: int
    history: List[EpochStats]
    checkpoints: List[str]
    labels_file: Optional[str]
    rank: int = 0
    group_size: int = 1


@dataclass(frozen=True)
class FinetuneConfig:
    """How :func:`finetune` trains: the recipe, where it starts from, and how it runs.

    Starts from the published weights (``pretrained=True``, or an asset's name), a local
    ``checkpoint``, random weights (``pretrained=False``), or continues a previous run (``resume``:
    weights, SGD state, epoch and step). ``distributed=None`` turns data-parallel on when a
    launcher such as msrun started several workers. ``precision="bf16"`` runs the convolutions'
    forward and backward passes in bf16 on the oneDNN CPU kernels (float32 accumulation;
    BatchNorm, master weights, gradients and SGD in float32; checkpoints unchanged).
    """

    epochs: int = 40
    batch_size: int = 24
    lr: float = 0.02
    image_size: Union[int, Tuple[int, int]] = 384
    pretrained: Union[bool, str] = True
    checkpoint: Optional[PathLike] = None
    resume: Optional[PathLike] = None
    num_workers: int = 2
    save_every: int = 1
    keep_max: int = 5
    warmup_epochs: Optional[float] = None
    decay_epochs: Optional[Sequence[int]] = None
    eval_data: Optional[PathLike] = None
    eval_every: int = 0
    distributed: Optional[bool] = None
    max_steps_per_epoch: Optional[int] = None
    seed: Optional[int] = None
    device_target: Optional[str] = None
    precision: str = "fp32"

    def check(self) -> None:
        """UsageError naming the field (and its command-line option) of the first value that cannot work."""
        from ..model.backend import check_precision
        from .augment import size_pair

        for name in ("epochs", "batch_size", "save_every", "keep_max", "num_workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"{_option('lr')} must be a positive number, got {self.lr}")
        warmup = self.warmup_epochs
        if warmup is not None and not (math.isfinite(warmup) and 0 <= warmup <= self.epochs):
            raise UsageError(f"{_option('warmup_epochs')} must be between 0 and epochs ({self.epochs}), got {warmup}")
        bad = [e for e in self.decay_epochs or () if not 1 <= e <= self.epochs]
        if bad:
            raise UsageError(f"{_option('decay_epochs')} must lie in 1..epochs ({self.epochs}), got {bad}")
        try:
            size_pair(self.image_size)
        except ValueError as exc:
            raise UsageError(f"{exc} (--image-size)") from None
        if self.eval_every and self.eval_data is None:
            raise UsageError(f"{_option('eval_every')} needs eval_data / --eval-data")
        if self.resume is not None and self.checkpoint is not None:
            raise UsageError("resume / --resume continues a run with its own weights; drop checkpoint / --checkpoint")
        try:
            check_precision(self.precision)
        except ValueError as exc:
            raise UsageError(f"{exc} (--precision)") from None


def _option(name: str) -> str:
    return f"{name} / --{name.replace('_', '-')}"


def _check_out_dir(out: PathLike, resume: Optional[PathLike], training: TrainingData) -> None:
    """``out`` may hold checkpoints only of the run ``resume`` continues, for the same identities."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder for labels.json and the checkpoints")
    if resume is not None:
        if os.path.isdir(resume):
            newest = latest_checkpoint(resume)
            hint = f" (the newest there is {str(newest)!r})" if newest else ""
            raise CheckpointError(f"--resume {os.fspath(resume)!r} is a folder; give one of its "
                                  f"{CHECKPOINT_PREFIX}-eNNN.ckpt files{hint}")
        if not os.path.isfile(resume):
            raise CheckpointError(f"--resume file {os.fspath(resume)!r} does not exist; give a vehiclenet-eNNN.ckpt "
                                  f"written by an earlier run (see {os.fspath(out)!r})")
    existing = CheckpointSaver(out).existing()
    continuing = resume is not None and Path(resume).resolve().parent == out.resolve()
    if existing and not continuing:
        raise UsageError(f"--out {str(out)!r} already holds the checkpoints of a run ({existing[-1].name} and "
                         f"{len(existing) - 1} more): continue it with --resume {existing[-1]}, or give another --out")
    if continuing and (out / LABELS_FILE).is_file():
        before = load_label_map(out)
        if before != training.identities:
            raise DataError(f"{str(out / LABELS_FILE)!r} lists other identities than --data "
                            f"{os.fspath(training.root)!r} ({len(before)} vs {training.num_classes}): resume with "
                            "the data the run was started on")


def _check_inputs(data: PathLike, out: PathLike, resume: Optional[PathLike],
                  eval_data: Optional[PathLike]) -> TrainingData:
    """The training data, once ``data``, ``out``, ``resume`` and ``eval_data`` are known to be usable."""
    training = scan_training_data(data)
    _check_out_dir(out, resume, training)
    if eval_data is not None:
        from ..datasets.veri import read_veri

        read_veri(os.fspath(eval_data))  # a wrong --eval-data fails now, not after the first epochs
    return training


def _join_workers(distributed: Optional[bool], device_target: Optional[str]) -> Tuple[int, int]:
    """``(rank, group_size)``: ``(0, 1)`` unless data-parallel is asked for, or a launcher started several workers."""
    if distributed or (distributed is None and distributed_env()):
        return init_data_parallel(device_target)
    return 0, 1


def _prepare_dataset(training: TrainingData, *, batch_size: int, image_size, num_workers: int, rank: int,
                     group_size: int, seed: Optional[int],
                     max_steps: Optional[int]) -> Tuple[object, _ImageSource, int]:
    """The run's dataset (at most ``max_steps`` batches an epoch), its image source and its batches per epoch."""
    with held("preparing the training data"):  # MindSpore's dataset code, in Python
        dataset, source = _train_pipeline(training, batch_size=batch_size, image_size=image_size,
                                          num_workers=num_workers, rank=rank, group_size=group_size, seed=seed)
        if max_steps:
            dataset = dataset.take(max_steps)
        return dataset, source, dataset.get_dataset_size()


def _build_training(num_classes: int, *, pretrained: Union[bool, str], checkpoint: Optional[PathLike],
                    device_target: Optional[str], schedule: Callable[[], np.ndarray],
                    precision: str = "fp32") -> Tuple[object, object, object]:
    """``(net, optimizer, train step)``: the weights ``pretrained``/``checkpoint`` name, ``schedule()``'s rates."""
    from ..model.factory import create_network
    from ..weights.choice import WeightsChoice

    weights = WeightsChoice.of(checkpoint, pretrained)
    weights.file()  # a download stays interruptible; the choice remembers the verified file
    with held("building the network"):
        # The choice carries the asset: its last_stride comes with it (net.weights_meta).
        net = create_network(weights=weights, num_classes=num_classes, device_target=device_target, mode="graph",
                             precision=precision)  # training runs compiled
        optimizer = create_optimizer(net, schedule())
        return net, optimizer, build_train_step(net, optimizer)


def _resume_position(step_cell, optimizer, resume: Optional[PathLike], epochs: int) -> Tuple[int, int]:
    """``(epoch, step)`` to start from: ``resume``'s state loaded into the step, or ``(0, 0)`` without one."""
    if resume is None:
        return 0, 0
    # Held: MindSpore's reader turns an interrupt into "failed to load the checkpoint".
    with held(f"loading {os.fspath(resume)}"):
        start_epoch, global_step = resume_training(step_cell, optimizer, resume)
    if start_epoch >= epochs:
        raise CheckpointError(f"{os.fspath(resume)!r} was saved after epoch {start_epoch}; --epochs {epochs} "
                              "leaves nothing to train. Raise --epochs.")
    return start_epoch, global_step


def _take_over_out_dir(out: PathLike, training: TrainingData, keep_max: int, rank: int, group_size: int,
                       start_epoch: int) -> Tuple["CheckpointSaver", FinetuneResult]:
    """On rank 0 clear killed runs' leftovers from ``out`` and write labels.json; the saver and an empty result."""
    if rank == 0:  # this run owns ``out`` now: what killed runs left there goes
        _remove_leftovers(out)
    labels_file = save_label_map(training, out) if rank == 0 else None
    saver = CheckpointSaver(out, keep_max, enabled=rank == 0)
    result = FinetuneResult(os.fspath(out), training.num_classes, start_epoch, [], [],
                            str(labels_file) if labels_file else None, rank, group_size)
    return saver, result


def _train_epoch(step_cell, iterator, source: _ImageSource, *, epoch: int, step: int, group_size: int,
                 compile_first: bool) -> EpochStats:
    """Run epoch ``epoch`` (from 1) of ``iterator`` after ``step`` steps; its figures, loss not yet checked."""
    losses, seen, started = [], 0, time.perf_counter()
    first_step = None  # (seconds, images) at the end of the step that compiled the graph
    try:
        for images, labels in _held_steps(iterator):
            compiling = compile_first and first_step is None
            # Held: the first step compiles the graph, calling back into Python.
            with held(f"compiling the training graph (first step of epoch {epoch})" if compiling else None):
                losses.append(step_cell(images, labels))
            seen += images.shape[0]
            if compiling:
                # The run's first step includes graph compilation: keep it out of images/s.
                losses[-1].asnumpy()
                first_step = (time.perf_counter() - started, seen)
    except RuntimeError:
        if source.failure is not None:  # what the pipeline's RuntimeError stands for
            raise source.failure from None
        raise
    mean_loss = float(np.mean([float(v.asnumpy()) for v in losses]))
    seconds = time.perf_counter() - started  # after reading the losses, which waits for the last step
    timed_seconds, timed_images = seconds, seen
    if first_step is not None and seen > first_step[1]:
        timed_seconds, timed_images = seconds - first_step[0], seen - first_step[1]
    return EpochStats(epoch, step + len(losses), mean_loss, timed_images * group_size / timed_seconds, seconds,
                      compile_seconds=first_step[0] if first_step else None)


def _check_loss(stats: EpochStats, lr: float, checkpoints: List[str]) -> None:
    """TrainingError when the epoch's mean loss is not finite: the run diverged."""
    if not math.isfinite(stats.loss):
        last = checkpoints[-1] if checkpoints else None
        raise TrainingError(f"the loss became {stats.loss} in epoch {stats.epoch} (lr {lr:g}): training diverged; "
                            "lower --lr" + (f" and --resume {last}" if last else ""))


def _due(epoch: int, every: int, epochs: int) -> bool:
    """True after every ``every``-th epoch and after the last one (``every`` >= 1)."""
    return epoch % every == 0 or epoch == epochs


def finetune(data: PathLike, out: PathLike, config: Optional[FinetuneConfig] = None, *,
             on_epoch: Optional[Callable[[EpochStats], None]] = None, **options: Any) -> FinetuneResult:
    """Fine-tune VehicleNet on ``data``, writing ``labels.json`` and checkpoints into ``out``.

    ``config`` (default :class:`FinetuneConfig`'s) with any of its fields given as keywords
    (``epochs=4``) over it. Everything is checked before anything is written into ``out``;
    ``precision="bf16"`` raises :class:`~vehiclenet.errors.Bf16Unsupported` where the CPU has
    no native bf16. ``on_epoch`` is called with each epoch's :class:`EpochStats` (rank 0 only).
    """
    try:
        config = dataclasses.replace(config or FinetuneConfig(), **options)
    except TypeError:
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FinetuneConfig)})
        raise TypeError(f"finetune() got unknown option(s) {unknown}: see FinetuneConfig") from None
    config.check()
    return _run(data, out, config, on_epoch)


def _run(data: PathLike, out: PathLike, c: FinetuneConfig,
         on_epoch: Optional[Callable[[EpochStats], None]]) -> FinetuneResult:
    """:func:`finetune` with a checked config."""
    ms = import_mindspore()
    # A run that cannot start must not overwrite the labels.json or prune the checkpoints of an earlier one.
    training = _check_inputs(data, out, c.resume, c.eval_data)
    rank, size = _join_workers(c.distributed, c.device_target)
    if c.seed is not None:
        ms.set_seed(c.seed)
    note_start(c.resume)
    dataset, source, steps_per_epoch = _prepare_dataset(
        training, batch_size=c.batch_size, image_size=c.image_size, num_workers=c.num_workers, rank=rank,
        group_size=size, seed=c.seed, max_steps=c.max_steps_per_epoch)
    checkpoint, pretrained = (None, False) if c.resume else (c.checkpoint, c.pretrained)  # resumed state: every weight
    net, optimizer, step_cell = _build_training(
        training.num_classes, pretrained=pretrained, checkpoint=checkpoint, device_target=c.device_target,
        precision=c.precision,
        schedule=lambda: lr_schedule(c.lr, steps_per_epoch, c.epochs, warmup_epochs=c.warmup_epochs,
                                     decay_epochs=c.decay_epochs))
    start_epoch, global_step = _resume_position(step_cell, optimizer, c.resume, c.epochs)
    saver, result = _take_over_out_dir(out, training, c.keep_max, rank, size, start_epoch)

    with held("preparing the training data"):
        iterator = dataset.create_tuple_iterator(num_epochs=c.epochs - start_epoch)
    for epoch in range(start_epoch + 1, c.epochs + 1):
        doing(f"training epoch {epoch} of {c.epochs}")
        stats = _train_epoch(step_cell, iterator, source, epoch=epoch, step=global_step, group_size=size,
                             compile_first=epoch == start_epoch + 1)
        global_step = stats.step
        _check_loss(stats, c.lr, result.checkpoints)
        if _due(epoch, c.save_every, c.epochs):
            _save(saver, step_cell, stats, result.checkpoints)
        if c.eval_data is not None and c.eval_every and _due(epoch, c.eval_every, c.epochs) and rank == 0:
            doing(f"evaluating after epoch {epoch}")
            stats.evaluation = evaluate_query_gallery(net, c.eval_data, image_size=c.image_size)
        result.history.append(stats)
        if on_epoch is not None and rank == 0:
            on_epoch(stats)
    return result
