"""``create_network``: the one entry point that builds VehicleNet and loads weights."""
import logging
import os
from typing import Optional, Union

from .network import PUBLISHED_NUM_CLASSES, VehicleNet

LOG = logging.getLogger(__name__)

MODEL_NAMES = ("vehiclenet",)


def create_network(
    name: str = "vehiclenet",
    *,
    pretrained: Union[bool, str] = True,
    num_classes: int = PUBLISHED_NUM_CLASSES,
    include_top: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    last_stride: int = 2,
    device_target: Optional[str] = None,
    mode: Optional[str] = None,
    amp_level: Optional[str] = None,
    precision: str = "fp32",
):
    """Build VehicleNet and load its weights, ready for inference.

    Args:
        name: model name; only ``"vehiclenet"`` (any case).
        pretrained: ``True`` downloads (or finds in the cache), sha256-verifies and
            loads the published VeRi-776 checkpoint (the default asset of
            ``assets.json``); a string names another asset of the manifest;
            ``False`` keeps the random initialisation.
        num_classes: identities of the classification head. Another value than the
            checkpoint's keeps the published backbone and bottleneck and freshly
            initialises the last Dense (logged).
        include_top: ``True`` returns logits (N, num_classes); ``False`` returns the
            512-d retrieval embedding (the head's ``bn1`` output).
        checkpoint: a local ``.ckpt`` to load instead; wins over ``pretrained`` and
            downloads nothing.
        last_stride: stride of layer4. The published weights were trained with 2
            (2048x12x12 maps at 384x384); 1 is an explicit, non-published variant.
        device_target: "Ascend", "GPU" or "CPU"; ``None`` keeps a device the process
            already set, else picks Ascend, then GPU, then CPU.
        mode: MindSpore's execution mode. ``None`` (default) keeps the process's mode
            (MindSpore's own default is PyNative); ``"graph"`` compiles the network once
            and is the fast choice for many images or training; ``"pynative"`` runs it
            op by op.
        amp_level: MindSpore AMP level; ``None`` means "O2" on Ascend (BatchNorm in
            float32) and "O0" elsewhere.
        precision: CPU inference arithmetic. ``"fp32"`` (default) is the published
            model exactly; ``"bf16"`` convolves in bfloat16 with float32 accumulation on
            the oneDNN kernels (features within cosine 0.9999 of fp32, about 2x faster on
            CPUs with AVX512-BF16 or AMX). Training a bf16 network runs in float32.

    Returns:
        A ``mindspore.nn.Cell`` in inference mode (``set_train(False)``): BatchNorm
        uses its running statistics and dropout is off. Call ``net.set_train(True)``
        before fine-tuning. On x86-64 CPUs inference and training run through oneDNN 3
        kernels (:mod:`vehiclenet.cpu_kernels`; ``VEHICLENET_CPU_KERNELS=0`` turns them off).
        ``net.load_report`` is the :class:`~vehiclenet.checkpoint.LoadReport`
        of the weights loaded (None for random weights).

    Raises:
        CheckpointError: the checkpoint is missing entries, has other shapes or is
            not a MindSpore checkpoint.
        DownloadError, ChecksumError: the published weights could not be delivered
            verified.
        Bf16Unsupported: ``precision="bf16"`` on a device, CPU or set-up without native
            bf16 convolutions (raised before any weights are read).
    """
    from . import device as device_mod

    if not isinstance(name, str) or name.lower() not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; this package provides {MODEL_NAMES}")
    if amp_level is not None and amp_level not in device_mod.AMP_LEVELS:
        raise ValueError(f"amp_level must be one of {device_mod.AMP_LEVELS} or None, got {amp_level!r}")
    target = device_mod.configure(device_target, mode)
    amp_level = amp_level or device_mod.default_amp_level(target)
    library = _cpu_library(target, amp_level, precision)

    net = VehicleNet(num_classes=num_classes, include_top=include_top, last_stride=last_stride)
    weights = weights_path(checkpoint, pretrained)
    report = None
    if weights is not None:
        from .checkpoint import load_weights

        if last_stride != 2:
            LOG.warning("last_stride=%d: the weights in %s were trained with layer4 stride 2", last_stride, weights)
        report = load_weights(net, weights)
    else:
        LOG.info("pretrained=False and no checkpoint: the network keeps its random initialisation")

    if library is not None:
        # Only before the first call compiles the graph; see cpu_kernels.py.
        net.model.use_cpu_kernels(library, precision)
    if amp_level != "O0":
        import mindspore as ms

        # O2 casts to float16 but keeps BatchNorm in float32, as the Ascend reference ran.
        net = ms.amp.auto_mixed_precision(net, amp_level)
    net.load_report = report
    net.set_train(False)
    return net


def _cpu_library(target: str, amp_level: str, precision: str) -> Optional[str]:
    """The oneDNN kernel library the network will run on (None: MindSpore's own operators),
    after checking that ``precision`` can run here."""
    from .cpu_kernels import PRECISIONS, Bf16Unsupported, check_bf16, library_path

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if target != "CPU" or amp_level != "O0":
        if precision == "bf16":
            raise Bf16Unsupported(f"precision='bf16' is for CPU inference (device {target}, amp_level {amp_level}); "
                                  f"use amp_level to lower precision on {target}")
        return None
    library = library_path()
    if precision == "bf16":
        LOG.info("bf16 inference on the oneDNN kernels (%s)", check_bf16(library))
    return library


def weights_path(checkpoint=None, pretrained: Union[bool, str] = True) -> Optional[str]:
    """The file to load: ``checkpoint`` if given, else the verified download of the
    ``pretrained`` asset (True = the default one), else None (random weights)."""
    if checkpoint is not None:
        return os.fspath(checkpoint)
    if pretrained is False or pretrained is None:
        return None
    from .download import fetch

    return os.fspath(fetch(None if pretrained is True else pretrained))
