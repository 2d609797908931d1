"""One category's vectors in a FAISS index of the configured kind (flat, HNSW or IVF; float32, float16 or 1-bit
RaBitQ codes re-ranked exactly from the vector store)."""
import math
from dataclasses import dataclass
from functools import cached_property

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

FP16_TOLERANCE = 1e-3  # float16 keeps 11 significant bits: a unit vector's components come back within 2**-11

HNSW_M = 32  # graph degree: FAISS's usual default for high-dimensional float vectors
HNSW_EF_SEARCH = 128
HIDDEN_LIMIT = 0.25  # an HNSW category is rebuilt once this share of it is deleted-but-hidden
IVF_MIN_VECTORS = 1000  # smaller categories gain nothing from IVF: they are scanned exactly
IVF_PROBE_SHARE = 1 / 8  # lists probed per query; on Fashion-MNIST vectors 1/8 of the lists gives recall@10 0.99
IVF_MIN_PROBES = 8  # ... and never fewer than this: a small category's few lists each hold much of it
IVF_POINTS_PER_LIST = 39  # FAISS's k-means wants at least this many training points per centroid
# A compressed category's lists hold at least this many: a list's centre is 4 bytes a dimension in RAM, which in
# small lists outweighs the 1-bit codes (2048-d categories of 2,000 in lists of 45: 184 of 505 bytes a vector).
COMPRESSED_POINTS_PER_LIST = 256
# A compressed type re-scores this many candidates per result from full vectors (the best of all the categories
# searched; CategoryIndex.rerank sets it per index): on 180,000 Fashion-MNIST vectors 8 gave recall@10 0.987 at P=5.
RERANK = 8
# A pre-filter's matches lie anywhere in a category: its codes rank all of them, and this many times the usual
# candidates are re-scored (all of them where there are fewer matches: then the answer is exact).
FILTERED_RERANK = 4
RETRAIN_GROWTH = 4  # a compressed category learns its lists' centres again once it has grown this much since
BITMAP_SPAN = 256  # a pre-filter is tested by a bitmap where its largest id is at most this many times its size
QUERY_BITS = 8  # RaBitQ quantises the query to this many bits; FAISS's default of 4 loses recall no re-rank restores


@dataclass(frozen=True)
class IndexKind:
    """How one FAISS_INDEX_TYPE stores and searches a category."""

    codes: str  # FAISS factory string of a category's storage
    metric: int = faiss.METRIC_INNER_PRODUCT
    ivf: bool = False  # categories of IVF_MIN_VECTORS or more get an inverted file over these codes (rerank: all)
    removable: bool = True  # FAISS removes ids from it; else deletions stay hidden until the category is rebuilt
    tolerance: float = 1e-6  # how far a vector read back from the index may be from the one added
    rerank: bool = False  # the codes only rank candidates: full vectors come from the vector store, and score them


INDEX_KINDS = {
    "flatip": IndexKind("Flat"),
    "flatl2": IndexKind("Flat", metric=faiss.METRIC_L2),
    "fp16": IndexKind("SQfp16", tolerance=FP16_TOLERANCE),
    "hnsw": IndexKind(f"HNSW{HNSW_M},Flat", removable=False),
    "ivfflat": IndexKind("Flat", ivf=True),
    "ivffp16": IndexKind("SQfp16", ivf=True, tolerance=FP16_TOLERANCE),
    "rabitq": IndexKind("RaBitQ", ivf=True, tolerance=FP16_TOLERANCE, rerank=True),
}
INDEX_TYPES = tuple(INDEX_KINDS)


def check_matrix(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"{what} must have shape (n, {dim}), got {vectors.shape}")
    return np.ascontiguousarray(vectors)


