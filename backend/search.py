"""Two-stage vector search, numpy in and numpy out (no SQL, no HTTP).

The collection is partitioned by category: one FAISS sub-index per category, and one prototype
vector per category. Stage 1 ranks the prototypes against the query; stage 2 searches the sub-indexes
of the top categories and merges their hits. Searching every category is the exhaustive baseline, and
with an exact index it returns exactly the brute-force result.

Each category's vectors live once, inside its FAISS index, under their image ids (no numpy copy beside it):
adding appends to that index, deleting removes from it (FAISS remove_ids; HNSW, which cannot remove, hides
deleted ids behind a selector until a quarter of the category is dead and then rebuilds that category).

Index types (FAISS_INDEX_TYPE), per category:
  flatip   exact inner product over float32 (the default)
  flatl2   exact L2 over float32, scored 1 / (1 + distance) as in the seed project
  fp16     exact scan over float16 codes: half the memory, and faster (less to read)
  hnsw     an HNSW graph over float32
  ivfflat  an inverted file over float32 in categories of IVF_MIN_VECTORS or more, exact below
  ivffp16  the same over float16 codes
Scores are comparable across index types, and higher is always more similar: cosine similarity for the
inner-product types (the vectors are L2-normalised), 1 / (1 + Euclidean distance) for flatl2.
"""
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

HNSW_M = 32  # graph degree: FAISS's usual default for high-dimensional float vectors
HNSW_EF_SEARCH = 128
HIDDEN_LIMIT = 0.25  # an HNSW category is rebuilt once this share of it is deleted-but-hidden
IVF_MIN_VECTORS = 1000  # smaller categories gain nothing from IVF: they are scanned exactly
IVF_PROBE_SHARE = 1 / 8  # lists probed per query; on Fashion-MNIST vectors 1/8 of the lists gives recall@10 0.99
IVF_MIN_PROBES = 8  # ... and never fewer than this: a small category's few lists each hold much of it
IVF_POINTS_PER_LIST = 39  # FAISS's k-means wants at least this many training points per centroid
FP16_TOLERANCE = 1e-3  # float16 keeps 11 significant bits: a unit vector's components come back within 2**-11


@dataclass(frozen=True)
class IndexKind:
    """How one FAISS_INDEX_TYPE stores and searches a category."""

    codes: str  # FAISS factory string of a category's storage
    metric: int = faiss.METRIC_INNER_PRODUCT
    ivf: bool = False  # categories of IVF_MIN_VECTORS or more get an inverted file over these codes
    removable: bool = True  # FAISS removes ids from it; else deletions stay hidden until the category is rebuilt
    tolerance: float = 1e-6  # how far a vector read back from the index may be from the one added


INDEX_KINDS = {
    "flatip": IndexKind("Flat"),
    "flatl2": IndexKind("Flat", metric=faiss.METRIC_L2),
    "fp16": IndexKind("SQfp16", tolerance=FP16_TOLERANCE),
    "hnsw": IndexKind(f"HNSW{HNSW_M},Flat", removable=False),
    "ivfflat": IndexKind("Flat", ivf=True),
    "ivffp16": IndexKind("SQfp16", ivf=True, tolerance=FP16_TOLERANCE),
}
INDEX_TYPES = tuple(INDEX_KINDS)


def _check_matrix(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"{what} must have shape (n, {dim}), got {vectors.shape}")
    return np.ascontiguousarray(vectors)


