"""Measuring nearest-neighbour search for bench/search.py: single-query timing, recall@10, the rows it prints,
the strongest single-machine FAISS indexes as baselines on the same vectors, the p50 each method needs to reach a
recall, and the recall/latency curves as a plot.

Baselines (inner product on unit vectors, as imsrc searches; each built on every vector, then swept):
- FAISS HNSW32,Flat over efSearch;
- one global IVF with k-means lists, fp16 codes (IVF{nlist},SQfp16), over nprobe;
- compressed codes with an exact re-rank (IVF{nlist},RaBitQ,RFlat: 1-bit RaBitQ codes, 8-bit queries, the best
  k_factor x 10 candidates re-scored from full vectors), over nprobe and k_factor.
nlist is 4 x sqrt(n), FAISS's rule of thumb, trained on at most 64 points a list.
"""
import math
import time

import numpy as np

from bench.common import percentile

K = 10
HNSW_EF = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128)
RERANK = (2, 4, 8)  # k_factor: candidates re-scored per result
RECALLS = (0.95, 0.99)
QUERY_BITS = 8  # RaBitQ's query quantisation (see _rabitq)


def timed_searches(search_one, queries: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """(top-k ids per query, milliseconds per query)."""
    found, ms = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(np.asarray(search_one(q)))
        ms.append((time.perf_counter() - started) * 1000)
    return found, ms


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean share of each query's true top-k found."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def row(dataset: str, method: str, size: int, ms: list[float], found, truth, family: str | None = None,
        **extra) -> dict:
    """One printed and recorded result; `family` groups a method's settings into one curve."""
    r = {"dataset": dataset, "method": method, "family": family or method, "vectors": size, "queries": len(ms),
         "p50_ms": round(percentile(ms, 0.5), 3), "p95_ms": round(percentile(ms, 0.95), 3),
         "recall_at_10": round(recall(found, truth), 4), **extra}
    print(f"  {method:<40}{r['p50_ms']:>10.2f}{r['p95_ms']:>10.2f}{r['recall_at_10']:>9.3f}"
          + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)
    return r


def faiss_baselines(dataset: str, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, truth,
                    rss_mib) -> tuple[list[dict], list[dict]]:
    """(rows, builds) of the baselines on `vectors` (n, d) float32 whose ids are `ids`; truth: true top-k ids."""
    import faiss

    n, dim = vectors.shape
    nlist = max(1, int(4 * math.sqrt(n)))
    sample = vectors[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)] if n > 64 * nlist \
        else vectors
    rows, builds = [], []
    settings = {
        "HNSW32,Flat": [(f"efSearch={ef}", faiss.SearchParametersHNSW(efSearch=ef)) for ef in HNSW_EF],
        f"IVF{nlist},SQfp16": [(f"nprobe={p}", faiss.SearchParametersIVF(nprobe=p)) for p in NPROBE if p <= nlist],
        f"IVF{nlist},RaBitQ,RFlat": [
            (f"nprobe={p} rerank={r}x", faiss.IndexRefineSearchParameters(k_factor=r, base_index_params=_rabitq(p)))
            for p in NPROBE if 4 <= p <= nlist for r in RERANK],
    }
    for factory, sweep in settings.items():
        before, started = rss_mib(), time.perf_counter()
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(np.ascontiguousarray(sample))
        for start in range(0, n, 65536):
            index.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))
        build = {"index": factory, "vectors": n, "build_s": round(time.perf_counter() - started, 1),
                 "rss_growth_mib": round(rss_mib() - before, 1)}
        print(f"  build {build}", flush=True)
        builds.append(build)
        for label, params in sweep:
            found, ms = timed_searches(lambda q, index=index, params=params: _ids(
                ids, index.search(q[None], K, params=params)[1][0]), queries)
            rows.append(row(dataset, f"FAISS {factory} {label}", n, ms, found, truth, family=f"FAISS {factory}"))
        del index
    return rows, builds


def _rabitq(nprobe: int):
    """RaBitQ's own search parameters: given plain IVF ones, FAISS quantises the query to 4 bits (recall@10 fell
    from 0.99 to 0.84 on Fashion-MNIST vectors, and no nprobe or re-rank brought it back); 8 bits lose nothing."""
    import faiss

    params = faiss.IVFRaBitQSearchParameters()
    params.nprobe, params.qb = nprobe, QUERY_BITS
    return params


def _ids(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.where(positions >= 0, ids[positions], -1)  # FAISS marks a missing result -1


def at_recall(rows: list[dict], recalls=RECALLS) -> list[dict]:
    """Per dataset and method family: the lowest p50 among its settings that reach each recall (None: none does)."""
    families: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "recall_at_10" in r:
            families.setdefault((r["dataset"], r.get("family", r["method"])), []).append(r)
    summary = []
    for (dataset, family), members in families.items():
        entry = {"dataset": dataset, "family": family}
        for target in recalls:
            passing = [r for r in members if r["recall_at_10"] >= target]
            best = min(passing, key=lambda r: r["p50_ms"]) if passing else None
            entry[f"p50_ms_at_{target}"] = best["p50_ms"] if best else None
            entry[f"setting_at_{target}"] = best["method"] if best else None
        summary.append(entry)
    return summary


def print_at_recall(summary: list[dict], recalls=RECALLS) -> None:
    """The at_recall table: '-' where a family never reaches the recall."""
    print(f"\n  {'p50 ms at recall@10 >=':<48}" + "".join(f"{t:>10}" for t in recalls))
    for entry in summary:
        cells = "".join(f"{entry[f'p50_ms_at_{t}']:>10.2f}" if entry[f"p50_ms_at_{t}"] is not None else f"{'-':>10}"
                        for t in recalls)
        print(f"  {entry['dataset'][:14]:<15}{entry['family'][:33]:<33}{cells}")


def _frontier(members: list[dict]) -> list[dict]:
    """A family's settings that no faster one beats on recall, fastest first: a curve even where two parameters
    are swept (nprobe x re-rank)."""
    best, frontier = -1.0, []
    for r in sorted(members, key=lambda r: (r["p50_ms"], -r["recall_at_10"])):
        if r["recall_at_10"] > best:
            best = r["recall_at_10"]
            frontier.append(r)
    return frontier


def plot(rows: list[dict], path) -> None:
    """Recall@10 against p50 per method family (its frontier), one panel per dataset and one for its filtered
    searches (matplotlib, where installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no plot: pip install matplotlib)")
        return
    panels: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if "recall_at_10" in r:
            family = r.get("family", r["method"])
            panel = r["dataset"] + (" (filtered 1%)" if family.startswith("filtered") else "")
            panels.setdefault(panel, {}).setdefault(family, []).append(r)
    figure, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 6), squeeze=False)
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>pP*Xh"
    for axis, (panel, families) in zip(axes[0], sorted(panels.items())):
        for n, (family, members) in enumerate(sorted(families.items())):
            best = _frontier(members)
            axis.plot([r["p50_ms"] for r in best], [r["recall_at_10"] for r in best], marker=markers[n % len(markers)],
                      color=colours[n % len(colours)], label=family.removeprefix("filtered 1%: "))
        axis.set_xscale("log")
        axis.set_ylim(max(0.5, min(r["recall_at_10"] for m in families.values() for r in m) - 0.02), 1.005)
        axis.set_xlabel("p50 ms per single query (log)")
        axis.set_ylabel("recall@10")
        axis.set_title(panel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"  wrote {path}")
