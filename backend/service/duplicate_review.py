"""Near-duplicate groups as a person reviews them: found with the index, less the pairs already decided about."""
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.errors import InvalidQuery, NotFound
from backend.search import duplicates
from backend.search.hits import Hits
from backend.service.results import SearchResult
from backend.storage import decisions
from backend.storage.tables import Image


def find_groups(collection, threshold: float) -> list[list[SearchResult]]:
    """Groups of near-duplicate images of `collection` (an ImageSearch) at least `threshold` alike, largest first,
    leaving out pairs a person already decided about; each member described as a search result scoring its highest
    similarity to another member."""
    with collection.lock:  # the index holds still (and FAISS searches one at a time) while every image is looked at
        pairs = duplicates.similar_pairs(collection.index, threshold)
        category_of = collection.index.assignments()
    with collection.sessions() as s:
        found = duplicates.groups(pairs, decisions.decided_pairs(s, {i for pair in pairs for i in pair}))
    best: dict[int, float] = {}  # each image's highest similarity to another of its group
    for (a, b), score in pairs.items():
        best[a], best[b] = max(best.get(a, score), score), max(best.get(b, score), score)
    described = []
    for group in found:
        scores = np.array([best[i] for i in group], np.float32)
        hits = Hits(np.array(group, np.int64), scores, np.array([category_of.get(i, -1) for i in group], np.int64))
        results, _ = collection.rows.describe(hits)
        if len(results) > 1:
            described.append(results)
    return described


def to_delete(sessions: sessionmaker, image_ids: list[int], decision: str, keep: int | None) -> list[int] | None:
    """The images a decision deletes (keep_one: all but `keep`), or None for a decision that deletes nothing;
    NotFound for an id not stored, InvalidQuery for keep_one without one of the group's ids to keep."""
    with sessions() as s:
        stored = set(s.scalars(sa.select(Image.id).where(Image.id.in_(set(image_ids)))))
    if missing := sorted(set(image_ids) - stored):
        raise NotFound(f"image {missing[0]} not found")
    if decision != "keep_one":
        return None
    if keep not in image_ids:
        raise InvalidQuery("keep_one needs `keep`: the id, among the group's, of the image to keep")
    return sorted(set(image_ids) - {keep})


def record(sessions: sessionmaker, image_ids: list[int], decision: str) -> int:
    """Keep a decision that deletes nothing (keep_all, not_duplicates); returns the pairs recorded."""
    with sessions() as s, s.begin():
        return decisions.record(s, image_ids, decision)