def ivf_lists(n: int, current: int) -> int:
    """Inverted lists for a category of n vectors that has `current` (0: none, scanned exactly): about sqrt(n) from
    IVF_MIN_VECTORS on (fewer where k-means would have too few points per list), kept until n has moved 4-fold so that a growing category is re-clustered only now and then."""
    if n < IVF_MIN_VECTORS:
        return current if current and n >= IVF_MIN_VECTORS // 2 else 0
    target = max(1, min(round(math.sqrt(n)), n // IVF_POINTS_PER_LIST))
    return current if current and target / 2 <= current <= target * 2 else target


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
    """The images of one category: their vectors, held by one FAISS index under their image ids."""

    def __init__(self, dim: int, kind: IndexKind, index: faiss.Index | None = None, source: np.ndarray | None = None):
        self.dim, self.kind = dim, kind
        self.index = index if index is not None else self._build(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        # The snapshot bytes a loaded index still reads its codes from; it gets its own copy before any change.
        self._source = source
        self.hidden: set[int] = set()  # deleted from an index that cannot remove ids; filtered out of every search
        self._params = None

    def __len__(self) -> int:
        return self.index.ntotal - len(self.hidden)

    # -- changes ----------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._own()
        if self.hidden and not self.hidden.isdisjoint(ids.tolist()):
            self._rebuild()  # else a hidden copy of a re-added id would hide the new one too
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if self.kind.removable:
            self._own()
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        self.hidden.update(ids.tolist())
        self._params = None
        if len(self.hidden) > HIDDEN_LIMIT * self.index.ntotal:
            self._rebuild()

    def optimise(self) -> None:
        """Give a category of the IVF types the inverted file its size calls for (see ivf_lists)."""
        if self.kind.ivf and ivf_lists(len(self), self.lists()) != self.lists():
            self._rebuild()

    def _own(self) -> None:
        if self._source is not None:
            self.index, self._source = faiss.deserialize_index(self._source), None

    def _rebuild(self) -> None:
        ids, vectors = self.contents()
        self.index, self._source, self.hidden, self._params = self._build(ids, vectors), None, set(), None

    def _build(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        lists = ivf_lists(len(ids), 0) if self.kind.ivf else 0
        if lists:
            index = faiss.index_factory(self.dim, f"IVF{lists},{self.kind.codes}", self.kind.metric)
            index.by_residual = False  # codes of the vectors themselves: exact float16, and decodable on their own
            index.train(vectors)
            index.nprobe = min(lists, max(IVF_MIN_PROBES, math.ceil(lists * IVF_PROBE_SHARE)))
        else:
            index = faiss.index_factory(self.dim, f"IDMap,{self.kind.codes}", self.kind.metric)
        index.add_with_ids(vectors, ids)
        return index

    # -- contents ---------------------------------------------------------------------------------
    def _ivf(self):
        return self.index if isinstance(self.index, faiss.IndexIVF) else None  # FAISS hands back the subclass

    def lists(self) -> int:
        """Inverted lists in use; 0 when the category is scanned or walked without them."""
        ivf = self._ivf()
        return ivf.nlist if ivf is not None else 0

    def ids(self) -> np.ndarray:
        """Image ids held (hidden ones left out)."""
        ivf = self._ivf()
        if ivf is None:
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        else:
            ids = np.concatenate([np.zeros(0, np.int64)] + [get_invlist(ivf.invlists, i)[0].astype(np.int64)
                                                            for i in range(ivf.nlist)])
        return ids[~np.isin(ids, list(self.hidden))] if self.hidden else ids

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, d)) held, decoded from the index's codes: copies (hidden ones left out)."""
        ivf = self._ivf()
        if ivf is None:
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            vectors = faiss.downcast_index(self.index.index).reconstruct_n(0, len(ids)) if len(ids) else \
                np.zeros((0, self.dim), np.float32)
        else:
            ids, vectors = self._lists(range(ivf.nlist))
        return self._visible(ids, vectors)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """About n of the vectors held (n, d), chosen at random, without decoding the whole category."""
        ivf = self._ivf()
        if ivf is None:
            positions = np.sort(rng.choice(self.index.ntotal, min(n, self.index.ntotal), replace=False))
            inner = faiss.downcast_index(self.index.index)
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)[positions]
            vectors = np.stack([inner.reconstruct(int(p)) for p in positions]) if len(positions) else \
                np.zeros((0, self.dim), np.float32)
        else:  # rows at random across the inverted lists, decoded one by one
            sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
            rows = np.sort(rng.choice(int(sizes.sum()), min(n, int(sizes.sum())), replace=False))
            lists = np.searchsorted(np.cumsum(sizes), rows, side="right")
            offsets = rows - (np.cumsum(sizes) - sizes)[lists]
            vectors = np.zeros((len(rows), self.dim), np.float32)
            for row, (lst, offset) in enumerate(zip(lists.tolist(), offsets.tolist())):
                ivf.reconstruct_from_offset(lst, offset, faiss.swig_ptr(vectors[row]))
            ids = np.array([ivf.invlists.get_single_id(lst, offset) for lst, offset in
                            zip(lists.tolist(), offsets.tolist())], np.int64)
        return self._visible(ids, vectors)[1][:n]

    def _lists(self, lists) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of some inverted lists of an IVF category, decoded."""
        ivf = self._ivf()
        parts = [get_invlist(ivf.invlists, i) for i in lists]
        ids = np.concatenate([np.zeros(0, np.int64)] + [p[0].astype(np.int64) for p in parts])
        codes = np.concatenate([np.zeros((0, ivf.code_size), np.uint8)] + [p[1] for p in parts])
        vectors = codes.view(np.float32) if isinstance(ivf, faiss.IndexIVFFlat) else ivf.sq.decode(codes)
        return ids, vectors.reshape(-1, self.dim)

    def _visible(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.hidden:
            keep = ~np.isin(ids, list(self.hidden))
            ids, vectors = ids[keep], vectors[keep]
        return ids, np.ascontiguousarray(vectors, dtype=np.float32)

    def stored(self) -> faiss.Index | np.ndarray:
        """What a snapshot writes: the FAISS index with deletions applied, or the snapshot bytes it still reads."""
        if self.hidden:
            self._rebuild()
        return self._source if self._source is not None else self.index

    def nbytes(self) -> int:
        """Bytes held: codes and ids, plus the coarse centroids of an inverted file or the links of a graph."""
        ivf = self._ivf()
        if ivf is not None:
            return self.index.ntotal * (ivf.code_size + 8) + ivf.nlist * self.dim * 4
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            links = inner.hnsw.neighbors.size() * 4 + inner.hnsw.offsets.size() * 8 + inner.hnsw.levels.size() * 4
            return self.index.ntotal * (faiss.downcast_index(inner.storage).code_size + 8) + links
        return self.index.ntotal * (inner.code_size + 8)

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int,
               among: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (nq, k'), k' = min(k, size); scores higher-is-better, -1 ids where fewer were found.
        `among` restricts the search to the ids it selects, exactly for every index type (a pre-filter)."""
        k = min(k, len(self))
        if k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if among is None:
            raw, ids = self.index.search(queries, k, params=self._search_params())
        else:
            raw, ids = self._search_among(queries, k, among)
        scores = 1.0 / (1.0 + np.sqrt(np.maximum(raw, 0))) if self.kind.metric == faiss.METRIC_L2 else raw
        return ids, np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    def _search_among(self, queries: np.ndarray, k: int, among: faiss.IDSelector):
        """A search of the selected ids only. A graph walk that may visit only a few of them would miss most, so an
        HNSW category scans its stored vectors instead, and an inverted file probes every list."""
        ivf = self._ivf()
        if ivf is not None:
            return self.index.search(queries, k, params=faiss.SearchParametersIVF(sel=among, nprobe=ivf.nlist))
        inner = faiss.downcast_index(self.index.index)
        if not isinstance(inner, faiss.IndexHNSW):
            return self.index.search(queries, k, params=faiss.SearchParameters(sel=among))
        if self.hidden:
            hidden = faiss.IDSelectorBatch(np.array(sorted(self.hidden), np.int64))
            shown = faiss.IDSelectorNot(hidden)
            among = faiss.IDSelectorAnd(among, shown)
        by_position = faiss.IDSelectorTranslated(self.index.id_map, among)
        raw, positions = faiss.downcast_index(inner.storage).search(queries, k,
                                                                    params=faiss.SearchParameters(sel=by_position))
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return raw, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def _search_params(self):
        if self._params is None and isinstance(self.index, faiss.IndexIDMap) and \
                isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW):
            batch = faiss.IDSelectorBatch(np.array(sorted(self.hidden), np.int64)) if self.hidden else None
            hide = faiss.IDSelectorNot(batch) if batch is not None else None
            # The selectors are kept beside the parameters: FAISS holds bare pointers to them. FAISS also points
            # these parameters at a temporary selector during a search, so one category's searches must not run
            # at once: ImageSearch serialises every search of an index under its lock.
            self._params = (faiss.SearchParametersHNSW(efSearch=HNSW_EF_SEARCH, sel=hide), batch, hide)
        return self._params[0] if self._params else None


