"""Two-stage vector search, numpy in and numpy out (no SQL, no HTTP).

The collection is partitioned by category: one FAISS sub-index per category, and one prototype
vector per category. Stage 1 ranks the prototypes against the query; stage 2 searches the sub-indexes
of the top categories and merges their hits. Searching every category is the exhaustive baseline, and
with an exact index it returns exactly the brute-force result.

Scores are comparable across index types, and higher is always more similar:
cosine similarity for inner-product indexes (flat IP, HNSW, IVF; the vectors are L2-normalised), and
1 / (1 + Euclidean distance) for the flat L2 index, as in the seed project.
"""
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np

INDEX_TYPES = ("flatip", "flatl2", "hnsw", "ivfflat")
HNSW_M = 32  # graph degree: FAISS's usual default for high-dimensional float vectors
HNSW_EF_SEARCH = 128
IVF_MIN_VECTORS = 1000  # smaller categories gain nothing from IVF: they are scanned exactly
IVF_NPROBE = 8


def _check_matrix(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"{what} must have shape (n, {dim}), got {vectors.shape}")
    return np.ascontiguousarray(vectors)


@dataclass
class Hits:
    """One query's answer: image ids, scores and categories, best first, and the prototype ranking used."""

    ids: np.ndarray  # int64 (m,)
    scores: np.ndarray  # float32 (m,)
    categories: np.ndarray  # int64 (m,)
    prototype_ranking: list[tuple[int, float]] = field(default_factory=list)  # (category, similarity), best first
    searched_categories: list[int] = field(default_factory=list)
    prototype_ms: float = 0.0  # stage 1 time, per query
    search_ms: float = 0.0  # stage 2 (FAISS) time, this query


