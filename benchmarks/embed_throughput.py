"""Images/s of the VehicleNet embedding network at 384x384, fp32, on this machine.

    python benchmarks/embed_throughput.py [--batch-sizes 1 8] [--seconds 15] [--mode graph]
                                          [--kernels both|onednn|mindspore]
                                          [--torch-python /path/to/python-with-torch]

Random weights (throughput does not depend on them) and random inputs; the first
call (graph compilation) is timed separately and excluded. ``onednn`` is the network as
``create_network`` returns it on an x86-64 CPU (oneDNN 3 kernels, vehiclenet/model/cpu_kernels.py),
``mindspore`` the same network on MindSpore's own Conv2D; ``both`` times them in one run.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Importing mindspore points LD_LIBRARY_PATH at its own libraries, which leaves a child
# PyTorch with one thread: the baseline gets the environment from before the import.
ENV_BEFORE_MINDSPORE = dict(os.environ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per batch size")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--kernels", choices=["both", "onednn", "mindspore"], default="both",
                        help="convolutions to time: the oneDNN kernels, MindSpore's own, or both")
    parser.add_argument("--torch-python", metavar="PYTHON",
                        help="also run benchmarks/torch_baseline.py with this interpreter (same run, same machine)")
    args = parser.parse_args()

    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.model.cpu_kernels import convolution_implementation, library_path

    print(f"mindspore {ms.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, mode={args.mode}, fp32, {args.image_size}x{args.image_size}")
    library = library_path()
    variants = ["onednn", "mindspore"] if args.kernels == "both" else [args.kernels]
    if library is None and "onednn" in variants:
        print("oneDNN kernels unavailable here (see the warning above): timing MindSpore's own convolutions only")
        variants = ["mindspore"]
    rng = np.random.default_rng(0)
    for variant in variants:
        net = create_network(pretrained=False, include_top=False, mode=args.mode, cpu_kernels=variant == "onednn")
        if variant == "mindspore":
            print("convolutions: MindSpore's Conv2D (bundled oneDNN 2.2, NCHW)")
        else:
            impl = convolution_implementation(library, 8, 96, 96, 64, 64, 3, 1)
            print(f"convolutions: oneDNN 3 kernels on NHWC ({impl} for a 3x3 conv), {library}")
        for batch in args.batch_sizes:
            x = ms.Tensor(rng.standard_normal((batch, 3, args.image_size, args.image_size), dtype=np.float32))
            start = time.perf_counter()
            out = net(x).asnumpy()
            first = time.perf_counter() - start
            assert out.shape == (batch, 512), out.shape
            net(x).asnumpy()  # warm-up after compilation
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or done < 3 * batch:
                net(x).asnumpy()
                done += batch
            elapsed = time.perf_counter() - start
            print(f"  batch {batch:3d}: {done / elapsed:6.2f} img/s  ({elapsed / done * 1000:7.1f} ms/img, "
                  f"{done} images in {elapsed:.1f} s; first call incl. compile {first:.1f} s)")

    if args.torch_python:
        # After our measurement, so the two never compete for the 2 cores.
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_baseline.py")
        subprocess.run([args.torch_python, script, "--seconds", str(args.seconds), "--image-size",
                        str(args.image_size), "--batch-sizes", *map(str, args.batch_sizes)],
                       check=True, env=ENV_BEFORE_MINDSPORE)


if __name__ == "__main__":
    main()
