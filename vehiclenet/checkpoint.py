"""Loading checkpoint files into a network, strictly, with a report.

A file in the published layout holds, besides the 273 network entries, the SGD
state (``accum.*``, ``stat.*``), ``learning_rate_group_*``, ``momentum`` and
``global_step``; files written by ``vehiclenet finetune`` add ``epoch_num`` /
``step_num``. Those are training state: counted, never loaded into the network.
"""
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from .errors import CheckpointError

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


def read_checkpoint(path: Union[str, os.PathLike], *, keep_training_state: bool = False) -> Dict:
    """Read a MindSpore ``.ckpt`` file into ``{name: Parameter}``.

    Training-state entries are skipped unless asked for (they triple the memory of
    a published-layout file); their names are still returned under the key
    ``"__training_state__"`` so callers can report them.
    """
    import mindspore as ms

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; give the .ckpt file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; check the path, or use "
                              "pretrained=True / `vehiclenet download` for the published weights")
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


def load_weights(net, path: Union[str, os.PathLike]) -> LoadReport:
    """Fill every parameter of ``net`` from the checkpoint at ``path``.

    Every network parameter must come from the file, with the same shape, except the
    head's last Dense when the file has another number of classes: that layer keeps
    its fresh initialisation and the report says so. Raises :class:`CheckpointError`
    naming the entries and the file otherwise.
    """
    import mindspore as ms

    params = read_checkpoint(path)
    report = LoadReport(path=str(path), training_state=params.pop("__training_state__"))
    net_params = {p.name: p for p in net.get_parameters()}
    if "classifier.classifier.weight" in params:
        report.file_num_classes = int(params["classifier.classifier.weight"].shape[0])

    missing, mismatched = [], []
    to_load = {}
    for name, param in net_params.items():
        if name not in params:
            missing.append(name)
            continue
        file_shape = tuple(params[name].shape)
        if file_shape != tuple(param.shape):
            if name in HEAD_LAST_LAYER:
                report.reinitialized.append(name)
                continue
            mismatched.append(f"{name}: file {file_shape} vs network {tuple(param.shape)}")
            continue
        to_load[name] = params[name]
    report.unused = sorted(set(params) - set(net_params))

    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} network parameters missing from the file ({_preview(missing)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_preview(mismatched, 4)})")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this VehicleNet network: " + "; ".join(problems)
            + ". Is it a VehicleNet checkpoint? Check last_stride, include_top and num_classes "
            f"(file has {report.file_num_classes} classes).")

    not_loaded, _ = ms.load_param_into_net(net, to_load, strict_load=True)
    not_loaded = [n for n in not_loaded if n not in report.reinitialized]
    if not_loaded:  # defensive: MindSpore refused entries we checked
        raise CheckpointError(f"MindSpore did not load {_preview(not_loaded)} from {str(path)!r}")
    report.loaded = sorted(to_load)
    if report.reinitialized:
        LOG.warning("the checkpoint's head has %s classes, the network %s: %s freshly initialised",
                    report.file_num_classes, tuple(net_params[HEAD_LAST_LAYER[0]].shape)[0],
                    " and ".join(report.reinitialized))
    LOG.info(report.summary())
    return report
