"""Two-stage vector search, numpy in and numpy out (no SQL, no HTTP).

The collection is partitioned by category: one FAISS sub-index per category, and one prototype
vector per category. Stage 1 ranks the prototypes against the query; stage 2 searches the sub-indexes
of the top categories and merges their hits. Searching every category is the exhaustive baseline, and
with an exact index it returns exactly the brute-force result.

Each category's vectors live once, inside its FAISS index, under their image ids (no numpy copy beside it; a
compressed type keeps codes there and the full vectors on disk): adding appends to that index, deleting removes
from it (FAISS remove_ids; HNSW, which cannot remove, hides deleted ids behind a selector until a quarter of the
category is dead and then rebuilds that category).

Index types (FAISS_INDEX_TYPE), per category:
  flatip   exact inner product over float32 (the default)
  flatl2   exact L2 over float32, scored 1 / (1 + distance) as in the seed project
  fp16     exact scan over float16 codes: half the memory, and faster (less to read)
  hnsw     an HNSW graph over float32
  ivfflat  an inverted file over float32 in categories of IVF_MIN_VECTORS or more, exact below
  ivffp16  the same over float16 codes
  rabitq   an inverted file over 1-bit RaBitQ codes (a category of any size: one list below IVF_MIN_VECTORS):
           stage 1 goes on to rank the lists of the chosen categories, the best PROBE_LISTS of them are probed,
           and the best RERANK x k candidates of all are re-scored exactly from full float16 vectors on disk
           (VectorStore): about d / 8 + 30 bytes of RAM per vector, a tenth of fp16's
Scores are comparable across index types, and higher is always more similar: cosine similarity for the
inner-product types (the vectors are L2-normalised), 1 / (1 + Euclidean distance) for flatl2.
"""
import time
from collections.abc import Iterator

import faiss
import numpy as np

from backend.search.hits import Hits
from backend.search.id_map import IdMap
from backend.search.partition import (FILTERED_RERANK, INDEX_KINDS, INDEX_TYPES, RERANK, Partition, Selection,
                                      check_matrix)
from backend.search.vector_store import VectorStore

# A compressed type's search: the inverted lists it probes per query, across the categories stage 1 chose (with
# partition.RERANK, the candidates per result it re-scores). On 180,000 Fashion-MNIST vectors (1,340 lists, P=5) 32
# and 8 gave recall@10 0.987 (bench/search.py sweeps both).
PROBE_LISTS = 32
# A compressed type's pre-filter scores all its matches from their full vectors, exactly, unless ranking them by
# code is cheaper: that scans every list of every category holding one, and a list so scanned cost about as much
# as scoring this many float16 values exactly (measured on 1M and 2M x 2048 in 100 categories, 1% filters: 7.3
# and 6.1 us a list by code, all in; 0.77 ns a value exactly: 15.7 ms for 10,000 matches against 28.4 by code).
LIST_COST_IN_VALUES = 8192


