"""Loading checkpoint files into a network, strictly, with a report.

A file in the published layout holds, besides the 273 network entries, the SGD
state (``accum.*``, ``stat.*``), ``learning_rate_group_*``, ``momentum`` and
``global_step``; files written by ``vehiclenet finetune`` add ``epoch_num`` /
``step_num``. Those are training state: counted, never loaded into the network.
"""
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import CheckpointError

LOG = logging.getLogger(__name__)

# The last Dense of the head: the only entries allowed to differ (fine-tuning to
# another number of identities re-initialises it).
HEAD_LAST_LAYER = ("classifier.classifier.weight", "classifier.classifier.bias")

_TRAINING_STATE = re.compile(
    r"^(accum\.|stat\.|moments\.|moment1\.|moment2\.|beta1_power|beta2_power|learning_rate|momentum$|"
    r"global_step$|epoch_num$|step_num$|current_epoch$|cur_step_num$|loss_scale|scale_sense$)"
)


def is_training_state(name: str) -> bool:
    """True for optimizer / schedule entries that are not network weights."""
    return bool(_TRAINING_STATE.match(name))


@dataclass
class LoadReport:
    """What :func:`load_weights` did with each entry of the file."""

    path: str
    loaded: List[str] = field(default_factory=list)
    training_state: List[str] = field(default_factory=list)
    reinitialized: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    file_num_classes: Optional[int] = None

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} network parameters from {self.path}"]
        if self.training_state:
            parts.append(f"skipped {len(self.training_state)} optimizer/schedule entries")
        if self.reinitialized:
            parts.append(f"re-initialised {', '.join(self.reinitialized)}")
        if self.unused:
            parts.append(f"ignored {len(self.unused)} entries the network does not have "
                         f"({_preview(self.unused)})")
        return "; ".join(parts)


