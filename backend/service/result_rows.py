"""What a search shows of its hits (names, labels, categories, metadata), cached as long as the index is unchanged.

An image's row is written once and changes only with its category (a recluster), and every such write, a deletion
included, reaches the index through a sync (this process's writes, or live sync's of another's). So the rows of
the index's images are as current as the index itself while it has not changed; each change of the index (a sync
or rebuild: IndexManager.changes) empties the cache. A search then needs no round trip to PostgreSQL for rows it
has shown before.
"""
import threading
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.search.hits import Hits
from backend.service.results import SearchResult
from backend.storage.tables import Category, Image

MAX_ROWS = 200_000  # rows kept (about 100 MB at most with large metadata); past it the cache starts again


class ResultRows:
    """Hits described as search results, from a cache of image rows and category names (see the module docstring);
    `changes()` counts the index's changes."""

    def __init__(self, sessions: sessionmaker, changes: Callable[[], int]):
        self.sessions, self.changes = sessions, changes
        self._rows: dict[int, sa.Row] = {}
        self._names: dict[int, str] = {}
        self._of_change: int | None = None  # the index change the cache holds rows of
        self._lock = threading.Lock()

    def describe(self, hits: Hits, first_rank: int = 1) -> tuple[list[SearchResult], list[dict]]:
        """The hits as search results (ranked from first_rank), and the categories stage 1 chose with similarities;
        a hit whose image is no longer stored is left out."""
        ids, ranked = hits.ids.tolist(), [c for c, _ in hits.prototype_ranking]
        rows, names = self._rows_and_names(ids, ranked)
        results = [SearchResult(image_id=i, score=float(score), rank=rank, category=rows[i].name,
                                category_id=int(cat), file_name=rows[i].original_name, label=rows[i].label,
                                metadata=rows[i].metadata_)
                   for rank, (i, score, cat) in enumerate(zip(ids, hits.scores.tolist(), hits.categories.tolist()),
                                                          first_rank)
                   if i in rows]
        chosen = set(hits.searched_categories)
        prototypes = [{"category_id": c, "category": names.get(c), "similarity": float(sim)}
                      for c, sim in hits.prototype_ranking if c in chosen]
        return results, prototypes

    def _rows_and_names(self, ids: list[int], categories: list[int]) -> tuple[dict, dict]:
        change = self.changes()
        with self._lock:
            if self._of_change != change:
                self._rows, self._names, self._of_change = {}, {}, change
            rows = {i: self._rows[i] for i in ids if i in self._rows}
            names = {c: self._names[c] for c in categories if c in self._names}
        need_rows, need_names = [i for i in ids if i not in rows], [c for c in categories if c not in names]
        if not need_rows and not need_names:
            return rows, names
        with self.sessions() as s:  # one checkout for both: each costs a round trip (the pool's liveness check)
            fetched = {r.id: r for r in s.execute(
                sa.select(Image.id, Image.original_name, Image.label, Image.category_id, Image.metadata_,
                          Category.name).join(Category, isouter=True).where(Image.id.in_(need_rows)))} \
                if need_rows else {}
            named = dict(s.execute(sa.select(Category.id, Category.name).where(Category.id.in_(need_names))).all()) \
                if need_names else {}
        with self._lock:
            # Kept only if the index did not change meanwhile: these rows may be older than that change.
            if self._of_change == change == self.changes():
                if len(self._rows) + len(fetched) > MAX_ROWS:
                    self._rows = {}
                self._rows.update(fetched)
                self._names.update(named)
        return {**rows, **fetched}, {**names, **named}
