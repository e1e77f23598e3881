"""Faster CPU inference and training: oneDNN 3 kernels on channels-last tensors as MindSpore custom ops.

MindSpore 2.8.0's CPU Conv2D runs its bundled oneDNN 2.2 on plain NCHW tensors, which
picks im2col + GEMM. The same convolutions through oneDNN 3's brgemm kernels on NHWC
tensors take about two thirds of the time on AVX-512 machines, so on x86-64 Linux
:func:`vehiclenet.create_network` builds the backbone on ``csrc/cpu_kernels.cc`` (a
:class:`~vehiclenet.model.backend.KernelBackend`; the ops reach the cells as the typed
:class:`~vehiclenet.model.backend.InferenceOps` and :class:`~vehiclenet.model.backend.TrainOps`):

- inference (:func:`make_ops`): BatchNorm folded into the convolutions, ReLU and the
  residual addition fused; the network runs its whole backbone as one op (image in, pooled
  features out: no MindSpore dispatch, transposes or activation tensors between the 53
  convolutions, each residual added in place), the per-layer ops remaining its reference;
  fp32 3x3 stride-1 convolutions of 128+ channels as Winograd F(2x2, 3x3) over a oneDNN
  matmul; the folded weights are reordered once and reused while a fingerprint of their
  values matches (MindSpore writes new values into the same buffers);
- training (:func:`make_train_ops`): differentiable ops (convolution, BatchNorm with batch
  statistics and MindSpore's running-statistics update, max-pool) whose gradients are
  oneDNN's backward kernels. MindSpore 2.8.0 has no NHWC BatchNorm on CPU, hence BatchNorm
  here too, with the ReLU (and at the end of each block the residual addition) fused.

The Parameters, their names, checkpoints, optimizer and ``msrun`` data parallelism are
unchanged: weights and their gradients stay OIHW. ``feature_map``, export, other devices
and AMP keep the plain MindSpore graph.

The kernel library is compiled once per machine (about 3 s, with ``$CXX`` or ``c++``; GNU
OpenMP, the runtime oneDNN's wheel threads with, parallelises the Winograd transforms)
against the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels and kept in the cache
folder's ``kernels/`` (``VEHICLENET_HOME``; ``VEHICLENET_KERNEL_CACHE`` moves it alone),
loaded only from where nobody else can write and only while it matches the sha256 its build
recorded (:mod:`vehiclenet.native`, :mod:`vehiclenet.cache_trust`).
When anything is missing, the network logs why and runs MindSpore's own kernels.
``VEHICLENET_CPU_KERNELS=0`` turns the kernels off.
"""
import functools
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path
from typing import Optional, Tuple

from .. import env
from . import kernel_abi as abi
from .backend import InferenceOps, TrainOps, check_precision, check_stride
from ..errors import Bf16Unsupported

LOG = logging.getLogger(__name__)

ENV_SWITCH = env.CPU_KERNELS  # its name, for messages
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_kernels.cc"
ONEDNN_RUNTIME, ONEDNN_HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
SYMBOLS = abi.SYMBOLS  # every entry point the package calls


class KernelsUnavailable(RuntimeError):
    """Why the oneDNN kernels cannot be used here (the network then runs MindSpore's own)."""


def default_build_dir() -> Path:
    from ..native import default_build_dir as native_default

    return native_default()


