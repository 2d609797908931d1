"""How sure the prototype stage is about a query: is it like anything in the collection at all?

A query's best prototype similarity is compared with what the collection's own images score against their
categories' prototypes: below the QUANTILE of those (a sample of each category, re-drawn as the collection grows),
the query is unlike every category, and the page says "no close match" instead of presenting the nearest images
as an answer. Numpy in, numpy out; the false-alarm rate on held-out images of the collection is measured by
`python -m backend evaluate`.
"""
from dataclasses import asdict, dataclass

import numpy as np

from backend.search.category_index import CategoryIndex

QUANTILE = 0.01  # the share of the collection's own images that would be called "no close match"
SAMPLE_PER_CATEGORY = 200
SAMPLE_TOTAL = 20_000  # with many categories, fewer from each: calibrating stays well under a second
RECALIBRATE_GROWTH = 0.1  # re-draw the sample when the collection has grown or shrunk by this share


@dataclass(frozen=True)
class Confidence:
    """Stage 1's certainty about one query."""

    best_similarity: float  # to the closest category's prototype
    margin: float  # best minus the second best (0 with one category): how clearly stage 1 chose
    threshold: float  # best similarities below this are unlike the collection
    close_match: bool

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(index: CategoryIndex, quantile: float = QUANTILE,
              per_category: int = SAMPLE_PER_CATEGORY) -> float | None:
    """The best-prototype similarity that all but `quantile` of the collection's own images reach; None without
    prototypes. Each image is measured against its own category's prototype without it (leave one out) where the
    whole category was sampled: in a small category an image pulls its prototype towards itself, and a new image of
    that category, which has not, would otherwise look less alike than it is."""
    cats = index.categories
    column = {int(c): k for k, c in enumerate(cats)}
    best = []
    for c, sample, size in index.sample(max(10, min(per_category, SAMPLE_TOTAL // max(len(cats), 1)))):
        if c not in column or (size == len(sample) and size < 2):
            continue  # a lone image has no others to be compared with
        sims = index.category_similarities(sample)[1]
        if size == len(sample):
            others = sample.sum(axis=0)[None, :] - sample
            sims[:, column[c]] = (sample * others).sum(axis=1) / np.maximum(np.linalg.norm(others, axis=1), 1e-12)
        best.append(sims.max(axis=1))
    return float(np.quantile(np.concatenate(best), quantile)) if best else None


def assess(similarities: np.ndarray, threshold: float | None) -> Confidence | None:
    """The Confidence of a query from its prototype similarities, best first (c,); None without a threshold."""
    if threshold is None or not len(similarities):
        return None
    best = float(similarities[0])
    margin = best - float(similarities[1]) if len(similarities) > 1 else 0.0
    return Confidence(round(best, 4), round(margin, 4), round(threshold, 4), best >= threshold)


class Calibration:
    """The threshold for one index, re-drawn when its categories change or its size moves by RECALIBRATE_GROWTH,
    or after reset() (its members moved: a recluster or a resync)."""

    def __init__(self):
        self._key, self.threshold = None, None

    def reset(self) -> None:
        """Draw the threshold again at the next search."""
        self._key = None

    @property
    def pending(self) -> bool:
        """Whether the threshold is drawn again at the next search (reset, or never drawn)."""
        return self._key is None

    def current(self, index: CategoryIndex) -> float | None:
        """The threshold for `index` as it is now (computed again only when it changed enough)."""
        if moved_on(self._key, index):
            self.threshold, self._key = calibrate(index), key_of(index)
        return self.threshold


def key_of(index: CategoryIndex) -> tuple:
    """What moved_on compares: the index's id (not the index: a replaced one can go), size and categories."""
    return id(index), len(index), index.categories


def moved_on(key: tuple | None, index: CategoryIndex) -> bool:
    """Whether `index` is not the one `key` was taken of, has other categories, or has grown or shrunk by
    RECALIBRATE_GROWTH since (or there is no key: never taken, or reset)."""
    return key is None or key[0] != id(index) or key[2] != index.categories or \
        abs(len(index) - key[1]) > RECALIBRATE_GROWTH * max(key[1], 1)
