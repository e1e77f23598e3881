"""Training images/s of VehicleNet (fine-tuning step: forward, backward, SGD) on this machine.

    python benchmarks/train_throughput.py [--image-size 384] [--batch-size 8] [--seconds 60] [--pipeline]
                                          [--kernels both|onednn|mindspore] [--precision fp32|bf16|both]
                                          [--torch-python PYTHON]

The step is the one `vehiclenet finetune` runs (softmax cross-entropy, two SGD
parameter groups, momentum 0.9, weight decay 1e-4, graph mode), on the oneDNN
kernels (vehiclenet/model/cpu_kernels.py, the default on x86-64 Linux) in fp32 and, with
``--precision bf16|both`` on a CPU with native bf16, bf16 (``finetune --precision bf16``:
the convolutions' passes in bf16 and bf16 activations between the ops; BatchNorm
statistics, weights and the optimizer float32), and on MindSpore's own
operators, in the same run (the machine is shared: the ratio says more than either). Random
weights and random inputs by default (throughput does not depend on them); the
first step (graph compilation) is timed separately and excluded. ``--pipeline``
also times the full loop with the training data pipeline (JPEG decode +
augmentations) on generated images.

Target on 2 cores: >= 2.0 img/s at 384x384, batch 8 (reference network on MindSpore
2.8.0: 2.2; PyTorch eager: 1.3).
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ENV_BEFORE_MINDSPORE = dict(os.environ)  # for the PyTorch child (see embed_throughput.py)
# Before mindspore, as `vehiclenet finetune` does: it shortens OpenMP's spin-wait (vehiclenet/__init__.py).
import vehiclenet  # noqa: E402,F401


def _time_steps(step, batches, seconds: float, batch_size: int):
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3 * batch_size:
        images, labels = next(batches)
        step(images, labels).asnumpy()
        done += batch_size
    elapsed = time.perf_counter() - start
    return done, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=575)
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring time")
    parser.add_argument("--pipeline", action="store_true", help="also time with the JPEG + augmentation pipeline")
    parser.add_argument("--kernels", choices=("both", "onednn", "mindspore"), default="both",
                        help="which CPU operators to time (default: both, in the same run)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="fp32",
                        help="precision of the oneDNN kernels' step (default fp32; both: fp32 and bf16 in turn)")
    parser.add_argument("--torch-python", metavar="PYTHON",
                        help="also time the same step in PyTorch eager (benchmarks/torch_baseline.py --train)")
    args = parser.parse_args()

    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import Bf16Unsupported

    s, b = args.image_size, args.batch_size
    print(f"mindspore {ms.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"graph mode, {s}x{s}, batch {b}, {args.num_classes} classes; OpenMP spin-wait shortened: "
          f"{vehiclenet.OPENMP_SPIN_SHORTENED}")
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((b, 3, s, s), dtype=np.float32))
    y = ms.Tensor(rng.integers(0, args.num_classes, b).astype(np.int32))

    def fixed():
        while True:
            yield x, y

    rates, steps = {}, {}
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    rows = [("onednn", p) for p in precisions] + [("mindspore", "fp32")]
    for kernels, precision in rows:
        if args.kernels not in ("both", kernels):
            continue
        try:
            net = create_network(pretrained=False, num_classes=args.num_classes, cpu_kernels=kernels == "onednn",
                                 mode="graph", precision=precision)
        except Bf16Unsupported as err:
            print(f"bf16 not available here: {err}; skipped")
            continue
        if kernels == "onednn" and net.model.train_ops is None:
            print("oneDNN kernels unavailable here (see `vehiclenet info`); skipped")
            continue
        optimizer = ft.create_optimizer(net, ft.lr_schedule(0.02, 1000, 40))
        step = ft.build_train_step(net, optimizer)
        start = time.perf_counter()
        step(x, y).asnumpy()
        compile_s = time.perf_counter() - start
        step(x, y).asnumpy()
        done, elapsed = _time_steps(step, fixed(), args.seconds, b)
        row = f"oneDNN {precision}" if kernels == "onednn" else "MindSpore's ops"
        rates[row], steps[row] = done / elapsed, step
        print(f"train step, {row:15s} (tensors in memory): {done / elapsed:6.2f} img/s  ({elapsed / done * 1000:7.1f} "
              f"ms/img, {done} images in {elapsed:.1f} s; first step incl. compile {compile_s:.1f} s)", flush=True)
    for row in rates:
        if row != "oneDNN fp32" and "oneDNN fp32" in rates:
            print(f"{row} / oneDNN fp32: {rates[row] / rates['oneDNN fp32']:.2f}x")
    if not rates:
        return

    # Same-run inference figure: the machine is shared, so the ratio says more than either number alone.
    embed = create_network(pretrained=False, include_top=False, mode="graph")
    embed(x).asnumpy()
    done_e, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds / 4 or done_e < 2 * b:
        embed(x).asnumpy()
        done_e += b
    embed_rate = done_e / (time.perf_counter() - start)
    train_rate = max(rates.values())
    print(f"inference (embedding) same run: {embed_rate:6.2f} img/s; the faster training step costs "
          f"{embed_rate / train_rate:.1f}x an inference (load average {os.getloadavg()[0]:.1f})", flush=True)

    if args.pipeline:
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            for i in range(4):  # VeRi-like: vehicle crops of a few hundred pixels
                os.makedirs(os.path.join(tmp, str(i)))
                for j in range(2 * b):
                    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
                    Image.fromarray(img).save(os.path.join(tmp, str(i), f"{j}.jpg"))
            data = ft.scan_training_data(tmp)
            dataset = ft.build_train_dataset(data, batch_size=b, image_size=s, num_workers=2)
            it = dataset.create_tuple_iterator(num_epochs=-1)

            def batches():
                while True:
                    for images, labels in it:
                        yield images, labels

            fastest = max(rates, key=rates.get)
            done, elapsed = _time_steps(steps[fastest], batches(), args.seconds, b)
            print(f"train loop with data pipeline ({fastest}): {done / elapsed:6.2f} img/s  "
                  f"({done} images in {elapsed:.1f} s; JPEG decode + augmentations, {args.image_size}x{s})")

    if args.torch_python:
        _compare_with_torch(args, rates)


def _compare_with_torch(args: argparse.Namespace, rates: dict) -> None:
    """PyTorch's training step in its three variants (a child process of ``--torch-python``), then
    our rows as ratios to the matching one: fp32 to fp32 channels-last, bf16 to bf16 autocast."""
    import re

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_baseline.py")
    proc = subprocess.run([args.torch_python, script, "--train", "--seconds", str(args.seconds), "--image-size",
                           str(args.image_size), "--batch-sizes", str(args.batch_size)], check=True,
                          env=ENV_BEFORE_MINDSPORE, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    torch_rates = {m.group(1): float(m.group(2))
                   for m in re.finditer(r"torch train (\S+)\s+batch\s+\d+:\s+([\d.]+) img/s", proc.stdout)}
    for ours, theirs in (("oneDNN fp32", "fp32-channels-last"), ("oneDNN fp32", "fp32"),
                         ("oneDNN bf16", "bf16-autocast-channels-last")):
        if ours in rates and theirs in torch_rates:
            print(f"{ours} / torch {theirs}: {rates[ours] / torch_rates[theirs]:.2f}x")


if __name__ == "__main__":
    main()