def _file_of(distribution: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise KernelsUnavailable(f"the {distribution} package is not installed "
                                 f"(pip install {distribution}==2023.2.0)") from None
    for entry in files:
        if ("/" + str(entry).replace("\\", "/")).endswith(suffix):
            return Path(entry.locate()).resolve()
    raise KernelsUnavailable(f"the {distribution} package has no {suffix}; reinstall it")


def build_library(build_dir: Optional[Path] = None) -> Path:
    """Compile ``csrc/cpu_kernels.cc`` (once: the result is keyed by source, compiler and
    oneDNN) and return the shared library's path.

    Raises:
        KernelsUnavailable: not x86-64 Linux, oneDNN wheels or compiler missing, the
            compile failed, or the build folder is not writable.
    """
    from ..native import NativeBuildError, build

    args, options = _build_inputs(build_dir)
    try:
        target = build(SOURCE, "cpu_kernels", args, **options)
    except NativeBuildError as err:
        raise KernelsUnavailable(str(err)) from err
    LOG.debug("oneDNN CPU kernels: %s", target)
    return target


def built_library(build_dir: Optional[Path] = None) -> Optional[Path]:
    """The library :func:`build_library` would return if it is built already (and matches
    its recorded sha256), else None; never compiles (for ``vehiclenet info --no-device``).
    Raises KernelsUnavailable as it does."""
    from ..native import NativeBuildError, find_built

    args, options = _build_inputs(build_dir)
    try:
        return find_built(SOURCE, "cpu_kernels", args, **options)
    except NativeBuildError as err:
        raise KernelsUnavailable(str(err)) from err


def _build_inputs(build_dir: Optional[Path]) -> Tuple[list, dict]:
    """The compiler arguments and :func:`vehiclenet.native.build` options of the kernel library."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelsUnavailable(f"the oneDNN kernels are built for x86-64 Linux, not {sys.platform}/{platform.machine()}")
    library = _file_of(ONEDNN_RUNTIME, "/libdnnl.so.3")
    include = _file_of(ONEDNN_HEADERS, "/oneapi/dnnl/dnnl.hpp").parents[2]
    args = [*CXX_FLAGS, f"-I{include}", str(library), f"-Wl,-rpath,{library.parent}"]
    return args, {"key_extra": [importlib.metadata.version(ONEDNN_RUNTIME)],
                  "build_dir": Path(build_dir) if build_dir is not None else None}


@functools.lru_cache(maxsize=None)
def _library() -> Tuple[Optional[str], str]:
    if not env.cpu_kernels():
        reason = env.shown(ENV_SWITCH)
        LOG.info("%s: using MindSpore's own CPU convolutions", reason)
        return None, reason
    from ..native import NativeBuildError, load

    try:
        path = build_library()
        load(path, SYMBOLS)  # fails here, not inside a graph, if it or oneDNN cannot be loaded
    except (KernelsUnavailable, NativeBuildError) as err:
        LOG.warning("oneDNN CPU kernels unavailable, using MindSpore's own (slower) convolutions: %s", err)
        return None, str(err)
    return str(path), ""


def library_path() -> Optional[str]:
    """The kernel library for this process, built if needed; None (logged once) when the
    kernels are switched off or cannot be built here."""
    return _library()[0]


def status(build: bool = True) -> str:
    """One line for ``vehiclenet info``: the library in use, or why MindSpore's Conv2D runs.
    ``build=False`` reports without compiling: "not built yet" when the library is not there."""
    if build:
        path, reason = _library()
    else:
        path, reason = _peek()
    if path == "":
        return f"oneDNN 3, not built yet (compiled into {default_build_dir()} on first use)"
    return f"oneDNN 3 ({path})" if path else f"MindSpore's Conv2D ({reason})"


def _peek() -> Tuple[Optional[str], str]:
    """Like :func:`_library` without compiling or loading: path "" means not built yet."""
    if not env.cpu_kernels():
        return None, env.shown(ENV_SWITCH)
    try:
        path = built_library()
    except KernelsUnavailable as err:
        return None, str(err)
    return ("" if path is None else str(path)), ""


def convolution_implementation(library: str, batch: int, height: int, width: int, in_channels: int,
                               out_channels: int, kernel: int, stride: int, bf16: bool = False) -> str:
    """The oneDNN implementation that runs a convolution of this shape, e.g.
    ``brgconv:avx512_core`` (what benchmarks print to show the fast path is taken)."""
    return _checked(abi.bindings(library).conv_implementation(
        (batch, height, width, in_channels, out_channels, kernel, stride), bf16))


def train_conv_implementation(library: str, batch: int, height: int, width: int, in_channels: int,
                              out_channels: int, kernel: int, stride: int, bf16: bool = False) -> str:
    """What runs a training convolution's three passes, e.g. ``bf16: brgconv:avx512_core_amx /
    brg_fwd:avx512_core_amx+brgconv:avx512_core_amx / brgconv_bwd_w:avx512_core_amx`` (forward,
    backward to the input, backward to the weights) on bf16 activations, as a bf16 network runs
    them; ``f32: ...`` where bf16 was asked for but oneDNN has only reference code for it (that
    convolution then computes in float32 between its bf16 activations)."""
    return _checked(abi.bindings(library).train_conv_implementation(
        (batch, height, width, in_channels, out_channels, kernel, stride), bf16))


def _checked(result: Tuple[bool, str]) -> str:
    """The text an implementation-reporting entry point wrote; KernelsUnavailable with it when it failed."""
    ok, text = result
    if not ok:
        raise KernelsUnavailable(text)
    return text


def weight_reorders(library: str) -> int:
    """How many times this process reordered convolution weights into oneDNN's layout. The
    inference kernels do it once per convolution of a network, and again only when its
    weights or BatchNorm scales change (they compare a fingerprint of the values each call)."""
    return abi.bindings(library).weight_reorders()


def backbone_implementations(library: str, batch: int, height: int, width: int, last_stride: int = 2,
                             bf16: bool = False) -> str:
    """The oneDNN implementations that run the whole-backbone op for this input, counted, and the
    activations' layout, e.g. ``35 jit_1x1:avx512_core, 17 jit:avx512_core, ... (nChw16c)``."""
    return _checked(abi.bindings(library).backbone_implementations((batch, height, width, last_stride), bf16))


def cpu_isa(library: str) -> Tuple[str, bool]:
    """oneDNN's instruction set here (capped by ``DNNL_MAX_CPU_ISA``) and whether it has
    native bf16 arithmetic (AVX512-BF16, AVX512-FP16, AMX or AVX2-VNNI-2)."""
    return abi.bindings(library).cpu_isa()


def check_bf16(library: Optional[str]) -> str:
    """The ISA that bf16 inference runs on here; raises :class:`Bf16Unsupported` if none."""
    if library is None:
        reason = _library()[1]
        raise Bf16Unsupported(f"precision='bf16' runs on the oneDNN CPU kernels, which are not in use here ({reason})")
    isa, native = cpu_isa(library)
    if not native:
        raise Bf16Unsupported(
            f"precision='bf16' needs a CPU with bf16 instructions (AVX512-BF16, AMX or AVX2-VNNI-2); oneDNN's "
            f"instruction set here is {isa}, which has none, so bf16 would only be emulated (slower than fp32). "
            f"Use precision='fp32'.")
    return isa


def bf16_status(build: bool = True) -> str:
    """One line for ``vehiclenet info``: whether bf16 inference is available, on which ISA.
    ``build=False`` asks an already built library only (never compiles)."""
    library = library_path() if build else _peek()[0]
    if library == "":
        return "unknown: the oneDNN kernels are not built yet"
    try:
        return f"available ({check_bf16(library)})"
    except Bf16Unsupported as err:
        return f"unavailable: {err}"


def make_ops(library: str, precision: str = "fp32") -> InferenceOps:
    """MindSpore custom ops over ``library`` for inference, by role (see :class:`InferenceOps`).

    Convolutions take (x NHWC, weights OIHW, per-output-channel scale, bias[, residual NHWC]);
    weights, scale and bias are float32. With ``precision="bf16"`` they compute in bfloat16
    with float32 accumulation and pass bfloat16 activations to each other: the stem converts
    the float32 image itself, and the last block hands float32 to the pooling.
    """
    import mindspore as ms
    from mindspore import ops

    check_precision(precision)

    def custom(function: str, stride: int, channels_from_weights: bool, out_type=None):
        def out_shape(x, *others):
            channels = others[0][0] if channels_from_weights else x[3]
            return [x[0], -(-x[1] // stride), -(-x[2] // stride), channels]

        def out_dtype(x, *_):
            return out_type or x

        return ops.Custom(f"{library}:{function}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")

    if precision == "fp32":
        out = None  # every op keeps its input's dtype: float32 throughout
        last_add = custom(abi.conv("fp32", "AddS1Relu"), 1, True)
    else:
        out = ms.bfloat16  # bfloat16 activations between the convolutions,
        last_add = custom(abi.entry("VnConvBf16AddS1ReluToF32"), 1, True, ms.float32)  # float32 to the pooling

    def backbone(last_stride: int):
        return ops.Custom(f"{library}:{abi.backbone(precision, last_stride)}", out_shape=lambda x, *_: [x[0], 2048],
                          out_dtype=lambda x, *_: ms.float32, func_type="aot")

    return InferenceOps(
        backbone_last_stride_1=backbone(1),
        backbone_last_stride_2=backbone(2),
        dense=_aot(library, "VnDense", lambda x, w, *_: [x[0], w[0]], lambda x, *_: x),
        dense_batch_norm=_aot(library, "VnDenseBatchNorm", lambda x, w, *_: [x[0], w[0]], lambda x, *_: x),
        stem=custom(abi.conv(precision, "S2Relu"), 2, True, out),
        max_pool=custom(abi.entry("VnMaxPool3x3S2"), 2, False),
        conv_relu_s1=custom(abi.conv(precision, "S1Relu"), 1, True, out),
        conv_relu_s2=custom(abi.conv(precision, "S2Relu"), 2, True, out),
        conv_s1=custom(abi.conv(precision, "S1"), 1, True, out),
        conv_s2=custom(abi.conv(precision, "S2"), 2, True, out),
        conv_add_relu=custom(abi.conv(precision, "AddS1Relu"), 1, True, out),
        conv_add_relu_last=last_add,
    )


def _aot(library: str, function: str, out_shape, out_dtype, bprop=None):
    """The MindSpore AOT custom op running ``function`` of ``library``."""
    from mindspore import ops

    return ops.Custom(f"{library}:{abi.entry(function)}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                      bprop=bprop)


def _halved(x, stride: int) -> list:
    """N, H, W of an NHWC shape after a "same"-padded ``stride``."""
    return [x[0], -(-x[1] // stride), -(-x[2] // stride)]


def train_conv(library: str, stride: int, input_grad: bool = True, bf16: bool = False):
    """(x NHWC, weights OIHW) -> y NHWC, no bias. Its gradient is oneDNN's backward-to-input
    and backward-to-weights (OIHW, so it lands on the same Parameter as MindSpore's Conv2D
    would); with ``input_grad=False`` (the first layer, whose input is the image) the
    backward-to-input is skipped and returns zeros. With ``bf16`` all three passes compute in
    bf16 with float32 accumulation and y is bf16 (x may be float32 or bf16; dx has x's type, the
    weights and their gradient stay float32)."""
    from mindspore import dtype as mstype
    from mindspore import ops

    check_stride(stride)
    precision = "bf16" if bf16 else "fp32"
    # Both gradients in one op: it reads (and in bf16 converts) dy once.
    backward = _aot(library, abi.train_conv("Backward", precision, stride), lambda dy, w, x: [x, w],
                    lambda dy, w, x: [x, w])
    backward_weights = _aot(library, abi.train_conv("BackwardWeights", precision, stride), lambda x, dy, w: w,
                            lambda x, dy, w: w)

    def bprop(x, w, out, dout):
        dx, dw = backward(dout, w, x)
        return dx, dw

    def bprop_weights_only(x, w, out, dout):
        return ops.zeros_like(x), backward_weights(x, dout, w)

    name = abi.train_conv("Train" if input_grad else "TrainNoInputGrad", precision, stride)
    return _aot(library, name, lambda x, w: _halved(x, stride) + [w[0]],
                (lambda x, w: mstype.bfloat16) if bf16 else (lambda x, w: x), bprop if input_grad else bprop_weights_only)


def _workspace_bytes(library: str, bf16: bool):
    """(n, h, w, c) -> bytes of the workspace oneDNN's batch-norm with fused ReLU needs."""
    size_of = abi.bindings(library).batch_norm_relu_workspace_bytes

    @functools.lru_cache(maxsize=None)
    def workspace(n, h, w, c):
        size = size_of(n, h, w, c, bf16)
        if size < 0:
            raise KernelsUnavailable(f"oneDNN has no batch-norm with fused ReLU for NHWC {n}x{h}x{w}x{c}")
        return size

    return workspace


def _train_batch_norm(library: str, relu: bool, precision: str = "fp32"):
    """(x, gamma, beta, eps (1,)) -> (y, batch mean, biased batch variance); with ``relu``,
    relu(y) and also the workspace (uint8) its backward needs. x and y (and their gradients)
    in ``precision``, the rest float32."""
    from mindspore import dtype as mstype
    from mindspore import ops

    name = "Relu" if relu else ""
    workspace = _workspace_bytes(library, precision == "bf16") if relu else None

    def shapes(x, gamma, *_):
        return [x, gamma, gamma] + ([[workspace(*x)]] if relu else [])

    def dtypes(x, gamma, *_):
        return [x, gamma, gamma] + ([mstype.uint8] if relu else [])

    backward = _aot(library, abi.batch_norm(f"{name}Backward", precision),
                    lambda dy, x, mean, var, gamma, *_: [x, gamma, gamma],
                    lambda dy, x, mean, var, gamma, *_: [dy, gamma, gamma])

    def bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, out[1], out[2], gamma, eps)
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    def bprop_relu(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(dout[0], x, out[1], out[2], gamma, eps, out[3])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return _aot(library, abi.batch_norm(f"{name}Train", precision), shapes, dtypes, bprop_relu if relu else bprop)


def _train_batch_norm_add_relu(library: str, precision: str = "fp32"):
    """(x, gamma, beta, eps, identity) -> (relu(bn(x) + identity), batch mean, batch variance):
    the end of a bottleneck block."""
    from mindspore import ops

    # Its backward is the ReLU's from the output, which is also the identity's gradient.
    backward = _aot(library, abi.batch_norm("AddReluBackward", precision),
                    lambda dy, x, mean, var, gamma, eps, y: [x, gamma, gamma, x],
                    lambda dy, x, mean, var, gamma, eps, y: [dy, gamma, gamma, dy])

    def bprop(x, gamma, beta, eps, identity, out, dout):
        dx, dgamma, dbeta, didentity = backward(dout[0], x, out[1], out[2], gamma, eps, out[0])
        return dx, dgamma, dbeta, ops.zeros_like(eps), didentity

    return _aot(library, abi.batch_norm("AddReluTrain", precision), lambda x, gamma, *_: [x, gamma, gamma],
                lambda x, gamma, *_: [x, gamma, gamma], bprop)


def _train_max_pool(library: str, precision: str = "fp32"):
    """3x3, stride 2: x -> (y, uint8 positions of the maxima for the backward)."""
    from mindspore import dtype as mstype

    backward = _aot(library, abi.max_pool("Backward", precision), lambda dy, where, x: x, lambda dy, where, x: dy)

    def bprop(x, out, dout):
        return (backward(dout[0], out[1], x),)

    return _aot(library, abi.max_pool("Train", precision), lambda x: [_halved(x, 2) + [x[3]]] * 2,
                lambda x: [x, mstype.uint8], bprop)


def _fork(library: str):
    """bf16 x -> (x, x) as two tensors, for an activation two ops read: their gradients are
    summed by the op's backward (MindSpore has no CPU addition of bfloat16)."""
    backward = _aot(library, "VnForkBf16Backward", lambda da, db: da, lambda da, db: da)

    def bprop(x, out, dout):
        return (backward(dout[0], dout[1]),)

    return _aot(library, "VnForkBf16", lambda x: [x, x], lambda x: [x, x], bprop)


def make_train_ops(library: str, precision: str = "fp32") -> TrainOps:
    """Differentiable MindSpore custom ops over ``library`` for training on NHWC activations,
    by role (see :class:`TrainOps`); each op's gradient is oneDNN's backward kernel. With
    ``precision="bf16"`` the convolutions compute in bf16 (forward, backward to the input and
    to the weights, float32 accumulation) and the activations between the ops and their
    gradients are bf16 (BatchNorm's statistics, the weights and their gradients stay float32)."""
    bf16 = check_precision(precision) == "bf16"
    return TrainOps(
        stem=train_conv(library, 2, input_grad=False, bf16=bf16),
        max_pool=_train_max_pool(library, precision),
        conv_s1=train_conv(library, 1, bf16=bf16),
        conv_s2=train_conv(library, 2, bf16=bf16),
        batch_norm=_train_batch_norm(library, relu=False, precision=precision),
        batch_norm_relu=_train_batch_norm(library, relu=True, precision=precision),
        batch_norm_add_relu=_train_batch_norm_add_relu(library, precision),
        fork=_fork(library) if bf16 else None,
    )
