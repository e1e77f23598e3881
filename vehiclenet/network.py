"""The VehicleNet network: ResNet-50 backbone + 512-d bottleneck head.

Parameter names and shapes match the published checkpoint exactly (see
``shared/spec/checkpoint_parameters.tsv``): ``model.*`` is the backbone,
``classifier.*`` the head. The published weights were trained with layer4 at
stride 2 (the reference's attempt to set stride 1 never took effect), so that is
the default; ``last_stride=1`` is an explicit, non-published variant.
"""
from typing import Optional

import mindspore.nn as nn
import mindspore.ops as ops
from mindspore.common.initializer import HeNormal, Normal, One, Zero

# Backbone BatchNorm settings of the published model (MindSpore momentum convention:
# the running statistic keeps 0.9 of itself).
BN_EPS = 1e-4
BN_MOMENTUM = 0.9
EMBEDDING_DIM = 512
BACKBONE_DIM = 2048
PUBLISHED_NUM_CLASSES = 575


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, pad_mode="same", has_bias=False,
        weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
    )


def _running_affine(bn: nn.BatchNorm2d):
    """``bn`` on its running statistics as ``x * scale + shift`` (per channel)."""
    scale = bn.gamma / ops.sqrt(bn.moving_variance + bn.eps)
    return scale, bn.beta - bn.moving_mean * scale


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """``conv`` followed by inference-mode ``bn`` as one convolution: its weights, the
    per-output-channel scale to multiply them by, and its bias."""
    return (conv.weight,) + _running_affine(bn)


def _bn_train(batch_norm, x, bn: nn.BatchNorm2d, eps, relu: bool, identity=None):
    """``bn`` (plus ``identity`` if given, then a ReLU if ``relu``) on NHWC ``x`` in a network
    being trained.

    With batch statistics through the oneDNN op ``batch_norm`` (which fuses the addition and
    the ReLU), updating the running statistics exactly as MindSpore's BatchNorm2d does:
    ``bn.momentum`` is the batch's weight and the running variance takes the unbiased batch
    variance. A BatchNorm frozen with ``bn.set_train(False)`` uses its running statistics
    and leaves them alone, as in MindSpore's graph.
    """
    if not bn.training:
        scale, shift = _running_affine(bn)
        y = x * scale + shift  # channels last: broadcasts per channel
        if identity is not None:
            y = y + identity
        return ops.relu(y) if relu else y
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
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv (``conv2``)."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int, down_sample: bool) -> None:
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
        self.nhwc_ops = None  # set by ResNet50.use_cpu_kernels
        self.train_ops = None

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
        conv_relu, conv_s_relu, conv_s, conv_add_relu = self.nhwc_ops
        out = conv_relu(x, *_folded(self.conv1, self.bn1))
        out = conv_s_relu(out, *_folded(self.conv2, self.bn2))
        identity = x
        if self.down_sample:
            identity = conv_s(x, *_folded(self.down_sample_layer[0], self.down_sample_layer[1]))
        return conv_add_relu(out, *_folded(self.conv3, self.bn3), identity)

    def construct_nhwc_train(self, x):
        """Training forward on NHWC tensors with the differentiable oneDNN ops (batch statistics)."""
        conv, conv_s, batch_norm, batch_norm_relu, batch_norm_add_relu, eps = self.train_ops
        out = _bn_train(batch_norm_relu, conv(x, self.conv1.weight), self.bn1, eps, True)
        out = _bn_train(batch_norm_relu, conv_s(out, self.conv2.weight), self.bn2, eps, True)
        identity = x
        if self.down_sample:
            down, down_bn = self.down_sample_layer[0], self.down_sample_layer[1]
            identity = _bn_train(batch_norm, conv_s(x, down.weight), down_bn, eps, False)
        return _bn_train(batch_norm_add_relu, conv(out, self.conv3.weight), self.bn3, eps, True, identity)


