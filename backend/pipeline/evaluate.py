"""Retrieval quality and latency of two-stage search against the exhaustive baseline, on held-out queries."""
import json
import time
from collections import Counter
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from backend.embedding.decode import decode, sha256
from backend.errors import ImsrcError
from backend.pipeline.datasets import Item
from backend.search.confidence import QUANTILE
from backend.storage.tables import Category, Image


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


@dataclass
class _Relevance:
    """How hits are judged: by category, or by the dataset's label where the categories are automatic clusters."""

    by_label: bool
    sizes: Counter | dict  # relevant images stored per category (or label)
    names: dict  # category id (or label) -> name
    truth: dict  # id(query) -> its category id (or label)
    judge: object  # SearchHits -> what each hit is, comparable with truth
    has_labels: bool


def _relevance(search, queries: list[Item], index) -> _Relevance:
    with search.sessions() as s:
        category_ids = dict(s.execute(sa.select(Category.name, Category.id).where(~Category.automatic)).all())
        # Automatic categories (clusters) are not labels: there, relevance is the dataset's label of each image.
        by_label = not any(c in category_ids.values() for c in index.categories)
        label_of = dict(s.execute(sa.select(Image.id, Image.label).where(Image.label.is_not(None)))
                        .all()) if by_label else {}
    if by_label:
        members = index.assignments()
        return _Relevance(True, Counter(label for i, label in label_of.items() if i in members),
                          {q.label: q.category for q in queries}, {id(q): q.label for q in queries},
                          lambda hits: [label_of.get(int(i)) for i in hits.ids], bool(label_of))
    return _Relevance(False, index.category_sizes(), {i: name for name, i in category_ids.items()},
                      {id(q): category_ids.get(q.category) for q in queries}, lambda hits: hits.categories, True)


def _held_out(search, queries: list[Item], relevance: _Relevance) -> list[tuple[int, Item, bytes]]:
    """(position, query, bytes) of the queries not stored in the collection whose category (or label) it has."""
    read = [(q, q.read()) for q in queries]
    digests = [sha256(data) for _, data in read]
    with search.sessions() as s:
        stored = set(s.scalars(sa.select(Image.sha256).where(Image.sha256.in_(digests))))
    held_out = [(n, q, data) for n, ((q, data), digest) in enumerate(zip(read, digests))
                if digest not in stored and relevance.truth[id(q)] in relevance.sizes]
    if not held_out and relevance.by_label and not relevance.has_labels:
        raise ImsrcError("the categories are automatic clusters and the stored images have no labels: there is "
                         "nothing to judge relevance by")
    if not held_out:
        raise ImsrcError("no usable queries: every query image is in the index, or its category is not")
    return held_out


def _summary(per_query: list[dict], labels: np.ndarray, names: dict, k: int, proto_ms, faiss_ms, agree) -> dict:
    """One configuration's means over the queries (precision, MAP and recall also per category) and latencies."""
    return {
        f"precision@{k}": round(float(np.mean([m["precision"] for m in per_query])), 4),
        f"map@{k}": round(float(np.mean([m["ap"] for m in per_query])), 4),
        f"recall@{k}": round(float(np.mean([m["recall"] for m in per_query])), 5),
        f"recall_vs_exhaustive@{k}": round(float(np.mean(agree)), 4),
        "prototype_ms": _percentiles(proto_ms), "faiss_ms": _percentiles(faiss_ms),
        f"precision@{k}_by_category": {names[c]: round(float(np.mean([m["precision"] for m, label in
                                                                    zip(per_query, labels) if label == c])), 4)
                                       for c in sorted(set(labels.tolist()))},
    }


