"""Evaluation and re-ranking speed / memory at VeRi-776 and VERI-Wild scale on synthetic features.

Default (``--scale veri``): 1,678 queries and 11,579 gallery items, 512-d L2-normalised
float32 features clustered around 200 id centres (20 cameras), so the metrics are not
trivial. Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own.
A last check runs the bounded-memory paths (``evaluate_features``; ``re_rank_blocks`` with
the exact neighbour source and with faiss's exact ``IndexFlatIP`` as the source, ranked by
``evaluate_blocks``) and prints whether their metrics and re-ranked distances are
bit-identical to the whole-matrix ``evaluate(cosine_distance(...))`` / ``re_rank``.

    python benchmarks/eval_speed.py [--noise 2.0] [--dense-n 3000]
    python benchmarks/eval_speed.py --scale veriwild-large [--k1 100 --k2 15]

``--scale veriwild-small`` (3,000 x 38,861) / ``veriwild-medium`` (5,000 x 64,389) /
``veriwild-large`` (10,000 x 128,517): one query per id and ~13 gallery images per id
(VERI-Wild's test splits have 3,000 / 5,000 / 10,000 ids), 174 cameras; measures the
bounded paths only (plain: ``evaluate_features``; re-ranking: ``re_rank_blocks`` ranked
by ``evaluate_blocks``, protocol defaults k1=100, k2=15, lambda=0), against an anchor
measured in the same run: numpy's matmul for the same query x gallery product.

Measured on the 2-core test machine (AMD EPYC), ``--scale veriwild-large``: plain
evaluation 11.9 s (1.6x the anchor's 7.3 s), 894 MB peak RSS; re-ranking k1=100, k2=15,
lambda=0 plus evaluation 329 s (45x), 2,582 MB peak RSS (targets: plain <= 60 s and
<= 2 GB, re-ranking <= 10 min and <= 4 GB); the data alone is 367 MB.

Anchors at VeRi scale, measured in the same run: the same work on the numpy formulations
(numpy's matmul for the distances, numpy's ranking and Jaccard step), which the package
falls back to without a C compiler and which it used before the compiled kernels.
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


SCALES = {"veri": (1678, 11579, 200, 20), "veriwild-small": (3000, 38861, 3000, 174),
          "veriwild-medium": (5000, 64389, 5000, 174), "veriwild-large": (10000, 128517, 10000, 174)}


def synthetic_wild(scale: str, noise: float, seed: int = 0):
    """VERI-Wild-shaped features: every id one query, the gallery spread evenly over the ids;
    drawn in float32 chunks so the generator adds little to the peak RSS."""
    num_q, num_g, num_ids, num_cams = SCALES[scale]
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, 512), dtype=np.float32)

    def make(ids):
        f = np.empty((ids.shape[0], 512), dtype=np.float32)
        for s in range(0, ids.shape[0], 8192):
            part = rng.standard_normal((min(8192, ids.shape[0] - s), 512), dtype=np.float32)
            part *= np.float32(noise)
            part += centres[ids[s : s + 8192]]
            part /= np.linalg.norm(part, axis=1, keepdims=True)
            f[s : s + 8192] = part
        return f, ids, rng.integers(0, num_cams, ids.shape[0])

    q_ids = np.arange(num_q) % num_ids
    g_ids = rng.permutation(np.arange(num_g) % num_ids)
    return make(q_ids) + make(g_ids)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, noise: float, dense_n: int, scale: str = "veri", k1: int = 100, k2: int = 15) -> dict:
    from vehiclenet.retrieval.exact import cosine_distance
    from vehiclenet.retrieval.metrics import evaluate
    from vehiclenet.retrieval.rerank import re_rank

    qf, qi, qc, gf, gi, gc = synthetic(noise) if scale == "veri" else synthetic_wild(scale, noise)
    out = {"mode": mode, "rss_after_data_mb": rss_mb()}
    if mode == "bounded-check":
        out.update(_bounded_check(qf, qi, qc, gf, gi, gc))
        out["peak_rss_mb"] = rss_mb()
        return out
    if mode in ("plain-bounded", "rerank-bounded", "matmul-anchor"):
        res = _bounded(mode, out, qf, qi, qc, gf, gi, gc, k1, k2)
    elif mode == "plain":
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
        if mode == "rerank-numpy":  # anchor: neighbour selection, Jaccard step and ranking in numpy
            from vehiclenet.retrieval import rerank

            rerank._native_jaccard = lambda: None
            rerank._native_neighbour_kernels = lambda: None
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
    if res is not None:
        out.update({k: v for k, v in res.to_dict().items() if k != "cmc"})
    out["peak_rss_mb"] = rss_mb()
    return out


def _bounded(mode: str, out: dict, qf, qi, qc, gf, gi, gc, k1: int, k2: int):
    """The bounded-memory paths at large scale (and the matmul anchor); figures into ``out``."""
    from vehiclenet.retrieval.metrics import evaluate_blocks, evaluate_features
    from vehiclenet.retrieval.rerank import re_rank_blocks

    t = time.perf_counter()
    if mode == "matmul-anchor":  # numpy's matmul for the same product, 1,000 queries at a time
        for s in range(0, len(qf), 1000):
            block = qf[s : s + 1000] @ gf.T
            del block
        out["anchor_s"] = time.perf_counter() - t
        return None
    if mode == "plain-bounded":
        res = evaluate_features(qf, gf, qi, gi, qc, gc)
        out["total_s"] = time.perf_counter() - t
        return res
    blocks = re_rank_blocks(qf, gf, k1, k2, 0.0)
    out["rerank_prepare_s"] = time.perf_counter() - t
    res = evaluate_blocks(blocks, qi, gi, qc, gc)
    out["total_s"] = time.perf_counter() - t
    out["k1"], out["k2"] = k1, k2
    return res


def _faiss_exact(feats: np.ndarray, k: int) -> np.ndarray:
    """A gallery index as the neighbour source: faiss's exact inner-product search."""
    import faiss

    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(feats)
    return index.search(feats, k)[1]