class ResNet50(nn.Cell):
    """ResNet-50 backbone ([3, 4, 6, 3] bottlenecks) returning pooled (N, 2048) features."""

    def __init__(self, last_stride: int = 2) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2 (published model: 2), got {last_stride!r}")
        self.conv1 = _conv(3, 64, 7, 2)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        self.layer1 = self._make_layer(64, 64, 3, 1)
        self.layer2 = self._make_layer(256, 128, 4, 2)
        self.layer3 = self._make_layer(512, 256, 6, 2)
        self.layer4 = self._make_layer(1024, 512, 3, last_stride)
        self.nhwc_ops = None
        self.train_ops = None
        self.bf16 = False  # inference convolutions in bfloat16 (use_cpu_kernels(..., "bf16"))

    def use_cpu_kernels(self, library: Optional[str], precision: str = "fp32") -> None:
        """Run inference and training through the oneDNN kernels of ``library`` (see
        cpu_kernels.py), or MindSpore's own operators with None. With ``precision="bf16"``
        inference convolves in bf16 (training stays float32). Takes effect in graph mode
        only before the first call compiles the network."""
        blocks = [cell for _, cell in self.cells_and_names() if isinstance(cell, Bottleneck)]
        self.bf16 = False
        if library is None:
            self.nhwc_ops = self.train_ops = None
            for block in blocks:
                block.nhwc_ops = block.train_ops = None
            return
        import mindspore as ms

        from .cpu_kernels import make_ops, make_train_ops

        k, t = make_ops(library, precision), make_train_ops(library)
        self.bf16 = precision == "bf16"
        eps = ms.Tensor([BN_EPS], ms.float32)
        self.nhwc_ops = (k["stem"], k["max_pool"])
        self.train_ops = (t["conv", 2, False], t["max_pool"], t["batch_norm_relu"], eps)
        for block in blocks:
            s = block.stride
            conv_add = k["conv_add_last"] if block is blocks[-1] else k["conv_add"]
            block.nhwc_ops = (k["conv", 1, True], k["conv", s, True], k["down", s], conv_add)
            block.train_ops = (t["conv", 1, True], t["conv", s, True], t["batch_norm"], t["batch_norm_relu"],
                               t["batch_norm_add_relu"], eps)

    @staticmethod
    def _make_layer(in_ch: int, mid_ch: int, blocks: int, stride: int) -> nn.SequentialCell:
        cells = [Bottleneck(in_ch, mid_ch, stride, down_sample=True)]
        cells += [Bottleneck(mid_ch * 4, mid_ch, 1, down_sample=False) for _ in range(blocks - 1)]
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

    def construct_nhwc(self, x):
        conv_relu, max_pool = self.nhwc_ops
        x = max_pool(conv_relu(ops.transpose(x, (0, 2, 3, 1)), *_folded(self.conv1, self.bn1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block.construct_nhwc(x)
        return ops.mean(x, (1, 2))

    def construct_nhwc_train(self, x):
        conv, max_pool, batch_norm_relu, eps = self.train_ops
        x = conv(ops.transpose(x, (0, 2, 3, 1)), self.conv1.weight)
        x = max_pool(_bn_train(batch_norm_relu, x, self.bn1, eps, True))[0]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block.construct_nhwc_train(x)
        return ops.mean(x, (1, 2))


class Head(nn.Cell):
    """Bottleneck head: Dense 2048->512, BatchNorm1d, dropout, Dense 512->num_classes.

    With ``num_classes=None`` the last Dense is absent and the head returns the
    512-d ``bn1`` output, the retrieval embedding.
    """

    def __init__(self, num_classes: Optional[int] = PUBLISHED_NUM_CLASSES, dropout: float = 0.5) -> None:
        super().__init__()
        self.dense = nn.Dense(
            BACKBONE_DIM, EMBEDDING_DIM, weight_init=HeNormal(mode="fan_out"), bias_init=Zero()
        )
        self.bn1 = nn.BatchNorm1d(EMBEDDING_DIM, gamma_init=Normal(0.02, 1.0), beta_init=Zero())
        self.dropout = nn.Dropout(p=dropout)
        self.include_top = num_classes is not None
        if self.include_top:
            self.classifier = nn.Dense(EMBEDDING_DIM, num_classes, weight_init=Normal(0.001), bias_init=Zero())

    def construct(self, x):
        x = self.bn1(self.dense(x))
        if self.include_top:
            x = self.classifier(self.dropout(x))
        return x


class VehicleNet(nn.Cell):
    """VehicleNet: ``model`` (ResNet-50) + ``classifier`` (bottleneck head).

    ``include_top=True`` returns logits (N, num_classes); ``include_top=False``
    returns the (N, 512) embedding used for retrieval.
    """

    def __init__(self, num_classes: int = PUBLISHED_NUM_CLASSES, include_top: bool = True,
                 last_stride: int = 2) -> None:
        super().__init__()
        if include_top and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.model = ResNet50(last_stride)
        self.classifier = Head(num_classes if include_top else None)
        self.include_top = include_top
        self.num_classes = num_classes if include_top else None

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
        head = self.net.classifier
        return head.bn1(head.dense(self.net.model(x)))
