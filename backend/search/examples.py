"""Several examples at once ("more like these, less like those"): how positive and negative example vectors become
one ranking. Measured on Fashion-MNIST by bench/examples.py (see the README's "Several examples at once").

  mean  one query: the mean of the positives minus NEGATIVE_WEIGHT times the mean of the negatives, re-normalised
  max   each stored image scores its best similarity to any positive, minus NEGATIVE_WEIGHT times its best
        similarity to any negative; the candidates are the union of each positive's own top results (with negatives,
        whose penalty re-orders them, each positive's top MAX_DEPTH, the same pool for every page): exact without
        negatives, close with them
"""
import numpy as np

from backend.errors import InvalidQuery
from backend.search.hits import Hits

STRATEGIES = ("mean", "max")
DEFAULT_STRATEGY = "mean"
NEGATIVE_WEIGHT = 0.25
MAX_EXAMPLES = 10  # positives and negatives together, per search


class InvalidExamples(InvalidQuery):
    """Examples that cannot make a query (none positive, too many, or cancelling out)."""


def check_counts(positives: int, negatives: int) -> None:
    """Refuse a search without a positive example or with more than MAX_EXAMPLES in all."""
    if positives < 1:
        raise InvalidExamples("give at least one positive example (an image or a stored image id)")
    if positives + negatives > MAX_EXAMPLES:
        raise InvalidExamples(f"at most {MAX_EXAMPLES} examples per search, not {positives + negatives}")


def unit(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1 (the index holds unit vectors); refuses one of length ~0."""
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise InvalidExamples("the negative examples cancel the positive ones out: use fewer negatives or a lower "
                              "negative_weight")
    return (vector / norm).astype(np.float32)


def mean_query(positives: np.ndarray, negatives: np.ndarray, weight: float) -> np.ndarray:
    """The `mean` strategy's one query vector (d,) from positives (p, d) and negatives (n, d)."""
    if len(positives) == 1 and not len(negatives):
        return positives[0]
    query = positives.mean(axis=0)
    if len(negatives):
        query = query - weight * negatives.mean(axis=0)
    return unit(query)


def best_of(per_query: list[Hits]) -> Hits:
    """The `max` strategy's candidates: every image any positive found, scored by its best similarity, best first
    (ties by id); stage 1's ranking and categories are the first positive's, the categories searched all of them."""
    ids = np.concatenate([h.ids for h in per_query])
    scores = np.concatenate([h.scores for h in per_query])
    cats = np.concatenate([h.categories for h in per_query])
    order = np.lexsort((-scores, ids))  # by id, best score first within an id
    first = np.r_[True, ids[order][1:] != ids[order][:-1]] if len(ids) else np.zeros(0, bool)
    keep = order[first]
    best = keep[np.lexsort((ids[keep], -scores[keep]))]
    searched = sorted({c for h in per_query for c in h.searched_categories})
    return Hits(ids[best], scores[best], cats[best], per_query[0].prototype_ranking, searched,
                per_query[0].prototype_ms, sum(h.search_ms for h in per_query))


def penalise(hits: Hits, negative_scores: list[Hits], weight: float) -> Hits:
    """The `max` strategy with negatives: each candidate's score minus `weight` times its best similarity to a
    negative (negative_scores: each negative's scores over the candidates), re-ranked."""
    penalty = np.full(len(hits.ids), -np.inf, np.float32)
    position = {i: p for p, i in enumerate(hits.ids.tolist())}
    for neg in negative_scores:
        for i, score in zip(neg.ids.tolist(), neg.scores.tolist()):
            if i in position:
                penalty[position[i]] = max(penalty[position[i]], score)
    scores = hits.scores - weight * np.where(np.isfinite(penalty), penalty, 0).astype(np.float32)
    order = np.lexsort((hits.ids, -scores))
    return Hits(hits.ids[order], scores[order], hits.categories[order], hits.prototype_ranking,
                hits.searched_categories, hits.prototype_ms, hits.search_ms)
