"""Reads and writes of images, embeddings and prototypes in PostgreSQL (the source of truth)."""
import logging
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, undefer

from backend.storage import heads as head_store
from backend.storage.notify import announce
from backend.storage.members import copy_vectors_in
from backend.storage.prototypes import add_to_prototypes, lock_prototypes, member_sums
from backend.storage.tables import Category, Collection, Embedding, EmbeddingModel, Image, ImageBlob, Prototype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewImage:
    """An image to store, with its vector for one model."""

    sha256: str
    data: bytes
    width: int
    height: int
    format: str
    category: str | None
    label: int | None = None
    original_name: str | None = None
    source_dataset: str | None = None
    source_split: str | None = None
    metadata: dict | None = None


def ensure_model(session: Session, model_name: str, dim: int, chosen: bool = False) -> None:
    """Register a model and its dimension (the database then refuses vectors of another size);
    `chosen` records it as the model the collection is being populated with."""
    stmt = insert(EmbeddingModel).values(name=model_name, dim=dim, chosen_at=sa.func.now() if chosen else None)
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"chosen_at": sa.func.now()})
                    if chosen else stmt.on_conflict_do_nothing())
    stored = session.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == model_name))
    if stored != dim:
        raise ValueError(f"model {model_name} is registered with dimension {stored}, not {dim}")


def category_ids(session: Session, names: set[str]) -> dict[str, int]:
    """Ids of the named categories, creating the missing ones."""
    if not names:
        return {}
    # A parameter list (executemany): one statement compiled once, where a VALUES list made a new one per batch
    session.execute(insert(Category.__table__).on_conflict_do_nothing(), [{"name": n} for n in sorted(names)])
    rows = session.execute(sa.select(Category.name, Category.id).where(Category.name.in_(names)))
    return dict(rows.all())


def existing_images(session: Session, shas: list[str], model_name: str) -> dict[str, tuple[int, bool]]:
    """For the given hashes already stored: sha -> (image id, has a vector for model_name)."""
    if not shas:
        return {}
    has_vector = sa.exists().where(Embedding.image_id == Image.id, Embedding.model_name == model_name)
    rows = session.execute(sa.select(Image.sha256, Image.id, has_vector).where(Image.sha256.in_(shas)))
    return {sha: (image_id, bool(has)) for sha, image_id, has in rows}


def insert_images(session: Session, images: list[NewImage]) -> dict[str, int]:
    """Insert images not yet stored (their bytes only where no collection holds them yet); returns sha -> id for
    those this call inserted."""
    if not images:
        return {}
    ids = category_ids(session, {im.category for im in images if im.category})
    blobs = {im.sha256: im.data for im in images}
    # Statements with parameter lists (executemany): compiled once and cached, where one VALUES row per image made
    # a new statement to compile for every batch.
    session.execute(insert(ImageBlob.__table__).on_conflict_do_nothing(),
                    [dict(sha256=sha, data=data) for sha, data in sorted(blobs.items())])
    # Held to commit: bytes another collection's deletion finds unreferenced meanwhile are not deleted under us.
    session.execute(sa.select(ImageBlob.sha256).where(ImageBlob.sha256.in_(sorted(blobs)))
                    .with_for_update(key_share=True))
    rows = [dict(sha256=im.sha256, width=im.width, height=im.height, format=im.format,
                 original_name=im.original_name, source_dataset=im.source_dataset, source_split=im.source_split,
                 label=im.label, category_id=ids.get(im.category), metadata=im.metadata or {})
            for im in images]
    table = Image.__table__
    stmt = insert(table).on_conflict_do_nothing(index_elements=["sha256"]).returning(table.c.sha256, table.c.id)
    return dict(session.execute(stmt, rows).all())


def insert_embeddings(session: Session, model_name: str, image_ids: list[int], vectors: np.ndarray,
                      derive: bool = True) -> list[int]:
    """Store vectors (n, d) for images and fold them into their categories' prototypes, and announce them to
    serving processes (backend.storage.notify) on commit; returns ids stored. Unless `derive` is False, the models
    derived from this one (backend.embedding.projection) get their vectors of the same images in the same transaction."""
    if not image_ids:
        return []
    if derive:
        head_store.lock_base(session, model_name)  # held to commit: a new head version waits for this write
    ensure_model(session, model_name, vectors.shape[1])
    copy_vectors_in(session, image_ids, vectors)
    stored = list(session.scalars(sa.text(
        "WITH incoming AS (DELETE FROM incoming_vectors RETURNING image_id, vector) "
        "INSERT INTO embeddings (image_id, model_name, dim, vector) SELECT image_id, :m, :d, vector FROM incoming "
        "ON CONFLICT DO NOTHING RETURNING image_id"), {"m": model_name, "d": vectors.shape[1]}))
    add_to_prototypes(session, model_name, stored)
    if stored:
        announce(session, model_name, stored)
        heads = head_store.heads_deriving(session, model_name) if derive else []
        if heads:
            position = {int(i): n for n, i in enumerate(image_ids)}
            kept = np.asarray(vectors)[[position[i] for i in stored]]
            for head in heads:
                insert_embeddings(session, head.model_name, stored, head.apply(kept), derive=False)
    return stored


