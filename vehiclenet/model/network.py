"""The VehicleNet network: ResNet-50 backbone + 512-d bottleneck head.

Parameter names and shapes match the published checkpoint exactly (all 273 are listed in
``tests/data/checkpoint_parameters.tsv``): ``model.*`` is the backbone,
``classifier.*`` the head. The published weights were trained with layer4 at
stride 2 (the reference's attempt to set stride 1 never took effect), so that is
the default; ``last_stride=1`` is an explicit, non-published variant.
"""
from typing import List, Optional, Tuple

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore.common.initializer import HeNormal, Normal, One, Zero

from .backend import BlockInferenceOps, BlockTrainOps, InferenceOps, KernelBackend, TrainOps

# Backbone BatchNorm settings of the published model (MindSpore momentum convention:
# the running statistic keeps 0.9 of itself).
BN_EPS = 1e-4
BN_MOMENTUM = 0.9
EMBEDDING_DIM = 512
BACKBONE_DIM = 2048
PUBLISHED_NUM_CLASSES = 575
PUBLISHED_LAST_STRIDE = 2  # layer4 as the published weights were trained (see the module docstring)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, pad_mode="same", has_bias=False,
        weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
    )


def _running_affine(bn: nn.BatchNorm2d):
    """``bn`` on its running statistics as ``x * scale + shift`` (per channel)."""
    scale = bn.gamma / ops.sqrt(bn.moving_variance + bn.eps)
    return scale, bn.beta - bn.moving_mean * scale


def _with_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """``conv``'s weights and ``bn``'s parameters, as the whole-backbone op takes them (it
    folds the BatchNorm in itself, as :func:`_running_affine` does)."""
    return conv.weight, bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """``conv`` followed by inference-mode ``bn`` as one convolution: its weights, the
    per-output-channel scale to multiply them by, and its bias."""
    return (conv.weight,) + _running_affine(bn)


def _bn_train(batch_norm, x, bn: nn.BatchNorm2d, eps, relu: bool, identity=None, bf16: bool = False):
    """``bn`` (plus ``identity`` if given, then a ReLU if ``relu``) on NHWC ``x`` in a network
    being trained.

    With batch statistics through the oneDNN op ``batch_norm`` (which fuses the addition and
    the ReLU), updating the running statistics exactly as MindSpore's BatchNorm2d does:
    ``bn.momentum`` is the batch's weight and the running variance takes the unbiased batch
    variance. A BatchNorm frozen with ``bn.set_train(False)`` uses its running statistics
    and leaves them alone, as in MindSpore's graph; on the bf16 activations of a ``bf16``
    network it computes in float32 (MindSpore has no CPU arithmetic on bfloat16).
    """
    if not bn.training:
        scale, shift = _running_affine(bn)
        if bf16:
            x = ops.cast(x, ms.float32)
            identity = None if identity is None else ops.cast(identity, ms.float32)
        y = x * scale + shift  # channels last: broadcasts per channel
        if identity is not None:
            y = y + identity
        y = ops.relu(y) if relu else y
        return ops.cast(y, ms.bfloat16) if bf16 else y
    if identity is None:
        outputs = batch_norm(x, bn.gamma, bn.beta, eps)
    else:
        outputs = batch_norm(x, bn.gamma, bn.beta, eps, identity)
    y, mean, var = outputs[0], ops.stop_gradient(outputs[1]), ops.stop_gradient(outputs[2])
    n = x.shape[0] * x.shape[1] * x.shape[2]
    m = bn.momentum
    y = ops.depend(y, ops.assign(bn.moving_mean, bn.moving_mean * (1 - m) + mean * m))
    return ops.depend(y, ops.assign(bn.moving_variance, bn.moving_variance * (1 - m) + var * (m * n / max(n - 1, 1))))