class CategoryIndex:
    """Category prototypes plus one FAISS sub-index per category; see the module docstring."""

    def __init__(self, dim: int, index_type: str = "flatip"):
        if index_type not in INDEX_KINDS:
            raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        self.dim, self.index_type, self.kind = dim, index_type, INDEX_KINDS[index_type]
        self._partitions: dict[int, _Partition] = {}
        self._prototypes: dict[int, np.ndarray] = {}  # category -> its prototypes (p, d), p >= 1
        self._stacked = None  # every prototype in one matrix, for stage 1; made again after a change
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
        return {c: len(p) for c, p in self._partitions.items() if len(p)}

    def ids(self) -> np.ndarray:
        """All image ids in the index, sorted."""
        return np.array(sorted(self._category_of), dtype=np.int64)

    def assignments(self) -> dict[int, int]:
        """image id -> category id of every image held (a copy)."""
        return dict(self._category_of)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._category_of

    def add(self, ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray, optimise: bool = True) -> None:
        """Add images (n,) with vectors (n, d) and category ids (n,); an id already present is replaced.
        optimise=False leaves re-clustering the IVF types to optimise(), for loading in many batches."""
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
            if (part := self._partitions.get(cat)) is None:
                part = self._partitions[cat] = _Partition(self.dim, self.kind)
            part.add(ids[mask], vectors[mask])
            if optimise:
                part.optimise()
        self._category_of.update(zip(ids.tolist(), categories.tolist()))

    def optimise(self) -> None:
        """Give every category the structure its size calls for (after add(..., optimise=False))."""
        for part in self._partitions.values():
            part.optimise()

    def remove(self, ids) -> int:
        """Remove images by id; returns how many were present."""
        by_cat: dict[int, list[int]] = {}
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if i in self._category_of:
                by_cat.setdefault(self._category_of.pop(i), []).append(i)
        for c, members in by_cat.items():
            part = self._partitions[c]
            part.remove(np.array(members, dtype=np.int64))
            if not len(part):
                del self._partitions[c]
            else:
                part.optimise()
        return sum(map(len, by_cat.values()))

    def set_prototypes(self, categories, vectors: np.ndarray) -> None:
        """Set (or replace) the prototypes (p, d) of the given categories; a category with several prototypes is
        given once per prototype, and all of them replace what it had."""
        vectors = _check_matrix(vectors, self.dim, "prototypes")
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
        """Memory held by codes, ids and FAISS structures, in bytes."""
        return sum(p.nbytes() for p in self._partitions.values()) + sum(p.nbytes for p in self._prototypes.values())

    @classmethod
    def from_stored(cls, dim: int, index_type: str, partitions: dict[int, np.ndarray], prototype_categories,
                    prototypes: np.ndarray) -> "CategoryIndex":
        """The inverse of stored_partitions: each category's FAISS bytes (read in place, without a copy, until the
        category changes; the caller keeps them valid). Raises ValueError on parts that do not fit together."""
        index = cls(dim, index_type)
        for c, blob in partitions.items():
            try:
                faiss_index = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(blob), blob.size))
            except RuntimeError as exc:
                raise ValueError(f"category {c}: FAISS cannot read it ({str(exc).splitlines()[0][:200]})") from None
            if faiss_index.d != dim or not isinstance(faiss_index, (faiss.IndexIDMap, faiss.IndexIVF)):
                raise ValueError(f"category {c}: a {faiss_index.d}-d {type(faiss_index).__name__}, expected a "
                                 f"{dim}-d {index_type} index")
            part = _Partition(dim, index.kind, faiss_index, blob)
            ids = part.ids()
            known = len(index._category_of)
            index._category_of.update(dict.fromkeys(ids.tolist(), c))
            if len(index._category_of) != known + len(ids):
                raise ValueError(f"category {c} repeats an image id")
            if len(ids):
                index._partitions[c] = part
        index.set_prototypes(prototype_categories, prototypes)
        return index

    # -- search -----------------------------------------------------------------------------------
    def rank_prototypes(self, queries: np.ndarray, categories=None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (category ids (nq, c), cosine similarities (nq, c)), best first, among `categories`; a category
        with several prototypes counts by its closest."""
        queries = _check_matrix(queries, self.dim, "queries")
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
        vectors = _check_matrix(vectors, self.dim, "vectors")
        found = [part.search(vectors, k) for part in self._partitions.values()]
        if not found:
            return np.full((len(vectors), 0), -1, np.int64), np.zeros((len(vectors), 0), np.float32)
        ids, scores = np.concatenate([f[0] for f in found], axis=1), np.concatenate([f[1] for f in found], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(ids, best, axis=1), np.take_along_axis(scores, best, axis=1)

    def categories_of(self, ids: np.ndarray) -> set[int]:
        """The categories holding any of these image ids."""
        category_of = self._category_of
        return {category_of[i] for i in np.asarray(ids, np.int64).tolist() if i in category_of}

    def search(self, queries: np.ndarray, k: int, top_categories: int | None = 3, use_prototypes: bool = True,
               categories=None, among: np.ndarray | None = None) -> list[Hits]:
        """Top-k per query. use_prototypes: only the `top_categories` best-matching categories (None: all);
        else every category (the exhaustive baseline). `categories` restricts either to those ids, and `among` to
        those image ids (a pre-filter: stage 1 ranks only the categories holding some, and stage 2 is exact among
        them)."""
        queries = _check_matrix(queries, self.dim, "queries")
        if k < 1:
            raise ValueError("k must be at least 1")
        if top_categories is not None and top_categories < 1:
            raise ValueError("top_categories must be at least 1")
        allowed = list(self._partitions) if categories is None else \
            [int(c) for c in categories if int(c) in self._partitions]
        selector = None
        if among is not None:
            holding = self.categories_of(among)
            allowed = [c for c in allowed if c in holding]
            selector = faiss.IDSelectorBatch(np.asarray(among, np.int64))
        started = time.perf_counter()
        if use_prototypes:
            ranked_cats, ranked_sims = self.rank_prototypes(queries, allowed)
        prototype_ms = (time.perf_counter() - started) * 1000 / len(queries)
        results = []
        for q in range(len(queries)):
            ranking = list(zip(ranked_cats[q].tolist(), ranked_sims[q].tolist())) if use_prototypes else []
            chosen = [c for c, _ in ranking[:top_categories]] if use_prototypes else sorted(allowed)
            started = time.perf_counter()
            hits = self._search_partitions(queries[q:q + 1], k, chosen, ranking, selector)
            hits.prototype_ms, hits.search_ms = prototype_ms, (time.perf_counter() - started) * 1000
            results.append(hits)
        return results

    def _search_partitions(self, query: np.ndarray, k: int, chosen: list[int], ranking, selector=None) -> Hits:
        ids, scores, cats = [], [], []
        for c in chosen:
            part_ids, part_scores = self._partitions[c].search(query, k, selector)
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