def delete_images(session: Session, image_ids: list[int]) -> int:
    """Delete images with their vectors, taking them out of their prototypes, and announce it on commit; returns
    how many were deleted."""
    if not image_ids:
        return 0
    # Not while a model's prototypes are rebuilt: the rebuild renumbers the slots these images count towards.
    for model in sorted(session.scalars(sa.select(Embedding.model_name).distinct()
                                        .where(Embedding.image_id.in_(image_ids)))):
        lock_prototypes(session, model)
    sums = member_sums(None, image_ids).subquery()
    same = sa.and_(Prototype.category_id == sums.c.category_id, Prototype.model_name == sums.c.model_name,
                   Prototype.slot == sums.c.slot)
    # A prototype whose last members go is deleted; the others lose the members' sum.
    session.execute(sa.delete(Prototype).where(same, Prototype.member_count <= sums.c.n))
    remaining = Prototype.vector_sum - sums.c.s
    session.execute(sa.update(Prototype).where(same).values(
        vector_sum=remaining, vector=sa.func.l2_normalize(remaining),
        member_count=Prototype.member_count - sums.c.n, updated_at=sa.func.now()))
    deleted = session.execute(sa.delete(Image).where(Image.id.in_(image_ids)).returning(Image.id, Image.sha256)).all()
    if deleted:
        announce(session, None, [i for i, _ in deleted])  # their vectors of every model went with them
        remove_unreferenced_blobs(session, [sha for _, sha in deleted])
    return len(deleted)


def remove_unreferenced_blobs(session: Session, shas: list[str] | None = None) -> int:
    """Delete the bytes (of `shas`, or all) that no collection's images refer to any more; returns how many. An
    image of the same bytes being added meanwhile keeps them: its foreign key refuses the delete, which is then
    skipped (the bytes go at a later deletion)."""
    # Shared with creations and deletions of collections (which take it exclusively): every schema listed has images.
    session.execute(sa.text("SELECT pg_advisory_xact_lock_shared(hashtext('imsrc-collections'))"))
    schemas = session.scalars(sa.select(Collection.schema).order_by(Collection.schema)).all()
    unreferenced = " AND ".join(f'NOT EXISTS (SELECT 1 FROM "{schema}".images i WHERE i.sha256 = b.sha256)'
                                for schema in schemas) or "TRUE"
    where = " AND b.sha256 = ANY(:shas)" if shas is not None else ""
    try:
        with session.begin_nested():
            return session.execute(sa.text(f"DELETE FROM public.image_blobs b WHERE {unreferenced}{where}"),
                                   {"shas": list(shas or [])}).rowcount
    except sa.exc.IntegrityError:
        log.info("bytes of a deleted image are in use again; kept")
        return 0


def models_with_vectors(session: Session) -> list[tuple[str, int]]:
    """(model, number of vectors) of every model that has vectors: the last chosen first, then the most used."""
    n = sa.func.count(Embedding.image_id)
    return [tuple(r) for r in session.execute(
        sa.select(EmbeddingModel.name, n).join(Embedding, Embedding.model_name == EmbeddingModel.name)
        .group_by(EmbeddingModel.name, EmbeddingModel.chosen_at)
        .order_by(EmbeddingModel.chosen_at.desc().nulls_last(), n.desc(), EmbeddingModel.name)).all()]


def main_source_dataset(session: Session) -> str | None:
    """The dataset most of the collection came from."""
    return session.scalar(sa.select(Image.source_dataset).group_by(Image.source_dataset)
                          .order_by(sa.func.count().desc()).limit(1))


def counts(session: Session) -> dict:
    """Numbers for `status`: images, categories, and embeddings and prototypes per model."""
    scalar = lambda q: session.scalar(q) or 0  # noqa: E731
    per_model = lambda col: dict(session.execute(sa.select(col, sa.func.count()).group_by(col)).all())  # noqa: E731
    return {
        "images": scalar(sa.select(sa.func.count()).select_from(Image)),
        "categories": scalar(sa.select(sa.func.count()).select_from(Category)),
        "embeddings": per_model(Embedding.model_name),
        "prototypes": per_model(Prototype.model_name),
        "dims": dict(session.execute(sa.select(EmbeddingModel.name, EmbeddingModel.dim)).all()),
    }


def get_image(session: Session, image_id: int, with_data: bool = False):
    """The image row joined with its category name (its bytes loaded too `with_data`), or None."""
    query = sa.select(Image, Category.name).join(Category, isouter=True).where(Image.id == image_id)
    return session.execute(query.options(undefer(Image.data)) if with_data else query).first()


def list_categories(session: Session) -> list[tuple[int, str, int, bool]]:
    """(id, name, image count, automatic) of every category, by name."""
    n = sa.func.count(Image.id)
    return session.execute(sa.select(Category.id, Category.name, n, Category.automatic).join(Image, isouter=True)
                           .group_by(Category.id).order_by(Category.name)).all()


def category_images(session: Session, category_id: int, offset: int, limit: int):
    """(total, rows of (Image, category name)) for one page of a category, by id."""
    total = session.scalar(sa.select(sa.func.count()).select_from(Image).where(Image.category_id == category_id))
    rows = session.execute(sa.select(Image, Category.name).join(Category).where(Image.category_id == category_id)
                           .order_by(Image.id).offset(offset).limit(limit)).all()
    return total, rows
