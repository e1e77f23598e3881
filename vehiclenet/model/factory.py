"""``create_network``: the one entry point that builds VehicleNet and loads weights."""
import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Optional, Tuple, Union

from .backend import KernelBackend, check_precision
from .network import PUBLISHED_LAST_STRIDE, PUBLISHED_NUM_CLASSES, VehicleNet
from ..embedding.preprocessing import INPUT_SIZE

if TYPE_CHECKING:
    from ..weights.choice import WeightsChoice

LOG = logging.getLogger(__name__)

MODEL_NAMES = ("vehiclenet",)


@dataclasses.dataclass(frozen=True)
class WeightsMeta:
    """The network settings that go with a set of weights (``net.weights_meta``).

    ``num_classes`` (head size), ``last_stride`` (layer4) and ``input_size`` ((height,
    width) the feature pipeline resizes to) come from the manifest asset the weights were
    downloaded as, the published model's values where it says nothing (or for a local
    checkpoint or random weights); on a network, an explicit ``create_network`` argument
    replaces them. ``asset`` names the manifest entry (None: not a manifest asset).
    """

    num_classes: int = PUBLISHED_NUM_CLASSES
    last_stride: int = PUBLISHED_LAST_STRIDE
    input_size: Tuple[int, int] = INPUT_SIZE
    asset: Optional[str] = None


def weights_meta(checkpoint=None, pretrained: Union[bool, str] = True) -> WeightsMeta:
    """What the weights :func:`create_network` would load say about the network, from the
    manifest alone (nothing is downloaded): the ``pretrained`` asset's settings unless a
    ``checkpoint`` file is given or ``pretrained`` is off (then the published values)."""
    return _meta(_choice(checkpoint, pretrained))


def _meta(choice: "WeightsChoice") -> WeightsMeta:
    asset = choice.asset()
    if asset is None:
        return WeightsMeta()
    published = WeightsMeta()
    return WeightsMeta(
        num_classes=asset.num_classes or published.num_classes,
        last_stride=asset.last_stride or published.last_stride,
        input_size=asset.input_size or published.input_size,
        asset=asset.name,
    )