def _bn(channels: int, zero_gamma: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(
        channels, eps=BN_EPS, momentum=BN_MOMENTUM,
        gamma_init=Zero() if zero_gamma else One(), beta_init=Zero(),
    )


class Bottleneck(nn.Cell):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv (``conv2``).

    With ``nhwc_ops`` / ``train_ops`` (and ``bn_eps``, the BatchNorm epsilon as a (1,)
    float32 tensor) it also runs on the oneDNN kernels: see :meth:`construct_nhwc`.
    """

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int, down_sample: bool, *,
                 nhwc_ops: Optional[BlockInferenceOps] = None, train_ops: Optional[BlockTrainOps] = None,
                 bn_eps=None) -> None:
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = _conv(in_ch, mid_ch, 1)
        self.bn1 = _bn(mid_ch)
        self.conv2 = _conv(mid_ch, mid_ch, 3, stride)
        self.bn2 = _bn(mid_ch)
        self.conv3 = _conv(mid_ch, out_ch, 1)
        # gamma 0 on the last BN makes each residual block start as identity.
        self.bn3 = _bn(out_ch, zero_gamma=True)
        self.relu = nn.ReLU()
        self.down_sample = down_sample
        if down_sample:
            self.down_sample_layer = nn.SequentialCell([_conv(in_ch, out_ch, 1, stride), _bn(out_ch)])
        self.stride = stride
        self.nhwc_ops, self.train_ops, self.bn_eps = nhwc_ops, train_ops, bn_eps

    def construct(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.down_sample:
            identity = self.down_sample_layer(x)
        return self.relu(out + identity)

    def construct_nhwc(self, x):
        """Inference forward on NHWC tensors with the oneDNN kernels (see cpu_kernels.py)."""
        k = self.nhwc_ops
        out = k.conv1(x, *_folded(self.conv1, self.bn1))
        out = k.conv2(out, *_folded(self.conv2, self.bn2))
        identity = x
        if self.down_sample:
            identity = k.down_sample(x, *_folded(self.down_sample_layer[0], self.down_sample_layer[1]))
        return k.conv3_add(out, *_folded(self.conv3, self.bn3), identity)

    def backbone_parameters(self):
        """The block's convolutions as the whole-backbone op takes them: weights, gamma, beta,
        running mean and variance of conv1, conv2, conv3 and the shortcut if any."""
        weights = (_with_batch_norm(self.conv1, self.bn1) + _with_batch_norm(self.conv2, self.bn2)
                   + _with_batch_norm(self.conv3, self.bn3))
        if self.down_sample:
            weights = weights + _with_batch_norm(self.down_sample_layer[0], self.down_sample_layer[1])
        return weights

    def construct_nhwc_train(self, x):
        """Training forward on NHWC tensors with the differentiable oneDNN ops (batch statistics)."""
        t, eps = self.train_ops, self.bn_eps
        bf16 = t.fork is not None
        # x has two readers; in bf16 they get a copy each, whose backward adds their gradients.
        x, identity = t.fork(x) if bf16 else (x, x)
        out = _bn_train(t.batch_norm_relu, t.conv1(x, self.conv1.weight), self.bn1, eps, True, bf16=bf16)
        out = _bn_train(t.batch_norm_relu, t.conv2(out, self.conv2.weight), self.bn2, eps, True, bf16=bf16)
        if self.down_sample:
            down, down_bn = self.down_sample_layer[0], self.down_sample_layer[1]
            identity = _bn_train(t.batch_norm, t.down_sample(identity, down.weight), down_bn, eps, False, bf16=bf16)
        return _bn_train(t.batch_norm_add_relu, t.conv3(out, self.conv3.weight), self.bn3, eps, True, identity,
                         bf16=bf16)


class ResNet50(nn.Cell):
    """ResNet-50 backbone ([3, 4, 6, 3] bottlenecks) returning pooled (N, 2048) features.

    ``backend`` is chosen here, once: a :class:`~vehiclenet.model.backend.KernelBackend` runs
    inference and training on the oneDNN kernels (see cpu_kernels.py), None MindSpore's
    own operators. The parameters are the same either way.
    """

    def __init__(self, last_stride: int = 2, backend: Optional[KernelBackend] = None) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2 (published model: 2), got {last_stride!r}")
        self.last_stride = last_stride
        self.backend = backend
        self.bf16 = backend is not None and backend.bf16  # convolutions in bfloat16 (inference and training)
        self.nhwc_ops, self.train_ops = _kernel_ops(backend)
        self.backbone_op = None if self.nhwc_ops is None else self.nhwc_ops.backbone(last_stride)
        self.bn_eps = None if backend is None else ms.Tensor([BN_EPS], ms.float32)
        self.conv1 = _conv(3, 64, 7, 2)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        self.layer1 = self._make_layer(64, 64, 3, 1)
        self.layer2 = self._make_layer(256, 128, 4, 2)
        self.layer3 = self._make_layer(512, 256, 6, 2)
        self.layer4 = self._make_layer(1024, 512, 3, last_stride, last=True)

    def _make_layer(self, in_ch: int, mid_ch: int, blocks: int, stride: int, last: bool = False) -> nn.SequentialCell:
        """``blocks`` bottlenecks, the first with ``stride`` and the projection shortcut;
        ``last`` for layer4, whose last block hands its output to the pooling."""
        strides = [stride] + [1] * (blocks - 1)
        cells: List[Bottleneck] = []
        for i, s in enumerate(strides):
            infer = None if self.nhwc_ops is None else self.nhwc_ops.block(s, last=last and i == blocks - 1)
            train = None if self.train_ops is None else self.train_ops.block(s)
            cells.append(Bottleneck(in_ch if i == 0 else mid_ch * 4, mid_ch, s, down_sample=i == 0,
                                    nhwc_ops=infer, train_ops=train, bn_eps=self.bn_eps))
        return nn.SequentialCell(cells)

    def feature_map(self, x):
        """The (N, 2048, H/32, W/32) map before pooling (H/16 with ``last_stride=1``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def construct(self, x):
        if self.nhwc_ops is not None:
            if self.training:
                return self.construct_nhwc_train(x)
            return self.construct_nhwc(x)
        return ops.mean(self.feature_map(x), (2, 3))

    def backbone_parameters(self):
        """The 53 convolutions in network order, each as (weights, gamma, beta, running mean,
        running variance): what the whole-backbone op takes after the image and epsilon.

        The op folds each BatchNorm into its convolution itself: in the graph that would be
        four small MindSpore ops per convolution (about 0.5 % of an fp32 call at 384x384)."""
        weights = _with_batch_norm(self.conv1, self.bn1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                weights = weights + block.backbone_parameters()
        return weights

    def construct_nhwc(self, x):
        """Inference on the oneDNN kernels: the whole backbone in one op (no MindSpore between
        the 53 convolutions), pooled features out."""
        return self.backbone_op(x, self.bn_eps, *self.backbone_parameters())

    def construct_nhwc_layers(self, x):
        """The same inference, one op per convolution (what the whole-backbone op replaces)."""
        k = self.nhwc_ops
        x = k.max_pool(k.stem(ops.transpose(x, (0, 2, 3, 1)), *_folded(self.conv1, self.bn1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block.construct_nhwc(x)
        return ops.mean(x, (1, 2))

    def construct_nhwc_train(self, x):
        t = self.train_ops
        x = t.stem(ops.transpose(x, (0, 2, 3, 1)), self.conv1.weight)
        x = t.max_pool(_bn_train(t.batch_norm_relu, x, self.bn1, self.bn_eps, True, bf16=self.bf16))[0]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block.construct_nhwc_train(x)
        return ops.mean(ops.cast(x, ms.float32) if self.bf16 else x, (1, 2))


def _kernel_ops(backend: Optional[KernelBackend]) -> Tuple[Optional[InferenceOps], Optional[TrainOps]]:
    """(InferenceOps, TrainOps) over ``backend``'s library, or (None, None) for MindSpore's operators."""
    if backend is None:
        return None, None
    from .cpu_kernels import make_ops, make_train_ops

    return make_ops(backend.library, backend.precision), make_train_ops(backend.library, backend.precision)


class Head(nn.Cell):
    """Bottleneck head: Dense 2048->512, BatchNorm1d, dropout, Dense 512->num_classes.

    With ``num_classes=None`` the last Dense is absent and the head returns the
    512-d ``bn1`` output, the retrieval embedding. With ``kernel_ops`` (the backbone's
    :class:`~vehiclenet.model.backend.InferenceOps`) inference runs its layers on the oneDNN
    kernels: MindSpore's own CPU MatMul and BatchNorm would wake MindSpore's thread pool, whose
    worker then spins through the next call's backbone and takes a core from it.
    """

    def __init__(self, num_classes: Optional[int] = PUBLISHED_NUM_CLASSES, dropout: float = 0.5,
                 kernel_ops: Optional[InferenceOps] = None) -> None:
        super().__init__()
        self.dense = nn.Dense(
            BACKBONE_DIM, EMBEDDING_DIM, weight_init=HeNormal(mode="fan_out"), bias_init=Zero()
        )
        self.bn1 = nn.BatchNorm1d(EMBEDDING_DIM, gamma_init=Normal(0.02, 1.0), beta_init=Zero())
        self.dropout = nn.Dropout(p=dropout)
        self.include_top = num_classes is not None
        if self.include_top:
            self.classifier = nn.Dense(EMBEDDING_DIM, num_classes, weight_init=Normal(0.001), bias_init=Zero())
        self.kernel_ops = kernel_ops
        self.bn_eps = None if kernel_ops is None else ms.Tensor([self.bn1.eps], ms.float32)

    def construct(self, x):
        x = self.embed(x)
        if self.include_top:
            x = self.classify(self.dropout(x))
        return x

    def embed(self, x):
        """Pooled backbone features (N, 2048) -> the (N, 512) embedding: Dense, then BatchNorm1d."""
        if self.kernel_ops is not None and not self.training:
            bn = self.bn1
            return self.kernel_ops.dense_batch_norm(x, self.dense.weight, self.dense.bias, bn.gamma, bn.beta,
                                                    bn.moving_mean, bn.moving_variance, self.bn_eps)
        return self.bn1(self.dense(x))

    def classify(self, x):
        """The embedding -> logits (N, num_classes)."""
        if self.kernel_ops is not None and not self.training:
            return self.kernel_ops.dense(x, self.classifier.weight, self.classifier.bias)
        return self.classifier(x)


class VehicleNet(nn.Cell):
    """VehicleNet: ``model`` (ResNet-50) + ``classifier`` (bottleneck head).

    ``include_top=True`` returns logits (N, num_classes); ``include_top=False``
    returns the (N, 512) embedding used for retrieval. ``backend``: what the backbone
    runs on, fixed for the network's life (see :class:`ResNet50`).
    """

    def __init__(self, num_classes: int = PUBLISHED_NUM_CLASSES, include_top: bool = True,
                 last_stride: int = 2, backend: Optional[KernelBackend] = None) -> None:
        super().__init__()
        if include_top and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.model = ResNet50(last_stride, backend)
        self.classifier = Head(num_classes if include_top else None, kernel_ops=self.model.nhwc_ops)
        self.include_top = include_top
        self.num_classes = num_classes if include_top else None
        self.cached_compile = False  # create_network turns it on for CPU inference

    def __call__(self, *args, **kwargs):
        """In PyNative inference on the oneDNN kernels, the network's operators are launched
        synchronously (:func:`vehiclenet.model.device.synchronous_pynative`): the same features as
        graph mode, as fast, with no compilation."""
        if self.training or self.model.nhwc_ops is None:
            return super().__call__(*args, **kwargs)
        from .device import synchronous_pynative

        with synchronous_pynative():
            return super().__call__(*args, **kwargs)

    def compile(self, *args, **kwargs):
        """MindSpore's graph compile; the first one of an inference network built by
        create_network goes through the persistent cache (:mod:`vehiclenet.model.compile_cache`)."""
        if not self.cached_compile or self.training:
            return super().compile(*args, **kwargs)
        from .compile_cache import first_compile

        with first_compile(self, args):
            return super().compile(*args, **kwargs)

    def construct(self, x):
        return self.classifier(self.model(x))


class Embedding(nn.Cell):
    """The 512-d embedding of a VehicleNet that has a classification head, sharing its parameters.

    Lets a network being fine-tuned be evaluated for retrieval without a second copy.
    """

    def __init__(self, net: VehicleNet) -> None:
        # No prefix: MindSpore would rename the shared parameters to "net.model...", and every
        # checkpoint the training net wrote afterwards would no longer match a VehicleNet.
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net.classifier.embed(self.net.model(x))