class _Partition:
    """The images of one category: their ids and vectors, and a FAISS index built from them on demand."""

    def __init__(self, dim: int, index_type: str):
        self.dim, self.index_type = dim, index_type
        self.ids = np.zeros(0, dtype=np.int64)
        self.vectors = np.zeros((0, dim), dtype=np.float32)
        self._index: faiss.Index | None = None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, ids])
        self.vectors = np.concatenate([self.vectors, vectors])
        if self._index is not None and self._index.is_trained:
            self._index.add(vectors)  # internal ids are positions in self.ids
        else:
            self._index = None

    def remove(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self.ids, ids)
        removed = int((~keep).sum())
        if removed:
            self.ids, self.vectors = self.ids[keep], self.vectors[keep]
            self._index = None  # positions moved: rebuilt on the next search
        return removed

    def index(self) -> faiss.Index:
        if self._index is None:
            self._index = self._build()
        return self._index

    def _build(self) -> faiss.Index:
        n, d = len(self.ids), self.dim
        if self.index_type == "flatl2":
            index = faiss.IndexFlatL2(d)
        elif self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.index_type == "ivfflat" and n >= IVF_MIN_VECTORS:
            nlist = int(np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(self.vectors)
            index.nprobe = IVF_NPROBE
        else:
            index = faiss.IndexFlatIP(d)
        index.add(self.vectors)
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (nq, k'), k' = min(k, size); scores higher-is-better."""
        k = min(k, len(self.ids))
        raw, positions = self.index().search(queries, k)
        scores = 1.0 / (1.0 + np.sqrt(np.maximum(raw, 0))) if self.index_type == "flatl2" else raw
        valid = positions >= 0  # FAISS pads with -1 when an approximate index finds fewer than k
        ids = np.where(valid, self.ids[np.where(valid, positions, 0)], -1)
        return ids, np.where(valid, scores, -np.inf).astype(np.float32)

    def nbytes(self) -> int:
        index_bytes = faiss.serialize_index(self.index()).nbytes if len(self.ids) else 0
        return self.ids.nbytes + self.vectors.nbytes + int(index_bytes)


class CategoryIndex:
    """Category prototypes plus one FAISS sub-index per category; see the module docstring."""

    def __init__(self, dim: int, index_type: str = "flatip"):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        self.dim, self.index_type = dim, index_type
        self._partitions: dict[int, _Partition] = {}
        self._prototypes: dict[int, np.ndarray] = {}
        self._category_of: dict[int, int] = {}

    # -- contents ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._category_of)

    @property
    def categories(self) -> list[int]:
        """Category ids that have a prototype, sorted."""
        return sorted(self._prototypes)

    def category_sizes(self) -> dict[int, int]:
        """Vectors per category."""
        return {c: len(p.ids) for c, p in self._partitions.items() if len(p.ids)}

    def ids(self) -> np.ndarray:
        """All image ids in the index, sorted."""
        return np.array(sorted(self._category_of), dtype=np.int64)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._category_of

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray) -> None:
        """Add images (n,) with vectors (n, d) and category ids (n,); an id already present is replaced."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vectors = _check_matrix(vectors, self.dim, "vectors")
        categories = np.asarray(categories, dtype=np.int64).ravel()
        if not len(ids) == len(vectors) == len(categories):
            raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(categories)} categories")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        self.remove([i for i in ids.tolist() if i in self._category_of])
        for cat in np.unique(categories).tolist():
            mask = categories == cat
            self._partitions.setdefault(cat, _Partition(self.dim, self.index_type)).add(ids[mask], vectors[mask])
        self._category_of.update(zip(ids.tolist(), categories.tolist()))

    def remove(self, ids) -> int:
        """Remove images by id; returns how many were present."""
        by_cat: dict[int, list[int]] = {}
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if i in self._category_of:
                by_cat.setdefault(self._category_of.pop(i), []).append(i)
        return sum(self._partitions[c].remove(np.array(v, dtype=np.int64)) for c, v in by_cat.items())

    def set_prototypes(self, categories, vectors: np.ndarray) -> None:
        """Set (or replace) the prototypes (c, d) of the given categories."""
        vectors = _check_matrix(vectors, self.dim, "prototypes")
        for cat, vec in zip(np.asarray(categories, dtype=np.int64).tolist(), vectors):
            self._prototypes[cat] = vec

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """(category ids (c,), prototype vectors (c, d)), by category id."""
        cats = self.categories
        vectors = np.stack([self._prototypes[c] for c in cats]) if cats else np.zeros((0, self.dim), np.float32)
        return np.array(cats, dtype=np.int64), vectors

    def partitions(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(category, ids (n,), vectors (n, d)) of each non-empty category, by category id; not copies: read only."""
        for c in sorted(self._partitions):
            part = self._partitions[c]
            if len(part.ids):
                yield c, part.ids, part.vectors

    def drop_prototypes(self, categories) -> None:
        """Forget the prototypes of categories that no longer have members."""
        for cat in categories:
            self._prototypes.pop(int(cat), None)

    def nbytes(self) -> int:
        """Memory held by vectors, ids and FAISS structures, in bytes."""
        return sum(p.nbytes() for p in self._partitions.values()) + len(self._prototypes) * self.dim * 4

    # -- search -----------------------------------------------------------------------------------
    def rank_prototypes(self, queries: np.ndarray, categories=None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (category ids (nq, c), cosine similarities (nq, c)), best first, among `categories`."""
        queries = _check_matrix(queries, self.dim, "queries")
        cats = np.array(self.categories if categories is None else
                        [c for c in categories if c in self._prototypes], dtype=np.int64)
        if not len(cats):
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        sims = queries @ np.stack([self._prototypes[c] for c in cats]).T
        order = np.lexsort((np.broadcast_to(cats, sims.shape), -sims), axis=1)  # ties: lower id first
        return cats[order], np.take_along_axis(sims, order, axis=1)

    def search(self, queries: np.ndarray, k: int, top_categories: int | None = 3, use_prototypes: bool = True,
               categories=None) -> list[Hits]:
        """Top-k per query. use_prototypes: only the `top_categories` best-matching categories (None: all);
        else every category (the exhaustive baseline). `categories` restricts either to those ids."""
        queries = _check_matrix(queries, self.dim, "queries")
        if k < 1:
            raise ValueError("k must be at least 1")
        if top_categories is not None and top_categories < 1:
            raise ValueError("top_categories must be at least 1")
        allowed = [c for c in self._partitions if len(self._partitions[c].ids)] if categories is None else \
            [int(c) for c in categories if int(c) in self._partitions and len(self._partitions[int(c)].ids)]
        started = time.perf_counter()
        if use_prototypes:
            ranked_cats, ranked_sims = self.rank_prototypes(queries, allowed)
        prototype_ms = (time.perf_counter() - started) * 1000 / len(queries)
        results = []
        for q in range(len(queries)):
            ranking = list(zip(ranked_cats[q].tolist(), ranked_sims[q].tolist())) if use_prototypes else []
            chosen = [c for c, _ in ranking[:top_categories]] if use_prototypes else sorted(allowed)
            started = time.perf_counter()
            hits = self._search_partitions(queries[q:q + 1], k, chosen, ranking)
            hits.prototype_ms, hits.search_ms = prototype_ms, (time.perf_counter() - started) * 1000
            results.append(hits)
        return results

    def _search_partitions(self, query: np.ndarray, k: int, chosen: list[int], ranking) -> Hits:
        ids, scores, cats = [], [], []
        for c in chosen:
            part_ids, part_scores = self._partitions[c].search(query, k)
            ids.append(part_ids[0])
            scores.append(part_scores[0])
            cats.append(np.full(len(part_ids[0]), c, dtype=np.int64))
        if not ids:
            empty = np.zeros(0, np.int64)
            return Hits(empty, np.zeros(0, np.float32), empty, ranking, chosen)
        ids, scores, cats = np.concatenate(ids), np.concatenate(scores), np.concatenate(cats)
        valid = ids >= 0
        ids, scores, cats = ids[valid], scores[valid], cats[valid]
        best = np.lexsort((ids, -scores))[:k]  # score descending, ties by id: independent of build order
        return Hits(ids[best], scores[best], cats[best], ranking, chosen)


def index_state(index: CategoryIndex) -> dict[str, np.ndarray]:
    """Everything needed to restore an index, as numpy arrays (FAISS structures serialised)."""
    cats = sorted(c for c, p in index._partitions.items() if len(p.ids))
    proto_cats, protos = index.prototypes()
    state = {
        "dim": np.array(index.dim, dtype=np.int64), "index_type": np.array(index.index_type),
        "partition_categories": np.array(cats, dtype=np.int64),
        "prototype_categories": proto_cats, "prototypes": protos,
    }
    for c in cats:
        part = index._partitions[c]
        state[f"ids_{c}"], state[f"vectors_{c}"] = part.ids, part.vectors
        state[f"faiss_{c}"] = faiss.serialize_index(part.index())
    return state


def index_from_state(state) -> CategoryIndex:
    """The inverse of index_state; raises ValueError (or KeyError) on a state whose parts do not fit together,
    so a damaged snapshot is refused rather than served."""
    index = CategoryIndex(int(_state_array(state, "dim", "i", 0)), str(_state_array(state, "index_type", "U", 0)))
    partition_categories = _state_array(state, "partition_categories", "i", 1).tolist()
    if len(set(partition_categories)) != len(partition_categories):
        raise ValueError("partition_categories has duplicates")
    for c in partition_categories:
        part = _Partition(index.dim, index.index_type)
        part.ids = _state_array(state, f"ids_{c}", "i", 1).astype(np.int64, copy=False)
        part.vectors = _state_array(state, f"vectors_{c}", "f", 2).astype(np.float32, copy=False)
        if part.vectors.shape != (len(part.ids), index.dim):
            raise ValueError(f"vectors_{c} has shape {part.vectors.shape}, expected ({len(part.ids)}, {index.dim})")
        # The FAISS structure is searched, the arrays are not: both must describe the same vectors.
        part._index = faiss.deserialize_index(_state_array(state, f"faiss_{c}", "u", 1))
        if (part._index.ntotal, part._index.d) != (len(part.ids), index.dim):
            raise ValueError(f"faiss_{c} holds {part._index.ntotal} {part._index.d}-d vectors, "
                             f"expected {len(part.ids)} {index.dim}-d")
        known = len(index._category_of)
        index._category_of.update((i, c) for i in part.ids.tolist())
        if len(index._category_of) != known + len(part.ids):
            raise ValueError(f"ids_{c} repeats an image id")
        index._partitions[c] = part
    proto_cats = _state_array(state, "prototype_categories", "i", 1)
    protos = _state_array(state, "prototypes", "f", 2)
    if protos.shape != (len(proto_cats), index.dim) or len(np.unique(proto_cats)) != len(proto_cats):
        raise ValueError(f"{len(proto_cats)} prototype categories (unique: {len(np.unique(proto_cats))}) "
                         f"and prototypes of shape {protos.shape}")
    index.set_prototypes(proto_cats, protos)
    return index


def _state_array(state, key: str, kind: str, ndim: int) -> np.ndarray:
    """state[key], refused unless it is an ndim-d array of the dtype kind ('i' int, 'u' uint, 'f' float, 'U' str)."""
    value = state[key]
    if not isinstance(value, np.ndarray) or value.dtype.kind != kind or value.ndim != ndim:
        raise ValueError(f"{key} is {getattr(value, 'dtype', type(value).__name__)} of shape "
                         f"{getattr(value, 'shape', '?')}, expected a {ndim}-d array of kind {kind!r}")
    return value
