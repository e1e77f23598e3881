"""Where VehicleNet's time goes on this CPU: its convolutions, timed one by one, against the whole network.

    python benchmarks/conv_kernels.py [--batch-size 8] [--image-size 384] [--seconds 1.5]
                                      [--no-train] [--no-network]

Every distinct Conv2D of the real network (found by walking it once in PyNative mode, with
the input size each one sees) is timed on its own in graph mode with MindSpore's CPU
kernel: forward, and for training the backward to its input and to its weights. Added up
with each shape's multiplicity, that is what the convolutions alone cost. The forward is
also timed on the oneDNN 3 kernel that inference uses on x86-64 (vehiclenet/model/cpu_kernels.py:
NHWC, BatchNorm folded, ReLU fused), and with training, forward + backward on the
differentiable oneDNN ops that training uses. The whole network is timed in the same run, both
ways: when it runs at about the rate of its convolutions alone, nothing outside them
(BatchNorm, ReLU, additions, pooling, head, graph overhead) is worth optimising. numpy's
fp32 matrix multiply (OpenBLAS sgemm) gives the machine's practical fp32 rate.

The targets of embed_throughput.py (7 img/s at batch 8) and train_throughput.py
(2 img/s) are printed against these figures.
"""
import argparse
import collections
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Before mindspore, as `vehiclenet finetune` does: it shortens OpenMP's spin-wait (vehiclenet/__init__.py).
import vehiclenet  # noqa: E402,F401

EMBED_TARGET, TRAIN_TARGET = 7.0, 2.0


