"""Export the VehicleNet embedding network (image -> 512-d ``bn1`` output) to MindIR or ONNX,
or a checkpoint's network weights alone (CKPT).

Example::

    from vehiclenet.model.export import export_embedding
    export_embedding("vehiclenet.mindir", checkpoint="runs/exp1/vehiclenet-e040.ckpt", image_size=384)

    import mindspore as ms, mindspore.nn as nn
    net = nn.GraphCell(ms.load("vehiclenet.mindir"))
    features = net(ms.Tensor(images))        # (1, 3, 384, 384) float32, pre-processed -> (1, 512)

The input is float32, pre-processed as in :mod:`vehiclenet.embedding.preprocessing`, of a size S
fixed at export time; features are not normalised. MindIR fixes the batch too
(``batch_size`` x 3 x S x S). ONNX takes any batch: its input ``x`` is (batch, 3, S, S)
and its output (batch, 512), as deployment tool chains expect.

``export_weights`` keeps a checkpoint's network (head included) and drops the SGD
state and position a fine-tuning checkpoint carries, a third of the size; it loads
with ``create_network(checkpoint=...)`` like the original.
"""
import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import CheckpointError, UsageError
from ..fileio import atomic_output, check_output_file
from ..interrupts import held, import_mindspore

LOG = logging.getLogger(__name__)

FORMATS = ("MINDIR", "ONNX", "CKPT")
_SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx", "CKPT": ".ckpt"}
ONNX_INPUT = "x"  # the name MindSpore gave the input before the batch axis was dynamic
ONNX_BATCH_AXIS = "batch"


def _with_suffix(out: Union[str, os.PathLike], fmt: str) -> Path:
    out = Path(out)
    return out if out.suffix.lower() == _SUFFIX[fmt] else out.with_name(out.name + _SUFFIX[fmt])


def _check_num_classes(path: str, file_classes: Optional[int], num_classes: Optional[int]) -> None:
    """``num_classes`` (when given) must be the file's head size: a check that the right file is exported."""
    if num_classes is None or file_classes == num_classes:
        return
    if file_classes is None:
        raise CheckpointError(f"{path!r} has no classification head (an embedding-only checkpoint), so "
                              f"--num-classes {num_classes} cannot be checked: leave --num-classes out")
    raise CheckpointError(f"{path!r} has a head of {file_classes} identities, not --num-classes {num_classes}: "
                          "is it the checkpoint you meant to export?")


def _output_path(out: Union[str, os.PathLike], fmt: str, checkpoint: Optional[Union[str, os.PathLike]],
                 pretrained: Union[bool, str]) -> Path:
    """The file to write (suffix added), its folder created; checked before any work is done
    (not a device or FIFO, not the checkpoint it is made from)."""
    from ..weights.choice import weights_files

    out = _with_suffix(out, fmt)
    check_output_file(out, "--out", weights_files(checkpoint, pretrained))
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def build_embedding_network(*, checkpoint: Optional[Union[str, os.PathLike]] = None, pretrained: Union[bool, str] = True,
                            num_classes: Optional[int] = None, device_target: Optional[str] = None):
    """The embedding network in inference mode, weights from ``checkpoint`` or the published file.

    ``num_classes``, when given, must be the number of identities of the checkpoint's
    head (a check that the right file is exported; the head's last layer is not part
    of the embedding network).
    """
    from .factory import create_network
    from ..weights.choice import WeightsChoice

    weights = WeightsChoice.of(checkpoint, pretrained)
    path = weights.file()  # a download stays interruptible at once
    if path is None:
        LOG.warning("exporting random weights (no checkpoint and pretrained=False)")
    with held("building the network"):
        # The exported graph must be MindSpore's own operators: custom ops name a library on this machine.
        # The choice carries the asset: its last_stride comes with it.
        net = create_network(weights=weights, include_top=False, device_target=device_target, cpu_kernels=False,
                             mode="graph")
    if net.load_report is not None:
        _check_num_classes(path, net.load_report.file_num_classes, num_classes)
    return net


def _export_onnx(net, file_name: Path, size: Tuple[int, int]) -> None:
    """Write ``file_name``.onnx for a (batch, 3, H, W) input of any batch size.

    MindSpore compiles the graph for an input whose batch is unknown, so every shape in it
    that depends on the batch (BatchNorm1d's reshapes, the output) says -1 rather than the
    batch of an example; ``dynamic_axes`` names the input's axis. ``mindspore.export``
    cannot do this: it refuses an unknown dimension for ONNX (and is deprecated for ONNX).
    """
    import mindspore.onnx

    spec = mindspore.Tensor(shape=[None, 3, *size], dtype=mindspore.float32)
    mindspore.onnx.export(net, spec, file_name=str(file_name), input_names=[ONNX_INPUT],
                          dynamic_axes={ONNX_INPUT: {0: ONNX_BATCH_AXIS}})


