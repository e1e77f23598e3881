"""Filtered search (vehiclenet/retrieval/filters.py): recall and latency of a top-10 restricted to some
cameras or a time window, inside the index, against exact search over the rows that pass.

The gallery is benchmarks/index_speed.py's synthetic one (identities grouped around vehicle
models, ``--spread``), each row given one of 100 cameras and a time within one day, uniformly.
The default index (``GalleryIndex.build`` with every default: ivf-sq8 tuned for recall@10
0.95) and an exact index of the same rows are built; then per filter:

* recall@10 of the default index's filtered search against exact search over the passing rows
  alone (the truth);
* p50 single-query latency of the filtered search, as a ratio to the same index unfiltered and
  to the exact index's filtered search (the anchor, same run).

    python benchmarks/filtered_search.py [--n 200000] [--queries 500] [--spread 1.5]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import index_speed as gen  # noqa: E402  (the same synthetic gallery)

DAY = 86_400


def p50_ms(search, queries: np.ndarray) -> float:
    search(queries[:5])  # warm
    lat = []
    for q in queries:
        t = time.perf_counter()
        search(q[None])
        lat.append(time.perf_counter() - t)
    return 1e3 * float(np.percentile(lat, 50))


def main() -> None:
    from vehiclenet.retrieval.blas import matmul_nt
    from vehiclenet.retrieval.filters import RowFilter
    from vehiclenet.retrieval.index import GalleryIndex

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--spread", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    gallery = np.empty((args.n, gen.DIM), dtype=np.float32)
    for start, feats in gen.gallery_chunks(args.n, args.seed, args.spread):
        gallery[start:start + len(feats)] = feats
    rng = np.random.default_rng([args.seed, 5])
    cams, times = rng.integers(0, 100, args.n), rng.integers(0, DAY, args.n)
    queries = gen.queries(args.n, args.queries, args.seed, args.spread)
    paths = gen.paths(0, args.n)
    t = time.perf_counter()
    index = GalleryIndex.build(gallery, paths, cams=cams, times=times)
    build_s = time.perf_counter() - t
    exact = GalleryIndex.build(gallery, paths, cams=cams, times=times, kind="exact")
    print(f"CPU: {gen.cpu_model()} ({os.cpu_count()} cores)")
    print(f"gallery: {args.n:,} x {gen.DIM} (spread {args.spread}), 100 cameras, one day; {args.queries} queries; "
          f"default index: {index.kind} {index.params} built in {build_s:.1f} s")
    unfiltered = p50_ms(lambda q: index.search(q, 10), queries)
    print(f"unfiltered: p50 {unfiltered:.2f} ms")
    filters = {"50 cameras (50 %)": RowFilter(cameras=tuple(range(50))),
               "5 cameras (5 %)": RowFilter(cameras=tuple(range(5))),
               "1 camera (1 %)": RowFilter(cameras=(7,)),
               "2 hours (8 %)": RowFilter(after=3_600 * 10, before=3_600 * 12),
               "1 camera, 2 hours (0.08 %)": RowFilter(cameras=(7,), after=3_600 * 10, before=3_600 * 12)}
    print(f"{'filter':<28} {'rows':>8} {'recall@10':>9} {'p50 ms':>7} {'x unfilt.':>9} {'exact p50':>9} {'x faster':>8}")
    results = []
    for name, flt in filters.items():
        mask = flt.base_mask(index.columns(), args.n, "benchmark")
        rows = np.flatnonzero(mask)
        sims = matmul_nt(queries, gallery[rows]) if len(rows) else np.zeros((len(queries), 0), np.float32)
        truth = rows[np.argsort(-sims, axis=1, kind="stable")[:, :10]]
        found = index.search(queries, 10, allowed=mask)[1]
        recall = float(np.mean([len(set(a) & set(b)) / max(1, min(10, len(rows))) for a, b in zip(found, truth)]))
        latency = p50_ms(lambda q: index.search(q, 10, allowed=mask), queries)
        anchor = p50_ms(lambda q: exact.search(q, 10, allowed=mask), queries[:100])
        print(f"{name:<28} {len(rows):>8} {recall:>9.4f} {latency:>7.2f} {latency / unfiltered:>8.1f}x "
              f"{anchor:>9.2f} {anchor / latency:>7.1f}x", flush=True)
        results.append({"filter": name, "rows": int(len(rows)), "recall10": recall, "p50_ms": latency,
                        "exact_p50_ms": anchor})
    print(json.dumps({"cpu": gen.cpu_model(), "n": args.n, "kind": index.kind, "params": index.params,
                      "unfiltered_p50_ms": unfiltered, "results": results}))


if __name__ == "__main__":
    main()