def _preview(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


_DAMAGED_ADVICE = ("A published file: fetch it again with `vehiclenet download --force` (`vehiclenet verify` "
                   "checks it). A file of your own: write it again (save, fine-tune or export).")


def check_checkpoint_file(path: Union[str, os.PathLike]) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is (a link to) an existing regular file.

    Cheap (one ``stat``, no MindSpore): callers run it before building a network. A FIFO or
    device would block or never end when read, so it is refused by what it is.
    """
    from ..fileio import describe_mode

    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {name!r} does not exist; check the path, or use "
                              "pretrained=True / `vehiclenet download` for the published weights") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {name!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"checkpoint {name!r} is a folder; give the .ckpt file itself")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {name!r} is {describe_mode(mode)}, not a regular file; give the path "
                              "of a .ckpt file (vehiclenet does not read weights from pipes or devices)")


def read_checkpoint(path: Union[str, os.PathLike], *, keep_training_state: bool = False) -> Dict:
    """Read a MindSpore ``.ckpt`` file into ``{name: Parameter}``.

    Training-state entries are skipped unless asked for (they triple the memory of
    a published-layout file); their names are still returned under the key
    ``"__training_state__"`` so callers can report them.
    """
    import mindspore as ms

    check_checkpoint_file(path)
    path = Path(path)
    skipped: List[str] = []

    def choose(name: str) -> bool:
        if not keep_training_state and is_training_state(name):
            skipped.append(name)
            return False
        return True

    try:
        params = ms.load_checkpoint(str(path), choice_func=choose)
    except ValueError as exc:
        if skipped and "empty" in str(exc):  # only training state: the network check below says so
            params = {}
        else:
            raise CheckpointError(
                f"{str(path)!r} is not a readable MindSpore checkpoint ({exc}); the file may be truncated or "
                f"of another format. {_DAMAGED_ADVICE}") from exc
    except Exception as exc:  # MindSpore raises RuntimeError/TypeError for some damaged files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}. {_DAMAGED_ADVICE}") from exc
    params = dict(params)
    params["__training_state__"] = skipped
    return params


def head_classes(params: Dict) -> Optional[int]:
    """The number of identities of the classification head in :func:`read_checkpoint`'s
    entries (rows of its last Dense), or None for a file without one."""
    weight = params.get(HEAD_LAST_LAYER[0])
    return None if weight is None or len(weight.shape) != 2 else int(weight.shape[0])


def load_weights(net, path: Union[str, os.PathLike], *, params: Optional[Dict] = None) -> LoadReport:
    """Fill every parameter of ``net`` from the checkpoint at ``path``, all or nothing.

    Every network parameter must come from the file with the same shape and dtype and
    finite values, except the head's last Dense when the file has another number of
    classes: that layer keeps its fresh initialisation and the report says so. All of
    this is checked before the first parameter is assigned, so a refused file leaves
    ``net`` exactly as it was. ``params``: the file's :func:`read_checkpoint` entries, when
    the caller has read them already. Raises :class:`CheckpointError` naming the file and entries.
    """
    params = dict(read_checkpoint(path) if params is None else params)
    report = LoadReport(path=str(path), training_state=params.pop("__training_state__"))
    net_params = {p.name: p for p in net.get_parameters()}
    report.file_num_classes = head_classes(params)
    report.unused = sorted(set(params) - set(net_params))
    to_load = _checked_entries(net_params, params, report)
    _assign(net, to_load, report)
    if report.reinitialized:
        LOG.warning("the checkpoint's head has %s classes, the network %s: %s freshly initialised",
                    report.file_num_classes, tuple(net_params[HEAD_LAST_LAYER[0]].shape)[0],
                    " and ".join(report.reinitialized))
    LOG.info(report.summary())
    return report


def _checked_entries(net_params: Dict, params: Dict, report: LoadReport) -> Dict:
    """The file's entries for ``net_params``, after every check; CheckpointError listing all problems."""
    to_load, missing, shapes, dtypes = _match(net_params, params, report)
    bad_values = _non_finite(to_load)
    if missing or shapes or dtypes or bad_values:
        raise _refusal(report, missing, shapes, dtypes, bad_values)
    return to_load


def _match(net_params: Dict, params: Dict, report: LoadReport) -> Tuple[Dict, List[str], List[str], List[str]]:
    """Entries that fit by name, shape and dtype; then what is missing, of another shape or dtype.
    The head's last layer of another shape is left out and recorded as re-initialised."""
    to_load, missing, shapes, dtypes = {}, [], [], []
    for name, param in net_params.items():
        entry = params.get(name)
        if entry is None:
            missing.append(name)
        elif tuple(entry.shape) != tuple(param.shape):
            if name in HEAD_LAST_LAYER:
                report.reinitialized.append(name)
            else:
                shapes.append(f"{name}: file {tuple(entry.shape)} vs network {tuple(param.shape)}")
        elif entry.dtype != param.dtype:
            dtypes.append(f"{name}: file {entry.dtype} vs network {param.dtype}")
        else:
            to_load[name] = entry
    return to_load, missing, shapes, dtypes


def _refusal(report: LoadReport, missing: List[str], shapes: List[str], dtypes: List[str],
             bad_values: List[str]) -> CheckpointError:
    """One error naming the file, every kind of problem with its entries, and what to do."""
    problems, advice = [], []
    if missing:
        problems.append(f"{len(missing)} network parameters missing from the file ({_preview(missing)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_preview(shapes, 4)})")
    if missing or shapes:
        advice.append("Is it a VehicleNet checkpoint? Check last_stride, include_top and num_classes "
                      f"(file has {report.file_num_classes} classes).")
    if dtypes:
        problems.append(f"{len(dtypes)} entries of another dtype ({_preview(dtypes, 4)})")
        advice.append("Convert them to the network's dtype (e.g. float32) and save the file again.")
    if bad_values:
        problems.append(f"{len(bad_values)} entries with NaN or infinite values ({_preview(bad_values, 4)})")
        advice.append("The training that wrote it diverged or the file is damaged: use an earlier checkpoint. "
                      + _DAMAGED_ADVICE)
    return CheckpointError(f"checkpoint {report.path!r} does not fit this VehicleNet network: " + "; ".join(problems)
                           + ". Nothing was loaded: the network is as it was. " + " ".join(advice))


def _non_finite(entries: Dict) -> List[str]:
    """``"name: K of N values"`` for each floating-point entry holding NaN or inf."""
    import numpy as np

    found = []
    for name, value in entries.items():
        arr = value.asnumpy()
        # A float64 sum of float32 values cannot overflow, and NaN/inf make it non-finite:
        # one pass without a boolean temporary per tensor.
        if arr.dtype.kind != "f" or np.isfinite(arr.sum(dtype=np.float64)):
            continue
        found.append(f"{name}: {int(arr.size - np.count_nonzero(np.isfinite(arr)))} of {arr.size} values")
    return found


def _assign(net, to_load: Dict, report: LoadReport) -> None:
    """Copy the checked entries into ``net`` (names, shapes and dtypes already match)."""
    import mindspore as ms

    try:
        not_loaded, _ = ms.load_param_into_net(net, to_load, strict_load=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # defensive: MindSpore refused what we checked
        raise CheckpointError(f"MindSpore could not load {report.path!r}: {exc}") from None
    not_loaded = [n for n in not_loaded if n not in report.reinitialized]
    if not_loaded:
        raise CheckpointError(f"MindSpore did not load {_preview(not_loaded)} from {report.path!r}")
    report.loaded = sorted(to_load)