def sgemm_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """fp32 matrix-multiply rate of numpy's BLAS on this machine, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - start) / 1e9


def conv_shapes(image_size: int):
    """(in, out, kernel, stride, input H, input W) of every Conv2D in the network, in call order."""
    import mindspore as ms
    import mindspore.nn as nn

    from vehiclenet.model.network import VehicleNet

    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = VehicleNet(include_top=False)
    seen = []

    def hook(cell, inputs):
        # Hooks run in PyNative only; they see the real input each convolution gets.
        _, _, h, w = inputs[0].shape
        seen.append((cell.in_channels, cell.out_channels, cell.kernel_size[0], cell.stride[0], h, w))

    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            cell.register_forward_pre_hook(hook)
    net(ms.Tensor(np.zeros((1, 3, image_size, image_size), np.float32)))
    ms.set_context(mode=ms.GRAPH_MODE)
    return seen


def _rate(run, seconds: float) -> float:
    """Seconds per call; outputs are synchronised once per call so queued work is counted."""
    run(), run()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3:
        run()
        done += 1
    return (time.perf_counter() - start) / done


def time_onednn_conv(library: str, shape, batch: int, seconds: float) -> float:
    """Seconds per forward call of the oneDNN kernel inference uses for this shape."""
    import mindspore as ms
    import mindspore.nn as nn

    from vehiclenet.model.cpu_kernels import make_ops

    cin, cout, k, stride, h, w = shape
    op = make_ops(library).block(stride).conv2  # the 3x3 with ReLU at this stride

    class Conv(nn.Cell):
        def construct(self, x, weight, scale, bias):
            return op(x, weight, scale, bias)

    rng = np.random.default_rng(0)
    args = [ms.Tensor(rng.standard_normal(s, dtype=np.float32))
            for s in ((batch, h, w, cin), (cout, cin, k, k), (cout,), (cout,))]
    conv = Conv()
    return _rate(lambda: conv(*args).asnumpy(), seconds)


def time_onednn_train_conv(library: str, shape, batch: int, seconds: float) -> float:
    """Seconds per forward + backward (to the input, except for the stem, and to the weights)
    of the differentiable oneDNN ops that training uses for this shape."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    from vehiclenet.model.cpu_kernels import train_conv

    cin, cout, k, stride, h, w = shape
    first = cin == 3
    op = train_conv(library, stride, input_grad=not first)

    class Conv(nn.Cell):
        def construct(self, x, weight):
            return op(x, weight)

    class Grad(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.grad = Conv(), ops.GradOperation(get_all=True, sens_param=True)

        def construct(self, x, weight, sens):
            return self.grad(self.conv)(x, weight, sens)

    rng = np.random.default_rng(0)
    x, weight, sens = (ms.Tensor(rng.standard_normal(s, dtype=np.float32)) for s in (
        (batch, h, w, cin), (cout, cin, k, k), (batch, -(-h // stride), -(-w // stride), cout)))
    conv, grad = Conv(), Grad()

    def run():
        conv(x, weight).asnumpy()
        for t in grad(x, weight, sens):
            t.asnumpy()

    return _rate(run, seconds)


def time_conv(shape, batch: int, seconds: float, backward: bool):
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    cin, cout, k, stride, h, w = shape
    conv = nn.Conv2d(cin, cout, k, stride=stride, pad_mode="same", has_bias=False)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((batch, cin, h, w), dtype=np.float32))
    y = conv(x)
    fwd = _rate(lambda: conv(x).asnumpy(), seconds)
    if not backward:
        return fwd, None

    # The network never needs the gradient of the image, so the stem only gets its weight gradient.
    first = cin == 3

    class Grad(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv
            self.weights = ms.ParameterTuple(conv.trainable_params())
            self.grad = ops.GradOperation(get_all=not first, get_by_list=True, sens_param=True)

        def construct(self, inp, sens):
            return self.grad(self.conv, self.weights)(inp, sens)

    grad, sens = Grad(), ms.Tensor(rng.standard_normal(y.shape, dtype=np.float32))

    def run_grad():
        out = grad(x, sens)
        for t in out[1] if not first else out:
            t.asnumpy()
        if not first:
            out[0][0].asnumpy()

    return fwd, _rate(run_grad, seconds)


def time_network(batch: int, image_size: int, seconds: float, train: bool):
    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.training import finetune as ft

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32))
    rates = {}
    for kernels in ("onednn", "mindspore"):
        embed = create_network(pretrained=False, include_top=False, cpu_kernels=kernels == "onednn",
                               mode="graph")
        if kernels == "onednn" and embed.model.nhwc_ops is None:
            continue
        rates[kernels] = _rate(lambda: embed(x).asnumpy(), seconds)
    if not train:
        return rates, {}
    steps = {}
    y = ms.Tensor(rng.integers(0, 575, batch).astype(np.int32))
    for kernels in rates:
        net = create_network(pretrained=False, cpu_kernels=kernels == "onednn", mode="graph")
        step = ft.build_train_step(net, ft.create_optimizer(net, ft.lr_schedule(0.02, 1000, 40)))
        steps[kernels] = _rate(lambda: step(x, y).asnumpy(), 4 * seconds)
    return rates, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per convolution shape")
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--no-network", action="store_true", help="skip timing the whole network")
    args = parser.parse_args()
    train, b = not args.no_train, args.batch_size

    import mindspore as ms

    from vehiclenet.model.cpu_kernels import library_path

    library = library_path()
    peak = sgemm_gflops()
    shapes = collections.Counter(conv_shapes(args.image_size))
    print(f"mindspore {ms.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"fp32, {args.image_size}x{args.image_size}, batch {b}: {sum(shapes.values())} convolutions, "
          f"{len(shapes)} distinct shapes; OpenMP spin-wait shortened: {vehiclenet.OPENMP_SPIN_SHORTENED}")
    print(f"numpy sgemm (OpenBLAS, 2048^3): {peak:.0f} GFLOP/s")
    print(f"{'':27} | MindSpore Conv2D" + (" " * 17 if train else "") + (" | oneDNN 3 NHWC" if library else ""))
    print(f"{'in':>5} {'out':>5} k s {'input':>7} {'n':>2} | {'fwd ms':>7} {'GFLOP/s':>7}"
          + (f" | {'bwd ms':>7} {'GFLOP/s':>7}" if train else "")
          + (f" | {'fwd ms':>7} {'GFLOP/s':>7}" if library else "")
          + (f" | {'f+b ms':>7} {'GFLOP/s':>7}" if library and train else ""))
    tot_fwd = tot_bwd = tot_onednn = tot_onednn_train = flops = 0.0
    for shape, count in shapes.items():
        cin, cout, k, stride, h, w = shape
        fwd_flops = 2 * b * cin * cout * k * k * -(-h // stride) * -(-w // stride)
        fwd, bwd = time_conv(shape, b, args.seconds, train)
        tot_fwd += count * fwd
        flops += count * fwd_flops
        line = f"{cin:5d} {cout:5d} {k} {stride} {h:3d}x{w:<3d} {count:2d} | {fwd * 1e3:7.1f} {fwd_flops / fwd / 1e9:7.0f}"
        if train:
            bwd_flops = fwd_flops * (1 if cin == 3 else 2)
            tot_bwd += count * bwd
            line += f" | {bwd * 1e3:7.1f} {bwd_flops / bwd / 1e9:7.0f}"
        if library:
            fast = time_onednn_conv(library, shape, b, args.seconds)
            tot_onednn += count * fast
            line += f" | {fast * 1e3:7.1f} {fwd_flops / fast / 1e9:7.0f}"
            if train:
                both = time_onednn_train_conv(library, shape, b, args.seconds)
                tot_onednn_train += count * both
                line += f" | {both * 1e3:7.1f} {(fwd_flops + bwd_flops) / both / 1e9:7.0f}"
        print(line, flush=True)

    per_image = flops / b / 1e9
    print(f"\nforward: {per_image:.1f} GFLOP/image")
    targets = (b, args.image_size) == (8, 384)  # the targets are stated for this setting only
    conv_rates = {"mindspore": b / tot_fwd}
    if library:
        conv_rates["onednn"] = b / tot_onednn
    for name, total in (("MindSpore Conv2D", tot_fwd), ("oneDNN 3 NHWC", tot_onednn)):
        if total:
            print(f"{name}: convolutions alone {total * 1e3:.0f} ms per batch = {flops / total / 1e9:.0f} GFLOP/s "
                  f"({flops / total / 1e9 / peak:.0%} of sgemm) = {b / total:.2f} img/s")
    if targets:
        print(f"the {EMBED_TARGET} img/s inference target needs {EMBED_TARGET * per_image:.0f} GFLOP/s sustained "
              f"({EMBED_TARGET * per_image / peak:.0%} of sgemm)")
    train_rates = {}
    if train:
        train_rates["mindspore"] = b / (tot_fwd + tot_bwd)
        if library:
            train_rates["onednn"] = b / tot_onednn_train
        for name, rate in train_rates.items():
            print(f"training, {name} convolutions alone (forward + backward): {rate:.2f} img/s"
                  + (f"; target {TRAIN_TARGET} img/s" if targets else ""))
    if not args.no_network:
        infer, steps = time_network(b, args.image_size, 4 * args.seconds, train)
        for name, rate in infer.items():
            print(f"whole network, same run, {name} kernels: inference {b / rate:.2f} img/s "
                  f"({b / rate / conv_rates[name]:.0%} of the rate of its convolutions alone)")
        for name, step in steps.items():
            print(f"whole network, same run, {name} kernels: training {b / step:.2f} img/s "
                  f"({b / step / train_rates[name]:.0%} of the rate of its convolutions alone)")


if __name__ == "__main__":
    main()