def _bounded_check(qf, qi, qc, gf, gi, gc) -> dict:
    """Bounded paths against the whole-matrix ones at this scale: bit-identical or not."""
    from vehiclenet.retrieval.blocks import collect
    from vehiclenet.retrieval.exact import cosine_distance
    from vehiclenet.retrieval.metrics import evaluate, evaluate_blocks, evaluate_features
    from vehiclenet.retrieval.rerank import exact_neighbours, re_rank, re_rank_blocks

    def same(a, b):
        return bool(np.array_equal(a.per_query_ap, b.per_query_ap) and np.array_equal(a.cmc, b.cmc)
                    and a.mINP == b.mINP and a.mAP == b.mAP)

    out = {}
    out["plain_metrics_identical"] = same(evaluate(cosine_distance(qf, gf), qi, gi, qc, gc),
                                          evaluate_features(qf, gf, qi, gi, qc, gc, block_rows=256, workers=2))
    full = re_rank(qf, gf)
    full_res = evaluate(full, qi, gi, qc, gc)
    shape = full.shape
    streamed = collect(re_rank_blocks(qf, gf, block_rows=256, workers=2), shape)
    out["rerank_distances_identical"] = bool(np.array_equal(full, streamed))
    del streamed
    out["rerank_metrics_identical"] = same(full_res, evaluate_blocks(re_rank_blocks(qf, gf), qi, gi, qc, gc))
    out["rerank_mAP"] = full_res.mAP
    # An exact index as the neighbour source: its own float rounding can order near-ties
    # differently from ours, so say how many lists agree and what that does to the result.
    feats = np.concatenate([qf, gf])
    ours, theirs = exact_neighbours(feats, 101), _faiss_exact(feats, 101)
    out["faiss_flat_lists_identical_rows"] = f"{int((ours == theirs).all(axis=1).sum())}/{len(feats)}"
    del feats
    via_index = collect(re_rank_blocks(qf, gf, neighbours=_faiss_exact), shape)
    out["faiss_flat_rerank_identical"] = bool(np.array_equal(full, via_index))
    out["faiss_flat_rerank_max_abs_diff"] = float(np.abs(full - via_index).max())
    out["faiss_flat_metrics_identical"] = same(full_res, evaluate(via_index, qi, gi, qc, gc))
    # The package's own exact gallery index (vehiclenet.retrieval.index, evaluate --rerank --neighbours exact).
    from vehiclenet.retrieval.index import index_neighbours

    via_index = collect(re_rank_blocks(qf, gf, neighbours=index_neighbours("exact")), shape)
    out["gallery_index_exact_rerank_identical"] = bool(np.array_equal(full, via_index))
    out["gallery_index_exact_metrics_identical"] = same(full_res, evaluate(via_index, qi, gi, qc, gc))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, help="feature noise around the id centres (default 2.0 at VeRi "
                    "scale; 2.5 at VERI-Wild scale, where 2.0 leaves re-ranking nothing to do: mAP 1.0)")
    ap.add_argument("--dense-n", type=int, default=0, help="also time the dense reference-style "
                    "transcription on this many items (slow: Python loops, N x N float32)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="veri",
                    help="veri (default: every path, anchors, bounded-path check) or a VERI-Wild test size "
                         "(bounded paths only)")
    ap.add_argument("--k1", type=int, default=100, help="re-ranking k1 at VERI-Wild scale (default 100)")
    ap.add_argument("--k2", type=int, default=15, help="re-ranking k2 at VERI-Wild scale (default 15)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noise is None:
        args.noise = 2.0 if args.scale == "veri" else 2.5
    if args.child:
        print(json.dumps(child(args.child, args.noise, args.dense_n, args.scale, args.k1, args.k2)))
        return
    if args.scale != "veri":
        _main_wild(args)
        return
    modes = ["plain", "plain-numpy", "rerank", "rerank-numpy"] + (["dense"] if args.dense_n else [])
    print(f"VeRi scale: 1678 queries x 11579 gallery, 512-d, 200 ids, noise {args.noise}; "
          f"CPU {_cpu_model()}, {os.cpu_count()} cores")
    results = {}
    for mode in modes:
        r = results[mode] = _run_child(mode, args)
        _print_figures(mode, r)
    _print_ratios(results)
    check = _run_child("bounded-check", args)
    print("bounded-memory paths against the whole matrices (bit for bit): "
          + ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("mode", "rss_after_data_mb", "peak_rss_mb")))


