"""How a SearchRequest runs on a collection's index: metadata filters as a pre-filter or a growing post-filter,
several examples combined, near-duplicates collapsed, one page of one ranking.

A filter matching at most filters.PREFILTER_MAX_IDS images is a pre-filter: FAISS searches only those (exact, however
few). One matching more is a post-filter: the search fetches more than the page, keeps the matching results, and
fetches four times as many again until the page is full or nothing more can be found; past POST_FILTER_MAX_FETCH
results (the matches lie far from the query) it searches among all the matching ids, as a pre-filter does. Stage 1
ranks only the categories that hold a match, either way.
"""
import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from backend.search import duplicates
from backend.search.examples import best_of, mean_query, penalise, unit
from backend.service import lookups
from backend.service.requests import SearchRequest
from backend.service.results import MAX_DEPTH, SearchResponse
from backend.storage import filters

COLLAPSE_FETCH = 3  # results fetched per result wanted when near-duplicates are collapsed
POST_FILTER_MAX_FETCH = 50_000  # results a post-filter fetches at most before it searches among every match


@dataclass
class _Plan:
    """Where a search may look: categories (None: any), ids (None: any), and whether results are filtered after."""

    categories: list[int] | None
    among: np.ndarray | None
    post_filter: bool


def _plan(collection, request: SearchRequest) -> _Plan:
    categories = [lookups.category_id(collection.sessions, request.category)] \
        if request.category is not None else None
    if not request.where:
        return _Plan(categories, None, False)
    with collection.sessions() as s:
        matching = filters.matching_ids(s, list(request.where), filters.PREFILTER_MAX_IDS)
        if matching is None and request.use_prototypes:
            holding = filters.matching_categories(s, list(request.where))
            categories = [c for c in (categories or holding) if c in holding]
    return _Plan(categories, np.array(matching, np.int64) if matching is not None else None, matching is None)


def execute(collection, request: SearchRequest, positives: np.ndarray, negatives: np.ndarray,
            exclude: set[int] = frozenset(), in_index_space: bool = False) -> SearchResponse:
    """One page of the request's ranking on `collection` (an ImageSearch), leaving out `exclude`; every page of one
    query comes from the same ranking (for the exact index types). The examples are base model vectors unless
    in_index_space."""
    plan = _plan(collection, request)
    wanted = request.offset + request.k + 1  # one more than the page: is there a next page?
    fetch = (wanted + len(exclude)) * (COLLAPSE_FETCH if request.collapse is not None else 1)
    if plan.post_filter:  # at least PREFILTER_MAX_IDS of the index match: expect that share, fetch a quarter more
        fetch = min(math.ceil(fetch * max(1.0, len(collection.index) / filters.PREFILTER_MAX_IDS) * 1.25),
                    POST_FILTER_MAX_FETCH)
    floor = request.min_score if request.min_score is not None else -np.inf
    # A negative example's penalty can lift a lower candidate above a higher one: no early stop on scores then.
    monotone = request.strategy == "mean" or not len(negatives)
    search_ms, confidence, checked, matched = 0.0, None, set(), set()
    while True:
        with collection.lock:
            t0 = time.perf_counter()
            hits, complete, query, base = _rank(collection, request, positives, negatives, fetch,
                                                MAX_DEPTH + 1 + len(exclude), plan, in_index_space)
            search_ms += (time.perf_counter() - t0) * 1000
            if confidence is None:
                # Stage 1 already ranked every category for one plain query, unless a filter narrowed it.
                plain = request.use_prototypes and plan.categories is None and plan.among is None
                ranking = hits.prototype_ranking if plain and len(positives) == 1 and not len(negatives) else None
                confidence = collection.confidence_of(query, base, ranking)
            size = len(collection.index)
        keep = (hits.scores >= floor) & ~np.isin(hits.ids, list(exclude))
        if plan.post_filter:
            fresh = [i for i in hits.ids[keep].tolist() if i not in checked]  # each candidate is asked about once
            with collection.sessions() as s:
                matched |= filters.which_match(s, list(request.where), fresh)
            checked.update(fresh)
            keep &= np.isin(hits.ids, list(matched))
        low = monotone and len(hits.scores) and hits.scores[-1] < floor  # the rest score lower still
        if not plan.post_filter or keep.sum() >= wanted or complete or low or fetch >= size:
            break
        if fetch >= POST_FILTER_MAX_FETCH:
            with collection.sessions() as s:
                plan.among = filters.all_matching_ids(s, list(request.where))
            plan.post_filter, fetch = False, wanted + len(exclude)
            continue
        fetch = min(fetch * 4, size, POST_FILTER_MAX_FETCH)
    return _page(collection, request, hits, np.flatnonzero(keep), search_ms, confidence)


