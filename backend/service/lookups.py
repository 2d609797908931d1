"""What a search looks up in PostgreSQL around the index: categories by name or id, and stored vectors (the hits' rows:
backend.service.result_rows)."""
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from backend.errors import NotFound
from backend.storage.tables import Category, Embedding


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
        return dict(s.execute(sa.select(Category.id, Category.name).where(Category.id.in_(ids))).all())




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
