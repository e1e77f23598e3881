"""Images/s from JPEG files on disk to flip-summed features, versus the network alone.

    python benchmarks/embed_pipeline.py [--images 64] [--batch-size 8] [--rounds 2] [--precision bf16]

Writes ``--images`` JPEGs of ``--width`` x ``--height`` (cartoon vehicles on noisy
backgrounds, quality 90) to a temp dir, then measures, in alternating rounds so load from
other processes hits every variant alike (best round reported):

- pipeline:    ``embed(net, folder, batch_size=B, flip=True)`` (decode + resize + normalise
               in a prefetching thread pool, one network call of 2B per batch);
- sequential:  the same work with decoding in the main thread between network calls
               (what the prefetch saves);
- net alone:   pre-made (2B, 3, 384, 384) tensors, the same number of network calls;
- net 2 calls: (with --flip-layouts) flip as two calls of B instead of one of 2B.

Besides wall-clock img/s it prints this process's CPU seconds per image: on a machine
shared with other jobs the wall-clock figures swing by 2-3x between rounds, while CPU
time per image shows the pipeline's overhead over the network alone regardless.

Random weights (speed does not depend on them); the graph compiles before timing.
Target: pipeline >= 80 % of the network-alone rate.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def write_jpegs(folder: str, n: int, size, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        bg = rng.normal(110, 25, (h, w, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        d = ImageDraw.Draw(img)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(10, w // 5)), int(rng.integers(h // 3, h // 2))
        d.rounded_rectangle([x0, y0, w - x0, y0 + h // 4], radius=12, fill=colour)
        d.polygon([(x0 + w // 6, y0), (x0 + w // 4, y0 - h // 6), (w - x0 - w // 4, y0 - h // 6),
                   (w - x0 - w // 6, y0)], fill=colour)
        for cx in (x0 + w // 8, w - x0 - w // 8):
            d.ellipse([cx - h // 10, y0 + h // 5, cx + h // 10, y0 + h // 5 + h // 5], fill=(20, 20, 20))
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--height", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flip-layouts", action="store_true", help="also time flip as two calls of B")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: embed's default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="network arithmetic (bf16: decoding must keep up with a ~2x faster network)")
    args = parser.parse_args()
    os.environ.setdefault("GLOG_v", "3")

    import mindspore as ms

    from vehiclenet import create_network
    from vehiclenet.embedding.features import embed
    from vehiclenet.embedding.inputs import list_images
    from vehiclenet.embedding.preprocessing import load_image, preprocess

    n, b = args.images, args.batch_size
    if n % b:
        parser.error("--images must be a multiple of --batch-size (so every variant does the same calls)")
    net = create_network(pretrained=False, include_top=False, precision=args.precision, mode="graph")
    print(f"mindspore {ms.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{n} JPEGs {args.width}x{args.height}, batch {b}, flip on (2x{b} images per network call), "
          f"{args.precision}")

    with tempfile.TemporaryDirectory(prefix="vehiclenet_bench_") as folder:
        write_jpegs(folder, n, (args.width, args.height))
        files = list_images(folder)
        rng = np.random.default_rng(0)
        x2 = ms.Tensor(rng.standard_normal((2 * b, 3, 384, 384), dtype=np.float32))
        x1a = ms.Tensor(rng.standard_normal((b, 3, 384, 384), dtype=np.float32))
        x1b = ms.Tensor(rng.standard_normal((b, 3, 384, 384), dtype=np.float32))
        t0 = time.perf_counter()
        net(x2).asnumpy()
        net(x1a).asnumpy()
        print(f"graph compile + first calls: {time.perf_counter() - t0:.1f} s")

        def pipeline():
            res = embed(net, folder, batch_size=b, flip=True, progress=False, num_workers=args.workers)
            assert res.features.shape == (n, 512)

        def sequential():
            for i in range(0, n, b):
                batch = np.stack([preprocess(load_image(f)) for f in files[i:i + b]])
                out = net(ms.Tensor(np.concatenate([batch, batch[..., ::-1]]))).asnumpy()
                feats = out[:b] + out[b:]
                feats /= np.linalg.norm(feats, axis=1, keepdims=True)

        def net_alone():
            for _ in range(n // b):
                net(x2).asnumpy()

        def net_two_calls():
            for _ in range(n // b):
                net(x1a).asnumpy()
                net(x1b).asnumpy()

        variants = {"pipeline": pipeline, "sequential": sequential, "net alone": net_alone}
        if args.flip_layouts:
            variants["net 2 calls"] = net_two_calls
        best = {k: float("inf") for k in variants}
        cpu = {k: float("inf") for k in variants}
        for r in range(args.rounds):
            for name, fn in variants.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                best[name] = min(best[name], dt)
                cpu[name] = min(cpu[name], dc)
                print(f"round {r + 1} {name:12s} {n / dt:6.2f} img/s  {dc / n:5.2f} cpu-s/img  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)

    rate = {k: n / v for k, v in best.items()}
    print("best rounds (images/s, each image = original + flip through the network):")
    for k, v in rate.items():
        print(f"  {k:12s} {v:6.2f} img/s  ({1000 / v:6.1f} ms/img wall, {cpu[k] / n:5.2f} cpu-s/img)")
    print(f"pipeline / net alone   = {rate['pipeline'] / rate['net alone']:.1%} wall "
          f"(target >= 80 %), {cpu['net alone'] / cpu['pipeline']:.1%} by CPU time")
    print(f"sequential / net alone = {rate['sequential'] / rate['net alone']:.1%} wall")
    if args.flip_layouts:
        print(f"one call of 2B / two calls of B = {rate['net alone'] / rate['net 2 calls']:.2f}x")


if __name__ == "__main__":
    main()