class CategoryIndex:
    """Category prototypes plus one FAISS sub-index per category; see the module docstring."""

    def __init__(self, dim: int, index_type: str = "flatip", folder=None):
        """`folder`: where a compressed type's full vectors are written as they are added (default: the system's
        temporary folder)."""
        if index_type not in INDEX_KINDS:
            raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        self.dim, self.index_type, self.kind = dim, index_type, INDEX_KINDS[index_type]
        self.store = VectorStore(dim, folder) if self.kind.rerank else None
        self.probe_lists, self.rerank = PROBE_LISTS, RERANK  # a compressed type's search settings (see above)
        self._partitions: dict[int, Partition] = {}
        self._prototypes: dict[int, np.ndarray] = {}  # category -> its prototypes (p, d), p >= 1
        self._stacked = None  # every prototype in one matrix, for stage 1; made again after a change
        self._category_of = IdMap()  # image id -> its category

    # -- contents ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._category_of)

    @property
    def categories(self) -> list[int]:
        """Category ids that have a prototype, sorted."""
        return sorted(self._prototypes)

    def category_sizes(self) -> dict[int, int]:
        """Vectors per category."""
        return {c: len(p) for c, p in self._partitions.items() if len(p)}

    def ids(self) -> np.ndarray:
        """All image ids in the index, sorted."""
        return self._category_of.keys()

    def assignments(self) -> dict[int, int]:
        """image id -> category id of every image held (a copy)."""
        return dict(zip(*(part.tolist() for part in self._category_of.items())))

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._category_of

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray, optimise: bool = True) -> None:
        """Add images (n,) with vectors (n, d) and category ids (n,); an id already present is replaced.
        optimise=False leaves re-clustering the IVF types to optimise(), for loading in many batches."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vectors = check_matrix(vectors, self.dim, "vectors")
        categories = np.asarray(categories, dtype=np.int64).ravel()
        if not len(ids) == len(vectors) == len(categories):
            raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(categories)} categories")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        self.remove(ids)
        for cat in np.unique(categories).tolist():
            mask = categories == cat
            if (part := self._partitions.get(cat)) is None:
                part = self._partitions[cat] = Partition(self.dim, self.kind, store=self.store)
            part.add(ids[mask], vectors[mask])
            if optimise:
                part.optimise()
        self._category_of.set(ids, categories)

    def optimise(self) -> None:
        """Give every category the structure its size calls for (after add(..., optimise=False))."""
        for part in self._partitions.values():
            part.optimise()
            if self.store is not None:  # a compressed category's rebuild read its full vectors: a million 2048-d
                self.store.release_pages()  # ones left 4.4 GB of their file's pages in this process's RSS
        if self.store is not None:
            self.store.seal()

    def remove(self, ids) -> int:
        """Remove images by id; returns how many were present."""
        ids, cats = self._category_of.remove(ids)
        for c in np.unique(cats).tolist():
            part = self._partitions[c]
            part.remove(ids[cats == c])
            if not len(part):
                del self._partitions[c]
            else:
                part.optimise()
        return len(ids)

    def set_prototypes(self, categories, vectors: np.ndarray) -> None:
        """Set (or replace) the prototypes (p, d) of the given categories; a category with several prototypes is
        given once per prototype, and all of them replace what it had."""
        vectors = check_matrix(vectors, self.dim, "prototypes")
        categories = np.asarray(categories, dtype=np.int64)
        if len(categories) != len(vectors):
            raise ValueError(f"{len(categories)} prototype categories for {len(vectors)} prototypes")
        for cat in np.unique(categories).tolist():
            self._prototypes[cat] = vectors[categories == cat]
        self._stacked = None

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """(category ids (p,), prototype vectors (p, d)), by category id; a category once per prototype."""
        cats = self.categories
        if not cats:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return (np.repeat(np.array(cats, dtype=np.int64), [len(self._prototypes[c]) for c in cats]),
                np.concatenate([self._prototypes[c] for c in cats]))

    def category_similarities(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(category ids (c,), each vector's similarity to each category (n, c)): to its closest prototype."""
        if self._stacked is None:
            cats, rows = self.prototypes()
            starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]]) if len(cats) else cats
            self._stacked = (cats[starts], np.ascontiguousarray(rows.T), starts)
        cats, columns, starts = self._stacked
        if not len(cats):
            return cats, np.zeros((len(vectors), 0), np.float32)
        sims = vectors @ columns
        return cats, sims if len(starts) == sims.shape[1] else np.maximum.reduceat(sims, starts, axis=1)

    def members(self) -> Iterator[tuple[int, np.ndarray]]:
        """(category, image ids (n,)) of each non-empty category, by category id."""
        for c in sorted(self._partitions):
            yield c, self._partitions[c].ids()

    def partitions(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(category, ids (n,), vectors (n, d)) of each non-empty category, by category id: copies, decoded from the
        index's codes, one category at a time."""
        for c in sorted(self._partitions):
            yield c, *self._partitions[c].contents()

    def sample(self, per_category: int, seed: int = 0) -> Iterator[tuple[int, np.ndarray, int]]:
        """(category, up to `per_category` of its vectors at random (m, d), its size) of each category: a cheap look
        at what the collection holds (the whole category when it is that small)."""
        rng = np.random.default_rng(seed)
        for c in sorted(self._partitions):
            part = self._partitions[c]
            yield c, part.sample(per_category, rng), len(part)

    def stored_partitions(self) -> list[tuple[int, faiss.Index | np.ndarray]]:
        """(category, its FAISS index or the snapshot bytes it still reads) of each category, by id: what a snapshot
        writes."""
        return [(c, self._partitions[c].stored()) for c in sorted(self._partitions)]

    def drop_prototypes(self, categories) -> None:
        """Forget the prototypes of categories that no longer have members."""
        for cat in categories:
            self._prototypes.pop(int(cat), None)
        self._stacked = None

    def nbytes(self) -> int:
        """Memory held by codes, ids and FAISS structures, in bytes (a compressed type's vectors on disk not)."""
        return sum(p.nbytes() for p in self._partitions.values()) + sum(p.nbytes for p in self._prototypes.values()) \
            + (self.store.nbytes() if self.store is not None else 0)

    @classmethod
    def from_stored(cls, dim: int, index_type: str, partitions: dict[int, np.ndarray], prototype_categories,
                    prototypes: np.ndarray, vectors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                    folder=None) -> "CategoryIndex":
        """The inverse of stored_partitions: each category's FAISS bytes (read in place, without a copy, until the
        category changes; the caller keeps them valid), and for a compressed type `vectors`, each category's
        (ids, float16 rows) as the snapshot holds them (read in place too). Raises ValueError on parts that do not
        fit together."""
        index = cls(dim, index_type, folder)
        for c, blob in partitions.items():
            try:
                faiss_index = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(blob), blob.size))
            except RuntimeError as exc:
                raise ValueError(f"category {c}: FAISS cannot read it ({str(exc).splitlines()[0][:200]})") from None
            if faiss_index.d != dim or not isinstance(faiss_index, (faiss.IndexIDMap, faiss.IndexIVF)):
                raise ValueError(f"category {c}: a {faiss_index.d}-d {type(faiss_index).__name__}, expected a "
                                 f"{dim}-d {index_type} index")
            part = Partition(dim, index.kind, faiss_index, blob, index.store)
            ids = part.ids()
            if index.store is not None:
                stored_ids, rows = (vectors or {}).get(c, (None, None))
                if stored_ids is None or not np.array_equal(np.sort(stored_ids), np.sort(ids)):
                    raise ValueError(f"category {c}: its full vectors are missing or for other images")
                index.store.add_source(stored_ids, rows)
            known = len(index._category_of)
            index._category_of.set(ids, np.full(len(ids), c))
            if len(index._category_of) != known + len(ids):
                raise ValueError(f"category {c} repeats an image id")
            if len(ids):
                index._partitions[c] = part
        if index.store is not None:
            index.store.seal()
        index.set_prototypes(prototype_categories, prototypes)
        return index

    # -- search -----------------------------------------------------------------------------------
    def rank_prototypes(self, queries: np.ndarray, categories=None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (category ids (nq, c), cosine similarities (nq, c)), best first, among `categories`; a category
        with several prototypes counts by its closest."""
        queries = check_matrix(queries, self.dim, "queries")
        cats, sims = self.category_similarities(queries)
        if categories is not None:
            keep = np.isin(cats, np.asarray(list(categories), dtype=np.int64))
            cats, sims = cats[keep], sims[:, keep]
        if not len(cats):
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        order = np.lexsort((np.broadcast_to(cats, sims.shape), -sims), axis=1)  # ties: lower id first
        return cats[order], np.take_along_axis(sims, order, axis=1)

    def neighbours(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, k), scores (n, k)) of each vector's k nearest stored images across every category, best first (-1
        ids where fewer exist): one batched FAISS search per category."""
        vectors = check_matrix(vectors, self.dim, "vectors")
        found = [part.search(vectors, k) for part in self._partitions.values()]
        if not found:
            return np.full((len(vectors), 0), -1, np.int64), np.zeros((len(vectors), 0), np.float32)
        ids, scores = np.concatenate([f[0] for f in found], axis=1), np.concatenate([f[1] for f in found], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(ids, best, axis=1), np.take_along_axis(scores, best, axis=1)

    def search(self, queries: np.ndarray, k: int, top_categories: int | None = 3, use_prototypes: bool = True,
               categories=None, among: np.ndarray | None = None, rerank: int | None = None) -> list[Hits]:
        """Top-k per query. use_prototypes: only the `top_categories` best-matching categories (None: all);
        else every category (the exhaustive baseline). `categories` restricts either to those ids, and `among` to
        those image ids (a pre-filter: stage 1 ranks only the categories holding some, and stage 2 is exact among
        them). `rerank`: a compressed type's candidates re-scored per result (None: the index's own)."""
        queries = check_matrix(queries, self.dim, "queries")
        if k < 1:
            raise ValueError("k must be at least 1")
        if top_categories is not None and top_categories < 1:
            raise ValueError("top_categories must be at least 1")
        if rerank is not None and rerank < 1:
            raise ValueError("rerank must be at least 1")
        allowed = list(self._partitions) if categories is None else \
            [int(c) for c in categories if int(c) in self._partitions]
        selections = None
        if among is not None:
            selections = self._selections(among)
            allowed = [c for c in allowed if c in selections]
        started = time.perf_counter()
        if use_prototypes:
            ranked_cats, ranked_sims = self.rank_prototypes(queries, allowed)
        prototype_ms = (time.perf_counter() - started) * 1000 / len(queries)
        results = []
        for q in range(len(queries)):
            ranking = list(zip(ranked_cats[q].tolist(), ranked_sims[q].tolist())) if use_prototypes else []
            chosen = [c for c, _ in ranking[:top_categories]] if use_prototypes else sorted(allowed)
            started = time.perf_counter()
            hits = self._search_partitions(queries[q:q + 1], k, chosen, ranking, selections, rerank or self.rerank)
            hits.prototype_ms, hits.search_ms = prototype_ms, (time.perf_counter() - started) * 1000
            results.append(hits)
        return results

    def _candidates(self, query: np.ndarray, count: int, chosen: list[int],
                    selections: dict[int, Selection] | None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """A compressed type's (category, candidate ids, estimated scores): with a pre-filter, each category's best
        matches by code; else from the `probe_lists` inverted lists, among all of the chosen categories' lists,
        whose centres are closest to the query: stage 1 goes on from categories to lists, as one inverted file's
        coarse quantizer would, so probes go where the neighbours are rather than a share to each category."""
        if selections is not None:
            return [(c, *(found[0] for found in self._partitions[c].candidates(query, count, selections[c])))
                    for c in chosen]
        if not chosen:
            return []
        blocks = [self._partitions[c].centroids() @ query[0] for c in chosen]
        sims = np.concatenate(blocks)
        owner = np.repeat(np.arange(len(chosen)), [len(b) for b in blocks])
        local = np.concatenate([np.arange(len(b)) for b in blocks])
        probes = self.probe_lists
        top = np.argpartition(-sims, probes)[:probes] if len(sims) > probes else np.arange(len(sims))
        found = []
        for position in np.unique(owner[top]).tolist():
            probed = top[owner[top] == position]
            c = chosen[position]
            found.append((c, *self._partitions[c].candidates_in(query, count, local[probed], sims[probed])))
        return found

    def _selections(self, among) -> dict[int, Selection]:
        """A pre-filter's ids by the category holding them (ids not in the index left out)."""
        among = np.asarray(among, np.int64).ravel()
        if len(among) > 1 and not bool((among[1:] > among[:-1]).all()):  # a filter's ids mostly come sorted
            among = np.unique(among)
        cats = self._category_of.get(among)
        order = np.argsort(cats, kind="stable")
        cats, among = cats[order], among[order]
        starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]]) if len(cats) else np.zeros(0, np.int64)
        whole = Selection(among[cats >= 0])
        return {int(cats[a]): Selection(ids, whole) for a, ids in zip(starts, np.split(among, starts[1:]))
                if cats[a] >= 0}

    def _scored_matches(self, query: np.ndarray, chosen: list[int],
                        selections: dict[int, Selection]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """A compressed type's (category, ids, exact scores) of every pre-filter match in the chosen categories,
        each scored from its full vector."""
        parts = [selections[c].ids for c in chosen]
        if not parts:
            return []
        scores = np.split(self.store.scores(np.concatenate(parts), query[0]), np.cumsum([len(p) for p in parts])[:-1])
        return list(zip(chosen, parts, scores))

    def _search_partitions(self, query: np.ndarray, k: int, chosen: list[int], ranking,
                           selections: dict[int, Selection] | None, rerank: int) -> Hits:
        ids, scores, cats = [], [], []
        # A compressed type's categories give estimates, and the best rerank x k of all of them (more for a
        # pre-filter) are re-scored at once: re-scoring within each category would read that many per category.
        estimated = self.kind.rerank
        wanted = k * rerank * (FILTERED_RERANK if selections else 1)
        if estimated and selections is not None and sum(len(selections[c].ids) for c in chosen) * self.dim <= \
                LIST_COST_IN_VALUES * sum(self._partitions[c].lists() for c in chosen):
            found, estimated = self._scored_matches(query, chosen, selections), False
        elif estimated:
            found = self._candidates(query, wanted, chosen, selections)
        else:
            found = [(c, *(r[0] for r in self._partitions[c].search(query, k, selections[c] if selections else None)))
                     for c in chosen]
        for c, part_ids, part_scores in found:
            ids.append(part_ids)
            scores.append(part_scores)
            cats.append(np.full(len(part_ids), c, dtype=np.int64))
        if not ids:
            empty = np.zeros(0, np.int64)
            return Hits(empty, np.zeros(0, np.float32), empty, ranking, chosen)
        ids, scores, cats = np.concatenate(ids), np.concatenate(scores), np.concatenate(cats)
        valid = ids >= 0
        ids, scores, cats = ids[valid], scores[valid], cats[valid]
        if estimated:
            keep = np.argsort(-scores, kind="stable")[:wanted]
            ids, cats = ids[keep], cats[keep]
            scores = self.store.scores(ids, query[0])
        best = np.lexsort((ids, -scores))[:k]  # score descending, ties by id: independent of build order
        return Hits(ids[best], scores[best], cats[best], ranking, chosen)
