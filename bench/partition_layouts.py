"""Why one FAISS sub-index per category: compared with one IndexIVFFlat whose lists are the categories.

Usage: python bench/partition_layouts.py [--n 10000] [--dim 1280] [--categories 10] [--queries 500] [--top 3]
                                        [--json FILE]
Both layouts search exactly the images of the top-P categories, so their results must be identical;
the table compares build time and per-query stage-2 latency (p50/p95, single-query calls, as a server makes).
"""
import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned, search_preassigned

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.embedding.vectors import l2_normalize  # noqa: E402
from backend.search.category_index import CategoryIndex  # noqa: E402
from bench.common import machine, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.categories, args.dim))
    cats = rng.integers(0, args.categories, args.n)
    vectors = l2_normalize(np.maximum(centres[cats] + rng.normal(size=(args.n, args.dim)), 0))
    ids = np.arange(args.n, dtype=np.int64)
    protos = l2_normalize(np.stack([vectors[cats == c].mean(0) for c in range(args.categories)]))
    queries = l2_normalize(np.maximum(centres[rng.integers(0, args.categories, args.queries)]
                                      + rng.normal(size=(args.queries, args.dim)), 0))

    started = time.perf_counter()
    sub = CategoryIndex(args.dim)
    sub.add(ids, vectors, cats)
    sub.set_prototypes(np.arange(args.categories), protos)
    sub_build = time.perf_counter() - started

    started = time.perf_counter()
    quantizer = faiss.IndexFlatIP(args.dim)
    quantizer.add(protos)
    ivf = faiss.IndexIVFFlat(quantizer, args.dim, args.categories, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True  # the lists are the categories: no k-means
    add_preassigned(ivf, vectors, cats.astype(np.int64), ids)
    ivf.nprobe = args.top
    ivf_build = time.perf_counter() - started

    sub_ms, ivf_ms, same = [], [], 0
    for q in queries:
        hits = sub.search(q[None], args.k, top_categories=args.top)[0]
        sub_ms.append(hits.search_ms)
        chosen = np.array([hits.searched_categories], dtype=np.int64)
        started = time.perf_counter()
        _, found = search_preassigned(ivf, q[None], args.k, chosen)
        ivf_ms.append((time.perf_counter() - started) * 1000)
        same += set(found[0].tolist()) == set(hits.ids.tolist())
    print(f"{args.n} vectors, {args.dim}-d, {args.categories} categories, {args.queries} queries, top {args.top} "
          f"categories, k={args.k}; identical results for {same}/{args.queries} queries")
    print(f"{'layout':<34}{'build s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    rows = []
    for name, build, ms in (("sub-index per category (imsrc)", sub_build, sub_ms),
                            ("IndexIVFFlat, lists = categories", ivf_build, ivf_ms)):
        rows.append({"layout": name, "build_s": round(build, 4), "p50_ms": round(float(np.percentile(ms, 50)), 4),
                     "p95_ms": round(float(np.percentile(ms, 95)), 4)})
        print(f"{name:<34}{build:>9.3f}{rows[-1]['p50_ms']:>9.3f}{rows[-1]['p95_ms']:>9.3f}")
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                           "identical": same, "rows": rows})


if __name__ == "__main__":
    main()