# One function: its loop fills the per-configuration, per-query and sampled results together, in one pass over the
# queries against the exhaustive baseline it keeps; the parts that stand alone are the helpers above.
def evaluate(search, queries: list[Item], k: int = 10, prototype_limits=(1, 2, 3, 5), progress: bool = True,
             samples: int = 0, sample_config: str = "P=3") -> dict:
    """Run every configuration over the queries; returns metrics (per category too), latencies and index size,
    and with `samples`, that many queries (spread over the categories) with their hits under `sample_config`."""
    index = search.index
    relevance = _relevance(search, queries, index)
    held_out = _held_out(search, queries, relevance)
    embed_ms, vectors = [], []
    for _, _, data in tqdm(held_out, desc="embedding queries", unit="img", disable=not progress):
        started = time.perf_counter()
        vectors.append(search.embed_query(decode(data).image))
        embed_ms.append((time.perf_counter() - started) * 1000)
    vectors, bases = (np.stack(column) for column in zip(*vectors))
    labels = np.array([relevance.truth[id(q)] for _, q, _ in held_out])
    names, sizes, shown = relevance.names, relevance.sizes, _spread(labels, samples)
    threshold = search.no_match_threshold()
    flagged = [not found.close_match for vector, base in zip(vectors, bases)
               if (found := search.confidence_of(vector, base)) is not None]

    results, exhaustive_ids, sampled = {}, None, []  # configurations() puts the exhaustive baseline first
    exhaustive_spread = []  # per query: how many of the exhaustive top-k each category holds, most first
    configs = configurations(prototype_limits, len(index.categories))
    sample_config = sample_config if any(c.name == sample_config for c in configs) else "exhaustive"
    for config in configs:
        per_query, proto_ms, faiss_ms, agree, ids = [], [], [], [], []
        for qi in range(len(held_out)):
            hits = index.search(vectors[qi:qi + 1], k, top_categories=config.top_categories,
                                use_prototypes=config.use_prototypes)[0]
            judged = relevance.judge(hits)
            if config.name == sample_config and qi in shown:
                sampled.append({"query": held_out[qi][0], "category": names[labels[qi]], "config": config.name,
                                "hits": [{"image_id": int(i), "score": round(float(sc), 4),
                                          "category": names.get(j) if j is not None else None,
                                          "relevant": bool(j == labels[qi])}
                                         for i, sc, j in zip(hits.ids, hits.scores, judged)]})
            per_query.append(query_metrics(judged, labels[qi], k, sizes[labels[qi]]))
            proto_ms.append(hits.prototype_ms)
            faiss_ms.append(hits.search_ms)
            ids.append(hits.ids)
            agree.append(overlap(hits.ids, exhaustive_ids[qi]) if exhaustive_ids is not None else 1.0)
            if exhaustive_ids is None:
                exhaustive_spread.append(sorted(Counter(hits.categories.tolist()).values(), reverse=True))
        exhaustive_ids = exhaustive_ids or ids
        ceiling = {f"best_possible_recall_vs_exhaustive@{k}": round(float(np.mean(
            [sum(spread[:config.top_categories]) / max(sum(spread), 1) for spread in exhaustive_spread])), 4)} \
            if config.top_categories is not None else {}
        results[config.name] = {**ceiling, **_summary(per_query, labels, names, k, proto_ms, faiss_ms, agree)}
    return {
        "model": search.embedder.name, "index_type": index.index_type, "k": k,
        "relevance": "label (the categories are automatic clusters)" if relevance.by_label else "category",
        "indexed_images": len(index), "categories": len(index.categories),
        "queries": len(held_out), "skipped_queries": len(queries) - len(held_out),
        "index_memory_mb": round(index.nbytes() / 2**20, 2),
        "embedding_ms": _percentiles(embed_ms), "configurations": results,
        # Held-out images of the collection's own categories that "no close match" would wrongly flag.
        "confidence": {"threshold": round(threshold, 4) if threshold is not None else None, "quantile": QUANTILE,
                       "space": search.embedder.source.name,  # a derived model's is judged in its base's (BaseSpace)
                       "false_alarm_rate": round(float(np.mean(flagged)), 4) if flagged else None},
        "sample_config": sample_config, "samples": sampled,  # each "query" is its position in the queries given
    }


def _spread(labels: np.ndarray, n: int) -> set[int]:
    """Positions of n queries taken in turn from each label: a sample that shows every category."""
    by_label = [np.flatnonzero(labels == label).tolist() for label in sorted(set(labels.tolist()))]
    order = [i for row in zip_longest(*by_label) for i in row if i is not None]
    return set(order[:n])


def format_table(report: dict) -> str:
    """The report as a Markdown table, with a header line saying what was measured."""
    k = report["k"]
    lines = [f"{report['model']}, {report['index_type']} index, {report['indexed_images']} images in "
             f"{report['categories']} categories ({report['index_memory_mb']} MiB), {report['queries']} held-out "
             f"queries; embedding p50 {report['embedding_ms']['p50']:.1f} ms, p95 {report['embedding_ms']['p95']:.1f} ms"
             + ("; relevance by label (the categories are automatic clusters)"
                if report.get("relevance", "").startswith("label") else ""),
             "",
             f"| search | precision@{k} | mAP@{k} | recall@{k} | recall vs exhaustive | stage 1 p50/p95 ms | FAISS p50/p95 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["configurations"].items():
        lines.append(f"| {name} | {r[f'precision@{k}']:.4f} | {r[f'map@{k}']:.4f} | {r[f'recall@{k}']:.5f} | "
                     f"{r[f'recall_vs_exhaustive@{k}']:.4f} | {r['prototype_ms']['p50']:.3f} / "
                     f"{r['prototype_ms']['p95']:.3f} | {r['faiss_ms']['p50']:.3f} / {r['faiss_ms']['p95']:.3f} |")
    ceilings = [f"{name} {r[f'best_possible_recall_vs_exhaustive@{k}']:.4f}"
                for name, r in report["configurations"].items() if f"best_possible_recall_vs_exhaustive@{k}" in r]
    if ceilings:  # what a perfect stage 1 would keep: the exhaustive top-k spread over categories
        lines += ["", f"recall vs exhaustive that a perfect stage 1 could reach: {', '.join(ceilings)}"]
    confidence = report.get("confidence") or {}
    if confidence.get("false_alarm_rate") is not None:
        derived = confidence.get("space", report["model"]) != report["model"]
        lines += ["", f"\"no close match\" (best prototype similarity under {confidence['threshold']:.4f}, the "
                      f"{confidence['quantile']:.0%} quantile of the collection's own images"
                      f"{', in ' + confidence['space'] + ' space, over those its head was not trained on' if derived else ''}"
                      f") flags {confidence['false_alarm_rate']:.1%} of the held-out queries"]
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    """Write the report as JSON."""
    Path(path).write_text(json.dumps(report, indent=2))