def _page(collection, request: SearchRequest, hits, ranked: np.ndarray, search_ms: float,
          confidence) -> SearchResponse:
    """The request's page of the kept ranking, described."""
    t1 = time.perf_counter()
    if request.collapse is not None:
        ranked = _collapsed(collection, hits.ids, ranked, request.collapse)
    offset, k = request.offset, request.k
    page = ranked[offset:offset + k]
    hits.ids, hits.scores, hits.categories = hits.ids[page], hits.scores[page], hits.categories[page]
    results, prototypes = collection.rows.describe(hits, first_rank=offset + 1)
    return SearchResponse(results, prototypes, {"search": round(search_ms, 2),
                                                "lookup": round((time.perf_counter() - t1) * 1000, 2)},
                          request.use_prototypes, confidence.as_dict() if confidence is not None else None,
                          offset=offset,
                          next_offset=offset + k if len(ranked) > offset + k and offset + k < MAX_DEPTH else None)


def _rank(collection, request: SearchRequest, positives: np.ndarray, negatives: np.ndarray, fetch: int, pool: int,
          plan: _Plan, in_index_space: bool):
    """(the `fetch` best hits by the strategy, whether they are all there are, the query vector for confidence,
    its base vector). The `max` strategy with negatives re-ranks at least `pool` candidates per positive, the same
    for every page. Call with the lock held: the head that makes index-space vectors is swapped under it."""
    if in_index_space:
        pos, neg, base = positives, negatives, None
    else:
        pos, neg = collection.to_index_space(positives), collection.to_index_space(negatives)
        base = positives[0] if len(positives) == 1 else unit(positives.mean(axis=0))
    index, weight = collection.index, request.negative_weight
    search = partial(index.search, top_categories=request.top_categories, use_prototypes=request.use_prototypes,
                     categories=plan.categories, among=plan.among, rerank=request.rerank)
    if request.strategy == "mean":
        query = mean_query(pos, neg, weight)
        hits = search(query[None, :], fetch)[0]
        return hits, len(hits.ids) < fetch, query, base
    depth = max(fetch, pool) if len(neg) else fetch
    per_positive = search(pos, depth)
    hits = best_of(per_positive)
    if len(neg):
        hits = penalise(hits, index.search(neg, max(1, len(hits.ids)), use_prototypes=False, among=hits.ids), weight)
    query = pos[0] if len(pos) == 1 else unit(pos.mean(axis=0))
    return hits, all(len(h.ids) < depth for h in per_positive), query, base


def _collapsed(collection, ids: np.ndarray, ranked: np.ndarray, threshold: float) -> np.ndarray:
    """The ranked positions whose images are not near-duplicates of one ranked before (backend.search.duplicates)."""
    order = ids[ranked].tolist()
    stored = lookups.stored_vectors(collection.sessions, collection.embedder.name, order)
    present = [i for i in order if i in stored]
    if not present:  # nothing ranked (a filter or min_score left nothing): nothing to collapse
        return ranked[:0]
    vectors = np.array([stored[i] for i in present])
    kept = set(duplicates.collapse(present, vectors, threshold))
    return np.array([r for r, i in zip(ranked.tolist(), order) if i in kept], np.int64)


def rank_categories(collection, base: np.ndarray, top_categories: int) -> SearchResponse:
    """Stage 1 alone for a query's base vector (d,): the top_categories categories closest to it."""
    started = time.perf_counter()
    with collection.lock:
        vector = collection.to_index_space(base)
        cats, sims = collection.index.rank_prototypes(vector[None, :])
        confidence = collection.confidence_of(vector, base, list(zip(cats[0].tolist(), sims[0].tolist())))
    names = lookups.category_names(collection.sessions, cats[0].tolist())
    protos = [{"category_id": c, "category": names.get(c), "similarity": float(s)}
              for c, s in zip(cats[0][:top_categories].tolist(), sims[0][:top_categories].tolist())]
    return SearchResponse([], protos, {"prototypes": round((time.perf_counter() - started) * 1000, 2)},
                          confidence=confidence.as_dict() if confidence is not None else None)
