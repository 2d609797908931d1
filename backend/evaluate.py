"""Retrieval quality and latency of two-stage search against the exhaustive baseline, on held-out queries."""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from backend.datasets import Item
from backend.errors import ImsrcError
from backend.images import decode, sha256
from backend.models import Category, Image


def average_precision_at_k(relevant: np.ndarray, k: int, n_relevant: int) -> float:
    """AP@k of one ranked list: sum over hits of precision at that rank, over min(k, n_relevant)."""
    relevant = np.asarray(relevant[:k], dtype=bool)
    if n_relevant == 0:
        return 0.0
    precision_at = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    return float((precision_at * relevant).sum() / min(k, n_relevant))


def query_metrics(result_labels, query_label, k: int, n_relevant: int) -> dict[str, float]:
    """precision@k, AP@k and recall@k of one query, judged by label."""
    relevant = np.asarray(result_labels[:k]) == query_label
    hits = int(relevant.sum())
    return {"precision": hits / k, "ap": average_precision_at_k(relevant, k, n_relevant),
            "recall": hits / n_relevant if n_relevant else 0.0}


def overlap(ids, reference_ids) -> float:
    """The fraction of the reference top-k that `ids` also returns."""
    reference = set(np.asarray(reference_ids).tolist())
    return len(reference & set(np.asarray(ids).tolist())) / len(reference) if reference else 1.0


def _percentiles(values) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


@dataclass
class Config:
    """One search configuration to evaluate."""

    name: str
    use_prototypes: bool
    top_categories: int | None


def configurations(prototype_limits, n_categories: int) -> list[Config]:
    """Exhaustive, then two-stage with each P that is smaller than the number of categories, then all."""
    configs = [Config("exhaustive", False, None)]
    configs += [Config(f"P={p}", True, p) for p in prototype_limits if p < n_categories]
    return configs + [Config("P=all", True, None)]


def evaluate(search, queries: list[Item], k: int = 10, prototype_limits=(1, 2, 3, 5), progress: bool = True) -> dict:
    """Run every configuration over the queries; returns metrics, latencies and index size."""
    index = search.index
    read = [(q, q.read()) for q in queries]
    digests = [sha256(data) for _, data in read]
    with search.sessions() as s:
        category_ids = dict(s.execute(sa.select(Category.name, Category.id)).all())
        stored = set(s.scalars(sa.select(Image.sha256).where(Image.sha256.in_(digests))))
    sizes = index.category_sizes()
    held_out = [(q, data) for (q, data), digest in zip(read, digests)
                if digest not in stored and category_ids.get(q.category) in sizes]
    if not held_out:
        raise ImsrcError("no usable queries: every query image is in the index, or its category is not")

    embed_ms, vectors = [], []
    for _, data in tqdm(held_out, desc="embedding queries", unit="img", disable=not progress):
        started = time.perf_counter()
        vectors.append(search.embedder.embed([decode(data).image])[0])
        embed_ms.append((time.perf_counter() - started) * 1000)
    vectors = np.stack(vectors)
    labels = np.array([category_ids[q.category] for q, _ in held_out])

    results, exhaustive_ids = {}, None  # configurations() puts the exhaustive baseline first
    for config in configurations(prototype_limits, len(index.categories)):
        per_query, proto_ms, faiss_ms, agree, ids = [], [], [], [], []
        for qi in range(len(held_out)):
            hits = index.search(vectors[qi:qi + 1], k, top_categories=config.top_categories,
                                use_prototypes=config.use_prototypes)[0]
            per_query.append(query_metrics(hits.categories, labels[qi], k, sizes[labels[qi]]))
            proto_ms.append(hits.prototype_ms)
            faiss_ms.append(hits.search_ms)
            ids.append(hits.ids)
            agree.append(overlap(hits.ids, exhaustive_ids[qi]) if exhaustive_ids is not None else 1.0)
        exhaustive_ids = exhaustive_ids or ids
        results[config.name] = {
            f"precision@{k}": round(float(np.mean([m["precision"] for m in per_query])), 4),
            f"map@{k}": round(float(np.mean([m["ap"] for m in per_query])), 4),
            f"recall@{k}": round(float(np.mean([m["recall"] for m in per_query])), 5),
            f"recall_vs_exhaustive@{k}": round(float(np.mean(agree)), 4),
            "prototype_ms": _percentiles(proto_ms), "faiss_ms": _percentiles(faiss_ms),
        }
    return {
        "model": search.embedder.name, "index_type": index.index_type, "k": k,
        "indexed_images": len(index), "categories": len(index.categories),
        "queries": len(held_out), "skipped_queries": len(queries) - len(held_out),
        "index_memory_mb": round(index.nbytes() / 2**20, 2),
        "embedding_ms": _percentiles(embed_ms), "configurations": results,
    }


def format_table(report: dict) -> str:
    """The report as a Markdown table, with a header line saying what was measured."""
    k = report["k"]
    lines = [f"{report['model']}, {report['index_type']} index, {report['indexed_images']} images in "
             f"{report['categories']} categories ({report['index_memory_mb']} MiB), {report['queries']} held-out "
             f"queries; embedding p50 {report['embedding_ms']['p50']:.1f} ms, p95 {report['embedding_ms']['p95']:.1f} ms",
             "",
             f"| search | precision@{k} | mAP@{k} | recall@{k} | recall vs exhaustive | stage 1 p50/p95 ms | FAISS p50/p95 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["configurations"].items():
        lines.append(f"| {name} | {r[f'precision@{k}']:.4f} | {r[f'map@{k}']:.4f} | {r[f'recall@{k}']:.5f} | "
                     f"{r[f'recall_vs_exhaustive@{k}']:.4f} | {r['prototype_ms']['p50']:.3f} / "
                     f"{r['prototype_ms']['p95']:.3f} | {r['faiss_ms']['p50']:.3f} / {r['faiss_ms']['p95']:.3f} |")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    """Write the report as JSON."""
    Path(path).write_text(json.dumps(report, indent=2))
