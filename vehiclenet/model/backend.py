"""What a network runs on, chosen when it is built, and the ops it hands each layer, by name.

:class:`KernelBackend` names the oneDNN kernel library (:mod:`vehiclenet.model.cpu_kernels`) and
the inference precision; a network built with ``backend=None`` runs MindSpore's own
operators. The backend is fixed at construction: in graph mode the first call compiles
whatever ops the cells hold, so a later switch would be silently ignored.

The ops are frozen dataclasses with one field per role rather than tuples unpacked by
position, so a block can never receive its shortcut where its 3x3 convolution belongs.
MindSpore's graph compiler reads their fields as constants (checked under
``jit_syntax_level=STRICT``). This module imports no MindSpore.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

Op = Callable[..., Any]  # a mindspore.ops.Custom over the kernel library

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_stride(stride: int) -> int:
    """``stride`` if the kernels have it (1 or 2), else ValueError."""
    if stride not in (1, 2):
        raise ValueError(f"the oneDNN kernels have strides 1 and 2, not {stride!r}")
    return stride


@dataclass(frozen=True)
class KernelBackend:
    """Run the backbone on the oneDNN kernels of ``library`` (a compiled shared library),
    convolutions in ``precision`` ("fp32" or "bf16"), for inference and for training (bf16
    training: the convolutions' three passes in bf16 and bf16 activations between the ops;
    BatchNorm statistics, weights and their gradients float32)."""

    library: str
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


@dataclass(frozen=True)
class BlockInferenceOps:
    """One bottleneck block's inference ops, BatchNorm folded in. Each takes (x NHWC,
    weights OIHW, per-output-channel scale, bias); ``conv3_add`` also the residual (NHWC)."""

    conv1: Op  # 1x1, stride 1, ReLU
    conv2: Op  # 3x3, the block's stride, ReLU
    down_sample: Op  # the projection shortcut: 1x1, the block's stride, no ReLU
    conv3_add: Op  # 1x1, stride 1, residual added before the ReLU


@dataclass(frozen=True)
class InferenceOps:
    """Inference ops over one kernel library and precision (see ``cpu_kernels.make_ops``)."""

    stem: Op  # 7x7, stride 2, ReLU; takes the float32 image
    max_pool: Op  # 3x3, stride 2
    conv_relu_s1: Op
    conv_relu_s2: Op
    conv_s1: Op  # no ReLU (projection shortcuts)
    conv_s2: Op
    conv_add_relu: Op  # stride 1, residual added before the ReLU
    conv_add_relu_last: Op  # the same for the network's last block (bf16: returns float32)
    # The whole backbone in one op, by layer4's stride: (image NCHW float32, BatchNorm epsilon
    # (1,), then the 53 convolutions' weights, gamma, beta, running mean and variance in network
    # order) -> pooled (N, 2048) float32.
    backbone_last_stride_1: Op
    backbone_last_stride_2: Op
    # The head, float32 in any precision: (x (N, K), weights (M, K), bias (M)) -> (N, M); and the
    # same followed by BatchNorm1d: (..., gamma, beta, running mean, running variance (M),
    # epsilon (1,)) -> (N, M).
    dense: Op
    dense_batch_norm: Op

    def backbone(self, last_stride: int) -> Op:
        """The whole-backbone op for ``last_stride``."""
        return self.backbone_last_stride_2 if check_stride(last_stride) == 2 else self.backbone_last_stride_1

    def block(self, stride: int, last: bool = False) -> BlockInferenceOps:
        """The ops of a block whose 3x3 convolution and shortcut have ``stride``;
        ``last`` for the network's last block."""
        two = check_stride(stride) == 2
        return BlockInferenceOps(
            conv1=self.conv_relu_s1,
            conv2=self.conv_relu_s2 if two else self.conv_relu_s1,
            down_sample=self.conv_s2 if two else self.conv_s1,
            conv3_add=self.conv_add_relu_last if last else self.conv_add_relu,
        )


@dataclass(frozen=True)
class BlockTrainOps:
    """One bottleneck block's differentiable training ops (no folding: batch statistics).
    Convolutions take (x NHWC, weights OIHW); the BatchNorms (x, gamma, beta, eps (1,)
    [, identity]) and return (y, batch mean, batch variance[, workspace])."""

    conv1: Op  # 1x1, stride 1
    conv2: Op  # 3x3, the block's stride
    down_sample: Op  # 1x1, the block's stride
    conv3: Op  # 1x1, stride 1
    batch_norm: Op
    batch_norm_relu: Op
    batch_norm_add_relu: Op  # relu(bn(x) + identity): the block's end
    fork: Optional[Op] = None  # bf16: x -> (x, x) for the block's two readers of its input


@dataclass(frozen=True)
class TrainOps:
    """Differentiable training ops over one kernel library (see ``cpu_kernels.make_train_ops``)."""

    stem: Op  # stride 2, no gradient to its input (the image)
    max_pool: Op  # 3x3, stride 2; returns (y, positions of the maxima)
    conv_s1: Op
    conv_s2: Op
    batch_norm: Op
    batch_norm_relu: Op
    batch_norm_add_relu: Op
    fork: Optional[Op] = None  # bf16 only: one activation as two tensors (see cpu_kernels._fork)

    def block(self, stride: int) -> BlockTrainOps:
        """The ops of a block whose 3x3 convolution and shortcut have ``stride``."""
        strided = self.conv_s2 if check_stride(stride) == 2 else self.conv_s1
        return BlockTrainOps(
            conv1=self.conv_s1, conv2=strided, down_sample=strided, conv3=self.conv_s1,
            batch_norm=self.batch_norm, batch_norm_relu=self.batch_norm_relu,
            batch_norm_add_relu=self.batch_norm_add_relu, fork=self.fork,
        )