def ivf_lists(n: int, current: int, points_per_list: int = IVF_POINTS_PER_LIST) -> int:
    """Inverted lists for a category of n vectors that has `current` (0: none, scanned exactly): about sqrt(n) from
    IVF_MIN_VECTORS on (fewer where a list would hold under `points_per_list`), kept until n has moved 4-fold so
    that a growing category is re-clustered only now and then."""
    if n < IVF_MIN_VECTORS:
        return current if current and n >= IVF_MIN_VECTORS // 2 else 0
    target = max(1, min(round(math.sqrt(n)), n // points_per_list))
    return current if current and target / 2 <= current <= target * 2 else target


class Selection:
    """Image ids a search is restricted to (a pre-filter), with the FAISS selector made from them when needed.
    `whole`: the whole filter these ids are one category's share of, whose one selector serves every category (a
    category's lists hold only its own ids, so the others' never match there)."""

    def __init__(self, ids: np.ndarray, whole: "Selection | None" = None):
        ids = np.asarray(ids, np.int64).ravel()
        # An id given twice is one image, found once. A filter's shares come sorted and distinct already: a search
        # makes one per category, and sorting each again cost 1.8 ms a search for 10,000 ids (0.02 to check, measured).
        self.ids = ids if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()) else np.unique(ids)
        self._whole = whole

    @cached_property
    def selector(self) -> faiss.IDSelector:
        if self._whole is not None:
            return self._whole.selector
        span = int(self.ids[-1]) + 1 if len(self.ids) else 0
        if len(self.ids) and self.ids[0] >= 0 and span <= BITMAP_SPAN * len(self.ids):
            # A bit per id up to the largest: a test a scanned code is cheaper by than a hash look-up (a quarter
            # of a filtered search, measured), at no more memory than the hash set would take. Bit i of byte
            # i // 8 is id i, as FAISS reads it; the ids are sorted and distinct, so a byte's bits add up to it.
            byte, first = np.unique(self.ids >> 3, return_index=True)
            packed = np.zeros((span + 7) // 8, np.uint8)
            packed[byte] = np.add.reduceat((1 << (self.ids & 7)).astype(np.uint8), first)
            return faiss.IDSelectorBitmap(packed)  # which keeps the bytes alive, and counts them (not bits)
        return faiss.IDSelectorBatch(self.ids)


class Partition:
    """The images of one category: their vectors, held by one FAISS index under their image ids (for a compressed
    kind, codes there and full vectors in `store`)."""

    def __init__(self, dim: int, kind: IndexKind, index: faiss.Index | None = None, source: np.ndarray | None = None,
                 store=None):
        self.dim, self.kind, self.store = dim, kind, store
        self.index = index if index is not None else self._build(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        # The snapshot bytes a loaded index still reads its codes from; it gets its own copy before any change.
        self._source = source
        self.hidden: set[int] = set()  # deleted from an index that cannot remove ids; filtered out of every search
        self._params = self._centroids = None
        self._trained = self.index.ntotal  # vectors the codes were learnt from (as far as a loaded index tells)

    def __len__(self) -> int:
        return self.index.ntotal - len(self.hidden)

    # -- changes ----------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._own()
        if self.kind.rerank:
            self.store.put(ids, vectors)
        if self.hidden and not self.hidden.isdisjoint(ids.tolist()):
            self._rebuild()  # else a hidden copy of a re-added id would hide the new one too
        if not self.index.is_trained:  # a compressed category's first vectors: its codes are learnt from them
            self.index, self._params, self._centroids = self._build(ids, vectors), None, None
            return
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
        lists = self.lists()
        # A compressed category's centres are learnt again as it grows, even where its number of lists stays (one
        # below IVF_MIN_VECTORS): the first add may have been one image, and stage 1 ranks lists by their centres.
        grown = self.kind.rerank and len(self) >= RETRAIN_GROWTH * max(self._trained, 1)
        if self.kind.ivf and (self._lists_for(len(self), lists) != lists or grown):
            self._rebuild()

    def _lists_for(self, n: int, current: int) -> int:
        if not self.kind.rerank:
            return ivf_lists(n, current)
        return max(1, ivf_lists(n, current, COMPRESSED_POINTS_PER_LIST))  # trained at any size: one list below

    def _own(self) -> None:
        if self._source is not None:
            self.index, self._source = faiss.deserialize_index(self._source), None
            self._centroids = None  # a view of the old index's quantizer, which goes with it

    def _rebuild(self) -> None:
        ids, vectors = self.contents()
        self.index, self._source, self.hidden, self._params = self._build(ids, vectors), None, set(), None
        self._centroids = None

    def _build(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        self._trained = len(ids)
        lists = self._lists_for(len(ids), 0) if self.kind.ivf else 0
        if lists:
            index = faiss.index_factory(self.dim, f"IVF{lists},{self.kind.codes}", self.kind.metric)
            if not self.kind.rerank:  # (RaBitQ codes a vector's offset from its list's centre: it keeps the default)
                index.by_residual = False  # codes of the vectors themselves: exact float16, decodable on their own
            if not len(ids):
                return index  # trained by the first add
            if self.kind.rerank:  # its lists are learnt from however few vectors it has (one list: their mean),
                index.cp.min_points_per_centroid = 1  # where FAISS would warn for each under 39 a list
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
        """(ids (n,), vectors (n, d)) held, decoded from the index's codes (a compressed kind's from the store): copies
        (hidden ones left out)."""
        ivf = self._ivf()
        if self.kind.rerank:
            ids = self.ids()
            return ids, self.store.get(ids)
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
        if self.kind.rerank:
            ids = self.ids()
            return self.store.get(np.sort(rng.choice(ids, min(n, len(ids)), replace=False)))
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
    def search(self, queries: np.ndarray, k: int, among: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (nq, k'), k' = min(k, size); scores higher-is-better, -1 ids where fewer were found.
        `among` restricts the search to those of its ids this category holds, exactly for every index type but the
        compressed one, which re-scores the best FILTERED_RERANK x RERANK x k by their codes (all, where fewer) (a
        pre-filter)."""
        k = min(k, len(self))
        if k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if self.kind.rerank:
            count = k * RERANK * (FILTERED_RERANK if among is not None else 1)
            return self._rerank(queries, self.candidates(queries, count, among)[0], k)
        if among is None:
            raw, ids = self.index.search(queries, k, params=self._search_params())
        else:
            raw, ids = self._search_among(queries, k, among.selector)
        scores = 1.0 / (1.0 + np.sqrt(np.maximum(raw, 0))) if self.kind.metric == faiss.METRIC_L2 else raw
        return ids, np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    def candidates(self, queries: np.ndarray, count: int, among: Selection | None = None):
        """(ids, estimated scores), each (nq, count), that a compressed category's codes rank best, -1 ids where
        fewer: to be re-scored from the full vectors. `among`: only those ids, from every list."""
        if among is not None:
            params = faiss.IVFRaBitQSearchParameters()
            params.nprobe, params.qb, params.sel = self.index.nlist, QUERY_BITS, among.selector
            count = min(count, len(among.ids))
        else:
            if self._params is None:
                self._params = faiss.IVFRaBitQSearchParameters()
                self._params.nprobe, self._params.qb = self.index.nprobe, QUERY_BITS
            params = self._params
        estimates, ids = self.index.search(queries, max(1, min(len(self), count)), params=params)
        return ids, estimates

    def centroids(self) -> np.ndarray:
        """The centres (lists, d) of a compressed category's inverted lists: stage 1 ranks them with the rest."""
        if self._centroids is None:  # a view of the quantizer's own floats, not a second copy of them in RAM
            quantizer = faiss.downcast_index(self.index.quantizer)
            self._centroids = faiss.rev_swig_ptr(quantizer.get_xb(), self.index.nlist * self.dim).reshape(-1, self.dim)
        return self._centroids

    def candidates_in(self, query: np.ndarray, count: int, lists: np.ndarray, sims: np.ndarray):
        """(ids, estimated scores), each (count,), of a compressed category's best candidates in the given lists
        (whose centres have inner products `sims` with the query (1, d)), -1 ids where fewer."""
        params = faiss.IVFRaBitQSearchParameters()
        params.nprobe, params.qb = len(lists), QUERY_BITS
        k = min(len(self), count)
        estimates, ids = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        lists = np.ascontiguousarray(lists, np.int64)[None]
        sims = np.ascontiguousarray(sims, np.float32)[None]
        self.index.search_preassigned_c(1, faiss.swig_ptr(query), k, faiss.swig_ptr(lists), faiss.swig_ptr(sims),
                                        faiss.swig_ptr(estimates), faiss.swig_ptr(ids), False, params)
        return ids[0], estimates[0]

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of each query's candidate ids (nq, c) by exact inner product with their full vectors."""
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        for q, row in enumerate(candidates):
            row = row[row >= 0]
            exact = self.store.scores(row, queries[q])
            best = np.argsort(-exact, kind="stable")[:k]
            ids[q, :len(best)], scores[q, :len(best)] = row[best], exact[best]
        return ids, scores

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