def create_network(
    name: str = "vehiclenet",
    *,
    pretrained: Union[bool, str] = True,
    num_classes: Optional[int] = None,
    include_top: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    last_stride: Optional[int] = None,
    device_target: Optional[str] = None,
    mode: Optional[str] = None,
    amp_level: Optional[str] = None,
    precision: str = "fp32",
    cpu_kernels: bool = True,
    seed: Optional[int] = None,
    weights: Optional["WeightsChoice"] = None,
):
    """Build VehicleNet and load its weights, ready for inference.

    Args:
        name: model name; only ``"vehiclenet"`` (any case).
        pretrained: ``True`` downloads (or finds in the cache), sha256-verifies and
            loads the published VeRi-776 checkpoint (the default asset of
            ``assets.json``); a string names another asset of the manifest;
            ``False`` keeps the random initialisation. The asset's ``num_classes``,
            ``last_stride`` and ``input_size`` are the defaults of the network built
            (see :class:`WeightsMeta`).
        num_classes: identities of the classification head; ``None``: the weights file's
            (a checkpoint of 120 identities gives a 120-class head), else the asset's, else
            575 (the published head). Another value than the file's keeps its backbone and
            bottleneck and freshly initialises the last Dense (logged).
        include_top: ``True`` returns logits (N, num_classes); ``False`` returns the
            512-d retrieval embedding (the head's ``bn1`` output).
        checkpoint: a local ``.ckpt`` to load instead; wins over ``pretrained`` and
            downloads nothing.
        last_stride: stride of layer4; ``None``: the asset's, else 2, as the published
            weights were trained (2048x12x12 maps at 384x384). 1 is an explicit,
            non-published variant.
        device_target: "Ascend", "GPU" or "CPU"; ``None`` keeps a device the process
            already set, else picks Ascend, then GPU, then CPU.
        mode: MindSpore's execution mode. ``None`` (default) keeps the process's mode
            (MindSpore's own default is PyNative); ``"graph"`` compiles the network once
            and is the fast choice for many images or training; ``"pynative"`` runs it
            op by op.
        amp_level: MindSpore AMP level; ``None`` means "O2" on Ascend (BatchNorm in
            float32) and "O0" elsewhere.
        precision: CPU convolution arithmetic. ``"fp32"`` (default) is the published
            model exactly; ``"bf16"`` convolves in bfloat16 with float32 accumulation on
            the oneDNN kernels (features within cosine 0.9999 of fp32, about 2x faster on
            CPUs with AVX512-BF16 or AMX). Training a bf16 network convolves in bf16 too,
            forward and backward, with bf16 activations between the ops; BatchNorm
            statistics, weights, gradients and the optimizer stay float32.
        cpu_kernels: ``False`` builds the network on MindSpore's own operators even where
            the oneDNN kernels are available (export does: its graph must not name a
            library of this machine). The choice is made here, for the network's life.
        seed: draws the random initialisation (all of it with ``pretrained=False``, a
            re-sized head otherwise) from this seed, the same in every process and whatever
            was drawn before; ``None`` (default) draws anew each time (or ``weights.seed``).
            The global random state of numpy and MindSpore is left as it was.
        weights: the weights as one :class:`~vehiclenet.weights.choice.WeightsChoice`, in place
            of ``pretrained``/``checkpoint`` (give one or the other): a choice already
            resolved (its file fetched, its identity hashed) is not resolved again.

    Returns:
        A ``mindspore.nn.Cell`` in inference mode (``set_train(False)``): BatchNorm
        uses its running statistics and dropout is off. Call ``net.set_train(True)``
        before fine-tuning. On x86-64 CPUs inference and training run through oneDNN 3
        kernels (:mod:`vehiclenet.model.cpu_kernels`; ``VEHICLENET_CPU_KERNELS=0`` turns them off).
        ``net.load_report`` is the :class:`~vehiclenet.model.checkpoint.LoadReport`
        of the weights loaded (None for random weights); ``net.weights_meta`` the
        :class:`WeightsMeta` it was built with (its ``input_size`` is what
        :func:`vehiclenet.embedding.features.embed` resizes to).

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
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32):
        raise ValueError(f"seed must be None or an int in [0, 2**32), got {seed!r}")
    choice = _weights_choice(weights, checkpoint, pretrained, seed)
    seed = choice.seed
    target = device_mod.configure(device_target, mode)
    amp_level = amp_level or device_mod.default_amp_level(target)
    backend = _cpu_backend(target, amp_level, precision, cpu_kernels)
    file = choice.file()
    params = _read(file)
    trained = _with_file_head(_meta(choice), params)
    meta = _resolved_meta(trained, num_classes, last_stride)
    with _initialisation_skipped(file is not None or seed is not None):
        net = VehicleNet(num_classes=meta.num_classes, include_top=include_top, last_stride=meta.last_stride,
                         backend=backend)
    report = _load(net, file, params, trained.last_stride, meta.last_stride)
    with _seeded(seed):
        net.init_parameters_data()  # what the file did not fill (a head of another size) is initialised now
    if amp_level != "O0":
        import mindspore as ms

        # O2 casts to float16 but keeps BatchNorm in float32, as the Ascend reference ran.
        net = ms.amp.auto_mixed_precision(net, amp_level)
    net.cached_compile = target == "CPU" and amp_level == "O0"  # the graph cache is tested on CPU only
    net.load_report = report
    net.weights_meta = meta
    net.set_train(False)
    return net


def _initialisation_skipped(skip: bool):
    """While building: leave the random initialisation of parameters to their first use, when
    a checkpoint will fill them anyway (drawing 273 of them costs ~0.6 s of a cold start)."""
    if not skip:
        return contextlib.nullcontext()
    from mindspore.nn.utils import no_init_parameters

    return no_init_parameters()


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """While initialising parameters: draw from ``seed``. MindSpore's initialisers take each
    parameter's seed from numpy's global generator, in the network's fixed parameter order, so
    seeding it makes the weights the same in every process; its state is restored after."""
    if seed is None:
        yield
        return
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _resolved_meta(meta: WeightsMeta, num_classes: Optional[int], last_stride: Optional[int]) -> WeightsMeta:
    """``meta`` with the caller's explicit values in place of the weights' (a head of another
    size is re-initialised and logged by load_weights)."""
    return dataclasses.replace(meta, num_classes=meta.num_classes if num_classes is None else num_classes,
                               last_stride=meta.last_stride if last_stride is None else last_stride)


def _read(weights: Optional[str]):
    """The entries of the weights file (read once: the file decides the head's size), or None."""
    if weights is None:
        return None
    from .checkpoint import read_checkpoint

    return read_checkpoint(weights)


def _with_file_head(meta: WeightsMeta, params) -> WeightsMeta:
    """``meta`` with the head size the weights file has: a checkpoint of 120 identities builds a
    120-class head unless the caller asks for another (which re-initialises it, logged)."""
    from .checkpoint import head_classes

    classes = None if params is None else head_classes(params)
    return meta if classes is None else dataclasses.replace(meta, num_classes=classes)


def _load(net, weights: Optional[str], params, trained_stride: int, last_stride: int):
    """Load ``weights`` (its entries ``params``) into ``net`` (None: keep the random
    initialisation); the LoadReport or None."""
    if weights is None:
        LOG.info("pretrained=False and no checkpoint: the network keeps its random initialisation")
        return None
    from .checkpoint import load_weights

    if last_stride != trained_stride:  # same parameters, other feature maps: loads, but is not what was trained
        LOG.warning("last_stride=%d: the weights in %s were trained with layer4 stride %d",
                    last_stride, weights, trained_stride)
    return load_weights(net, weights, params=params)


def _cpu_backend(target: str, amp_level: str, precision: str, cpu_kernels: bool) -> Optional[KernelBackend]:
    """The oneDNN kernels the network will be built on (None: MindSpore's own operators),
    after checking that ``precision`` can run here."""
    from ..errors import Bf16Unsupported
    from .cpu_kernels import check_bf16, library_path

    check_precision(precision)
    if target != "CPU" or amp_level != "O0" or not cpu_kernels:
        if precision == "bf16" and not cpu_kernels:
            raise Bf16Unsupported("precision='bf16' runs on the oneDNN CPU kernels, which cpu_kernels=False "
                                  "turns off; drop one of the two")
        if precision == "bf16":
            raise Bf16Unsupported(f"precision='bf16' is for the CPU (device {target}, amp_level {amp_level}); "
                                  f"use amp_level to lower precision on {target}")
        return None
    library = library_path()
    if precision == "bf16":
        LOG.info("bf16 inference on the oneDNN kernels (%s)", check_bf16(library))
    return None if library is None else KernelBackend(library, precision)


def weights_path(checkpoint=None, pretrained: Union[bool, str] = True) -> Optional[str]:
    """The file to load: ``checkpoint`` if given, else the verified download of the
    ``pretrained`` asset (True = the default one), else None (random weights)."""
    return _choice(checkpoint, pretrained).file()


def _choice(checkpoint, pretrained: Union[bool, str], seed: Optional[int] = None) -> "WeightsChoice":
    from ..weights.choice import WeightsChoice

    return WeightsChoice.of(checkpoint, pretrained, seed)


def _weights_choice(weights: Optional["WeightsChoice"], checkpoint, pretrained: Union[bool, str],
                    seed: Optional[int]) -> "WeightsChoice":
    """The one choice of weights ``create_network``'s arguments make (``seed`` filled in)."""
    if weights is None:
        return _choice(checkpoint, pretrained, seed)
    if checkpoint is not None or pretrained is not True:
        raise ValueError("give the weights either as weights=WeightsChoice(...) or as pretrained=/checkpoint=, "
                         "not both")
    if seed is not None and weights.seed not in (None, seed):
        raise ValueError(f"seed={seed} contradicts weights.seed={weights.seed}; give one")
    if seed is None or weights.seed == seed:
        return weights
    return dataclasses.replace(weights, seed=seed)
