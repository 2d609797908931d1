"""What a search looks up in PostgreSQL around the index: categories by name, stored vectors, and the hits' rows."""
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.errors import NotFound
from backend.search.hits import Hits
from backend.service.results import SearchResult
from backend.storage.tables import Category, Embedding, Image


def category_id(sessions: sessionmaker, category: str | int) -> int:
    """A category's id, by id or name; NotFound when there is none."""
    with sessions() as s:
        column = Category.id if isinstance(category, int) else Category.name
        found = s.scalar(sa.select(Category.id).where(column == category))
    if found is None:
        raise NotFound(f"category {category!r} not found")
    return found


def category_names(sessions: sessionmaker, ids: list[int]) -> dict[int, str]:
    """The names of categories by id."""
    if not ids:
        return {}
    with sessions() as s:
        return _names(s, ids)


def _names(session, ids: list[int]) -> dict[int, str]:
    return dict(session.execute(sa.select(Category.id, Category.name).where(Category.id.in_(ids))).all()) if ids else {}


def stored_vectors(sessions: sessionmaker, model_name: str, image_ids: list[int]) -> dict[int, np.ndarray]:
    """The model's stored vectors of these images (those that have one), by image id."""
    if not image_ids:
        return {}
    with sessions() as s:
        rows = s.execute(sa.select(Embedding.image_id, Embedding.vector).where(
            Embedding.image_id.in_(image_ids), Embedding.model_name == model_name)).all()
    return {i: np.asarray(v, np.float32) for i, v in rows}


def stored_bases(sessions: sessionmaker, embedder, image_ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """The base model vectors of stored images (a derived model's stored vectors may be of a newer head than the
    index's: the head is applied under the search lock); NotFound for an id without this model's vector."""
    if not image_ids:
        return [], []
    wanted = sorted(set(image_ids))
    found = stored_vectors(sessions, embedder.source.name, wanted)
    with sessions() as s:
        indexed = set(s.scalars(sa.select(Embedding.image_id).where(
            Embedding.image_id.in_(wanted), Embedding.model_name == embedder.name)).all())
    missing = [i for i in wanted if i not in found or i not in indexed]
    if missing:
        raise NotFound(f"image {missing[0]} not found (or has no {embedder.name} vector)")
    return wanted, [found[i] for i in wanted]


def describe(sessions: sessionmaker, hits: Hits, first_rank: int = 1) -> tuple[list[SearchResult], list[dict]]:
    """The hits as search results (ranked from first_rank), and the categories stage 1 chose with similarities."""
    ids, ranked = hits.ids.tolist(), [c for c, _ in hits.prototype_ranking]
    with sessions() as s:  # one checkout for both: each costs a round trip (the pool's liveness check)
        rows = {r.id: r for r in s.execute(
            sa.select(Image.id, Image.original_name, Image.label, Image.category_id, Image.metadata_, Category.name)
            .join(Category, isouter=True).where(Image.id.in_(ids))).all()} if ids else {}
        names = _names(s, ranked)
    # An image deleted by another process since the last refresh is left out.
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
