"""Evaluation and re-ranking speed / memory at VeRi-776 scale on synthetic features.

1,678 queries and 11,579 gallery items, 512-d L2-normalised float32 features
clustered around 200 id centres (20 cameras), so the metrics are not trivial.
Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own.

    python benchmarks/eval_speed.py [--noise 2.0] [--dense-n 3000]

Anchors, measured in the same run: the same work on the numpy formulations (numpy's
matmul for the distances, numpy's ranking and Jaccard step), which the package falls back
to without a C compiler and which it used before the compiled kernels.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def synthetic(noise: float, seed: int = 0, num_q: int = 1678, num_g: int = 11579):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, 512)).astype(np.float32)

    def make(n):
        ids = rng.integers(0, 200, n)
        f = centres[ids] + noise * rng.standard_normal((n, 512)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), ids, rng.integers(0, 20, n)

    return make(num_q) + make(num_g)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, noise: float, dense_n: int) -> dict:
    from vehiclenet.evaluation import cosine_distance, evaluate
    from vehiclenet.rerank import re_rank

    qf, qi, qc, gf, gi, gc = synthetic(noise)
    out = {"mode": mode, "rss_after_data_mb": rss_mb()}
    if mode == "plain":
        t = time.perf_counter()
        dist = cosine_distance(qf, gf)
        out["distance_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(dist, qi, gi, qc, gc)
        out["metrics_s"] = time.perf_counter() - t
    elif mode == "plain-numpy":  # anchor: numpy's matmul and numpy's ranking
        t = time.perf_counter()
        dist = -(qf @ gf.T)
        out["distance_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(dist, qi, gi, qc, gc, native=False)
        out["metrics_s"] = time.perf_counter() - t
    elif mode in ("rerank", "rerank-numpy"):
        if mode == "rerank-numpy":  # anchor: the Jaccard step and the ranking in numpy
            from vehiclenet import rerank

            rerank._native_jaccard = lambda: None
        t = time.perf_counter()
        dist = re_rank(qf, gf)
        out["rerank_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(dist, qi, gi, qc, gc, native=mode == "rerank")
        out["metrics_s"] = time.perf_counter() - t
    else:  # dense reference-style on a subset, for comparison
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_rerank import direct_rerank

        nq = max(1, dense_n * len(qf) // (len(qf) + len(gf)))
        t = time.perf_counter()
        dist = direct_rerank(qf[:nq], gf[: dense_n - nq], 100, 15, 0.0)
        out["dense_rerank_s"] = time.perf_counter() - t
        out["n"] = dense_n
        t = time.perf_counter()
        mine = re_rank(qf[:nq], gf[: dense_n - nq])
        out["rerank_same_n_s"] = time.perf_counter() - t
        out["max_abs_diff"] = float(np.abs(mine - dist).max())
        res = evaluate(dist, qi[:nq], gi[: dense_n - nq], qc[:nq], gc[: dense_n - nq])
    out.update({k: v for k, v in res.to_dict().items() if k != "cmc"})
    out["peak_rss_mb"] = rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=2.0, help="feature noise around the id centres")
    ap.add_argument("--dense-n", type=int, default=0, help="also time the dense reference-style "
                    "transcription on this many items (slow: Python loops, N x N float32)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.noise, args.dense_n)))
        return
    modes = ["plain", "plain-numpy", "rerank", "rerank-numpy"] + (["dense"] if args.dense_n else [])
    print(f"VeRi scale: 1678 queries x 11579 gallery, 512-d, 200 ids, noise {args.noise}; "
          f"CPU {_cpu_model()}, {os.cpu_count()} cores")
    results = {}
    for mode in modes:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--noise", str(args.noise),
                               "--dense-n", str(args.dense_n)], capture_output=True, text=True, check=True)
        r = results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        figures = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                            if k not in ("mode", "ap"))
        print(f"[{mode}] {figures}")
    _print_ratios(results)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _print_ratios(results: dict) -> None:
    """Each figure against its anchor of the same run: the numpy formulations (numpy's matmul
    for the distances; numpy's ranking and Jaccard step), so the ratios carry across CPUs."""
    plain = results["plain"]["distance_s"] + results["plain"]["metrics_s"]
    anchor = results["plain-numpy"]["distance_s"] + results["plain-numpy"]["metrics_s"]
    rerank = results["rerank"]["rerank_s"] + results["rerank"]["metrics_s"]
    rerank_anchor = results["rerank-numpy"]["rerank_s"] + results["rerank-numpy"]["metrics_s"]
    for name, mine, base, a, b in (("plain", plain, anchor, "plain", "plain-numpy"),
                                   ("re-ranked", rerank, rerank_anchor, "rerank", "rerank-numpy")):
        same = all(results[a][k] == results[b][k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP"))
        print(f"{name}: {mine:.2f} s = {mine / base:.2f}x the numpy anchor's {base:.2f} s in this run "
              f"({base / mine:.1f}x faster); metrics identical to the anchor's: {same}")

if __name__ == "__main__":
    main()
