"""The C entry points of ``csrc/cpu_kernels.cc``: their names, from one table, and typed ctypes
bindings of those Python calls directly (the others run as MindSpore custom ops).

Every name the package uses is made by a function here from the table's parts, so a name that
the library does not export fails where it is made, naming it; the library is checked against
:data:`SYMBOLS` when it is loaded.
"""
import ctypes
import functools
from typing import Tuple

__all__ = ["SYMBOLS", "TAGS", "conv", "backbone", "train_conv", "batch_norm", "max_pool", "entry", "Bindings",
           "bindings"]

#: The precision part of a name ("" for float32).
TAGS = {"fp32": "", "bf16": "Bf16"}
CONV_OPS = ("S1", "S1Relu", "S2", "S2Relu", "AddS1Relu")
TRAIN_CONV_PASSES = ("Train", "TrainNoInputGrad", "Backward", "BackwardWeights")
BATCH_NORM_OPS = ("Train", "ReluTrain", "Backward", "ReluBackward", "AddReluTrain", "AddReluBackward")
MAX_POOL_OPS = ("VnMaxPool3x3S2", "VnMaxPoolTrain3x3S2", "VnMaxPoolBackward3x3S2", "VnMaxPoolBf16Train3x3S2",
                "VnMaxPoolBf16Backward3x3S2")
FORK_OPS = ("VnForkBf16", "VnForkBf16Backward")
HEAD_OPS = ("VnDense", "VnDenseBatchNorm")
INFO_FUNCTIONS = ("VnBackboneImplementations", "VnWeightReorders", "VnConvImplementation",
                  "VnTrainConvImplementation", "VnCpuIsa", "VnBatchNormReluWorkspaceBytes")

#: Every function of csrc/cpu_kernels.cc the package calls (a test checks it against the source).
SYMBOLS = tuple(
    [f"VnConv{tag}{op}" for tag in TAGS.values() for op in CONV_OPS]
    + ["VnConvBf16AddS1ReluToF32"]
    + [f"VnBackbone{tag}L{stride}" for tag in TAGS.values() for stride in (1, 2)]
    + [f"VnConv{op}{tag}S{stride}" for op in TRAIN_CONV_PASSES for tag in TAGS.values() for stride in (1, 2)]
    + list(MAX_POOL_OPS) + list(FORK_OPS) + list(HEAD_OPS) + list(INFO_FUNCTIONS)
    + [f"VnBatchNorm{tag}{op}" for tag in TAGS.values() for op in BATCH_NORM_OPS]
)


def entry(name: str) -> str:
    """``name`` if the library exports it, else ValueError naming it."""
    if name not in SYMBOLS:
        raise ValueError(f"{name} is not an entry point of csrc/cpu_kernels.cc (see kernel_abi.SYMBOLS)")
    return name


def conv(precision: str, op: str) -> str:
    """An inference convolution, e.g. ``conv("bf16", "S1Relu")`` -> ``VnConvBf16S1Relu``."""
    return entry(f"VnConv{TAGS[precision]}{op}")


def backbone(precision: str, last_stride: int) -> str:
    """The whole-backbone op for layer4's stride."""
    return entry(f"VnBackbone{TAGS[precision]}L{last_stride}")


def train_conv(training_pass: str, precision: str, stride: int) -> str:
    """A training convolution's pass (one of :data:`TRAIN_CONV_PASSES`)."""
    return entry(f"VnConv{training_pass}{TAGS[precision]}S{stride}")


def batch_norm(op: str, precision: str = "fp32") -> str:
    """A training batch-norm op (one of :data:`BATCH_NORM_OPS`) on activations of ``precision``."""
    return entry(f"VnBatchNorm{TAGS[precision]}{op}")


def max_pool(op: str, precision: str = "fp32") -> str:
    """A training max-pool op ("Train" or "Backward") on activations of ``precision``."""
    return entry(f"VnMaxPool{TAGS[precision]}{op}3x3S2")


class Bindings:
    """The library's informational functions, with their C types."""

    def __init__(self, library: str) -> None:
        lib = ctypes.CDLL(library)
        shape7 = [ctypes.c_int64] * 7
        self._conv_impl = _typed(lib.VnConvImplementation, shape7 + [ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
        self._train_impl = _typed(lib.VnTrainConvImplementation,
                                  shape7 + [ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
        self._backbone_impl = _typed(lib.VnBackboneImplementations,
                                     [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
        self._reorders = _typed(lib.VnWeightReorders, [], ctypes.c_int64)
        self._isa = _typed(lib.VnCpuIsa, [ctypes.c_char_p, ctypes.c_int])
        self._workspace = _typed(lib.VnBatchNormReluWorkspaceBytes, [ctypes.c_int64] * 4 + [ctypes.c_int],
                                 ctypes.c_int64)

    def conv_implementation(self, shape: Tuple[int, ...], bf16: bool) -> Tuple[bool, str]:
        """(ok, text): the oneDNN implementation of an inference convolution, or the error."""
        return _text(self._conv_impl, shape, bf16)

    def train_conv_implementation(self, shape: Tuple[int, ...], bf16: bool) -> Tuple[bool, str]:
        return _text(self._train_impl, shape, bf16)

    def backbone_implementations(self, shape: Tuple[int, ...], bf16: bool) -> Tuple[bool, str]:
        return _text(self._backbone_impl, shape, bf16)

    def weight_reorders(self) -> int:
        return int(self._reorders())

    def cpu_isa(self) -> Tuple[str, bool]:
        """oneDNN's instruction set and whether it has native bf16 arithmetic."""
        buffer = ctypes.create_string_buffer(64)
        native = self._isa(buffer, len(buffer))
        return buffer.value.decode(), bool(native)

    def batch_norm_relu_workspace_bytes(self, n: int, h: int, w: int, c: int, bf16: bool = False) -> int:
        """Bytes of the workspace oneDNN's batch-norm with fused ReLU needs (on float32 or bf16
        activations); negative: none exists."""
        return int(self._workspace(n, h, w, c, int(bool(bf16))))


@functools.lru_cache(maxsize=None)
def bindings(library: str) -> Bindings:
    """The bindings of ``library`` (one per path and process)."""
    return Bindings(library)


def _typed(function, argtypes, restype=ctypes.c_int):
    function.argtypes, function.restype = argtypes, restype
    return function


def _text(function, shape: Tuple[int, ...], bf16: bool) -> Tuple[bool, str]:
    buffer = ctypes.create_string_buffer(512)
    failed = function(*shape, int(bool(bf16)), buffer, len(buffer))
    return not failed, buffer.value.decode(errors="replace")