def export_embedding(out: Union[str, os.PathLike], *, file_format: str = "MINDIR",
                     checkpoint: Optional[Union[str, os.PathLike]] = None, pretrained: Union[bool, str] = True,
                     num_classes: Optional[int] = None, image_size: Optional[int] = None, batch_size: int = 1,
                     device_target: Optional[str] = None) -> Path:
    """Write the embedding network for a (batch_size, 3, H, W) float32 input; returns the file's path.

    (H, W) is ``image_size`` square when given, else the weights' input size
    (``net.weights_meta.input_size``: the asset's ``input_size``, 384x384 for the published model).

    ONNX files take any batch size (``batch_size`` does not apply to them); MindIR files
    exactly ``batch_size``.

    MindSpore appends the format's suffix (``.mindir`` / ``.onnx``) when ``out`` lacks
    it; the returned path is the file actually written.
    """
    fmt = file_format.upper()
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    if fmt == "CKPT":
        return export_weights(out, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes)
    if (image_size is not None and not 32 <= image_size <= 2048) or not 1 <= batch_size <= 4096:
        raise UsageError(f"image size must be from 32 to 2048 and batch size from 1 to 4096, got {image_size}, "
                         f"{batch_size}")
    out = _output_path(out, fmt, checkpoint, pretrained)
    ms = import_mindspore()  # only after the checks: a refused --out costs no MindSpore start-up

    net = build_embedding_network(checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes,
                                  device_target=device_target)
    size = (image_size, image_size) if image_size is not None else tuple(net.weights_meta.input_size)
    example = ms.Tensor(np.zeros((batch_size, 3, *size), np.float32))
    # Written under a temporary name and renamed, so an interrupted export never leaves a
    # truncated model under the name a deployment would load. MindSpore adds the suffix itself.
    # Held: an interrupt inside the export's graph compilation would dump MindSpore's analysis
    # files; taken at the end of the block, before the rename, it leaves ``out`` as it was.
    with atomic_output(out, f"model{_SUFFIX[fmt]}") as tmp:
        with held(f"exporting {out}"):
            if fmt == "ONNX":
                _export_onnx(net, tmp.with_suffix(""), size)
            else:
                ms.export(net, example, file_name=str(tmp.with_suffix("")), file_format=fmt)
        if not tmp.is_file():
            raise RuntimeError(f"mindspore.export reported success but {tmp} was not written")
    batch = ONNX_BATCH_AXIS if fmt == "ONNX" else batch_size
    LOG.info("exported %s (%s, input (%s, 3, %d, %d))", out, fmt, batch, *size)
    return out


def export_weights(out: Union[str, os.PathLike], *, checkpoint: Optional[Union[str, os.PathLike]] = None,
                   pretrained: Union[bool, str] = True, num_classes: Optional[int] = None) -> Path:
    """Write the network weights of ``checkpoint`` (or the published file) without training state.

    The file is checked to be a complete VehicleNet (with its head, or an embedding-only
    file) before anything is written; ``num_classes``, when given, must match its head. Returns the path written
    (``.ckpt`` appended when ``out`` lacks it).
    """
    out = _output_path(out, "CKPT", checkpoint, pretrained)
    ms = import_mindspore()  # only after the checks: a refused --out costs no MindSpore start-up

    from .checkpoint import load_weights, read_checkpoint
    from .factory import weights_path
    from .network import VehicleNet

    path = weights_path(checkpoint, pretrained)
    if path is None:
        raise UsageError("nothing to export: give --checkpoint, or leave pretrained on for the published weights")
    # Held: MindSpore's reader turns an interrupt into "failed to load the checkpoint" (ValueError).
    with held(f"reading {path}"):
        head = read_checkpoint(path).get("classifier.classifier.weight")
        classes = None if head is None else int(head.shape[0])
        _check_num_classes(path, classes, num_classes)
        net = VehicleNet(num_classes=classes, include_top=classes is not None)
        load_weights(net, path)  # every network entry present, with its shape, or CheckpointError
    with atomic_output(out, "weights.ckpt") as tmp:  # save_checkpoint insists on .ckpt
        with held(f"writing {out}"):  # and its writer logs "Failed to save the checkpoint file"
            ms.save_checkpoint(net, str(tmp))
    LOG.info("exported %s (network weights of %s, %s, no training state)", out, path,
             "embedding only" if classes is None else f"head of {classes} identities")
    return out
