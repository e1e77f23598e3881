"""`vehiclenet calibrate`'s pair counting at a validation set's scale, against an anchor measured
in the same run: numpy's float32 matmul of the same N x N product (the distances alone).

N generated 512-d unit features, 5 images per identity from 5 cameras; prints the seconds of
both, their ratio, the threshold at FMR 1e-3 and its TPR, and the peak RSS of the process.

    python benchmarks/calibrate_speed.py [--n 10000] [--noise 2.5]
"""
import argparse
import resource
import time

import numpy as np


def features(n: int, noise: float, dim: int = 512, per_id: int = 5):
    rng = np.random.default_rng(0)
    ids = np.arange(n) // per_id
    cams = np.arange(n) % per_id
    x = rng.standard_normal((ids[-1] + 1, dim))[ids] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), ids, cams


def main() -> None:
    from vehiclenet.retrieval.calibration import calibrate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--noise", type=float, default=2.5)
    args = parser.parse_args()
    feats, ids, cams = features(args.n, args.noise)
    start = time.perf_counter()
    feats @ feats.T
    anchor = time.perf_counter() - start
    start = time.perf_counter()
    cal = calibrate(feats, ids, cams)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"N={args.n}: {cal.positives} same-vehicle and {cal.negatives} different-vehicle pairs")
    print(f"anchor (numpy N x N float32 matmul): {anchor:.2f} s")
    print(f"calibrate: {seconds:.2f} s = {seconds / anchor:.2f}x the anchor; peak RSS {rss:.0f} MB")
    print(f"threshold {cal.distance:.4f} at FMR {cal.fmr:g} (measured {cal.measured_fmr:.2e}), TPR {cal.tpr:.4f}; "
          + ", ".join(f"TPR@FPR={k} {v:.4f}" for k, v in cal.roc.items()))


if __name__ == "__main__":
    main()