def _run_child(mode: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--noise", str(args.noise),
                           "--dense-n", str(args.dense_n), "--scale", args.scale, "--k1", str(args.k1),
                           "--k2", str(args.k2)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_figures(mode: str, r: dict) -> None:
    figures = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                        if k not in ("mode", "ap"))
    print(f"[{mode}] {figures}")


def _main_wild(args: argparse.Namespace) -> None:
    num_q, num_g, num_ids, num_cams = SCALES[args.scale]
    print(f"{args.scale}: {num_q} queries x {num_g} gallery, 512-d, {num_ids} ids, {num_cams} cameras, "
          f"noise {args.noise}; CPU {_cpu_model()}, {os.cpu_count()} cores")
    results = {}
    for mode in ("matmul-anchor", "plain-bounded", "rerank-bounded"):
        r = results[mode] = _run_child(mode, args)
        _print_figures(mode, r)
    anchor = results["matmul-anchor"]["anchor_s"]
    for mode, name in (("plain-bounded", "plain evaluation"),
                       ("rerank-bounded", f"re-ranking (k1={args.k1}, k2={args.k2}, lambda=0) + evaluation")):
        r = results[mode]
        print(f"{name}: {r['total_s']:.1f} s = {r['total_s'] / anchor:.1f}x numpy's matmul of the same "
              f"query x gallery product in this run ({anchor:.1f} s); peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"mAP {r['mAP']:.4f}")


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
