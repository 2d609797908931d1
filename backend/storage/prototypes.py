"""Per-category prototypes (k-means slots) kept exact in PostgreSQL as images come and go."""
import io

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.storage.members import HEADER, TRAILER, copy_cursor
from backend.storage.notify import announce
from backend.storage.tables import Embedding, EmbeddingModel, Image, Prototype

MIN_SLOT_MEMBERS = 50  # members a prototype of a category with several needs, at least
KMEANS_SAMPLE = 256  # vectors per prototype that k-means learns the slots from (FAISS's own default)
_DIM_OFFSET = 2 + 4 + 4 + 4 + 4 + 4  # a COPY row's field count, category and member count with lengths, vector length


def member_sums(model_name: str | None, image_ids: list[int]):
    """Per (category, model, slot): sum and count of the given images' vectors."""
    e, i = Embedding.__table__, Image.__table__
    query = (sa.select(i.c.category_id, e.c.model_name, e.c.slot, e.c.dim, sa.func.sum(e.c.vector).label("s"),
                       sa.func.count().label("n"))
             .join(i, i.c.id == e.c.image_id)
             .where(e.c.image_id.in_(image_ids), i.c.category_id.is_not(None))
             .group_by(i.c.category_id, e.c.model_name, e.c.slot, e.c.dim))
    return query.where(e.c.model_name == model_name) if model_name else query


def add_to_prototypes(session: Session, model_name: str, image_ids: list[int]) -> None:
    # The update runs in SQL so that two writers adding to one category never lose each other's sums.
    if not image_ids:
        return
    # Where a category has several prototypes, a new vector counts towards the closest (inner product).
    session.execute(sa.text(
        "UPDATE embeddings e SET slot = closest.slot FROM ("
        " SELECT DISTINCT ON (v.image_id) v.image_id, p.slot FROM embeddings v"
        " JOIN images i ON i.id = v.image_id"
        " JOIN prototypes p ON p.category_id = i.category_id AND p.model_name = v.model_name"
        " WHERE v.model_name = :m AND v.image_id = ANY(:ids)"
        " ORDER BY v.image_id, p.vector <#> v.vector) closest"
        " WHERE e.model_name = :m AND e.image_id = closest.image_id AND e.slot <> closest.slot"),
        {"m": model_name, "ids": list(image_ids)})
    sums = member_sums(model_name, image_ids).subquery()
    stmt = insert(Prototype).from_select(
        ["category_id", "model_name", "slot", "dim", "vector", "vector_sum", "member_count"],
        sa.select(sums.c.category_id, sums.c.model_name, sums.c.slot, sums.c.dim, sa.func.l2_normalize(sums.c.s),
                  sums.c.s, sums.c.n))
    new_sum = Prototype.vector_sum + stmt.excluded.vector_sum
    session.execute(stmt.on_conflict_do_update(
        index_elements=["category_id", "model_name", "slot"],
        set_=dict(vector_sum=new_sum, vector=sa.func.l2_normalize(new_sum),
                  member_count=Prototype.member_count + stmt.excluded.member_count, updated_at=sa.func.now())))


def lock_prototypes(session: Session, model_name: str) -> None:
    """Held to commit by whoever replaces a model's prototypes wholesale, and by deletions (in model order).

    One recomputation per model at a time (workers starting together each rebuild): a second one waits for the
    first to commit, where it would otherwise miss the rows the first inserted and collide with them."""
    session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('imsrc-prototypes:' || :m))"), {"m": model_name})


def slots_for(members: int, per_category: int) -> int:
    """Prototypes for a category of `members` vectors: per_category, fewer where each would have under
    MIN_SLOT_MEMBERS members (a prototype of a handful of images is noise), at least 1."""
    return max(1, min(per_category, members // MIN_SLOT_MEMBERS))


def rebuild_prototypes(session: Session, model_name: str, per_category: int | None = None) -> int:
    """Recompute every prototype of a model from its members (float64 mean), announced on commit; returns how many
    there are. A category gets slots_for(its size, per_category) prototypes (default PROTOTYPES_PER_CATEGORY): its
    members are split by k-means on the sphere and each vector counts towards its cluster's slot from then on."""
    from backend.config import settings

    e, i = Embedding.__table__, Image.__table__
    lock_prototypes(session, model_name)  # delete_images takes it too: the two never interleave
    per_category = per_category or settings.prototypes_per_category
    sizes = session.execute(sa.select(Image.category_id, sa.func.count()).join(Embedding, Embedding.image_id == Image.id)
                            .where(Embedding.model_name == model_name, Image.category_id.is_not(None))
                            .group_by(Image.category_id)).all()
    dim = session.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == model_name))
    split = {category: k for category, size in sizes if (k := slots_for(size, per_category)) > 1}
    # Read first, write after: prototypes before embeddings, the order every writer locks them in.
    slots = [_split(session, model_name, dim, category, k) for category, k in split.items()]
    session.execute(sa.delete(Prototype).where(Prototype.model_name == model_name))
    # NOT EXISTS, not NOT IN: PostgreSQL cannot turn NOT IN into an anti-join, and once the ids outgrow work_mem it
    # scans them again for every vector (a million vectors: hours).
    in_split = sa.exists().where(Image.id == Embedding.image_id, Image.category_id.in_(list(split)))
    session.execute(sa.update(Embedding).where(Embedding.model_name == model_name, Embedding.slot != 0, ~in_split)
                    .values(slot=0))
    for ids, slot in slots:  # only the vectors whose slot changed are written
        session.execute(sa.text("UPDATE embeddings SET slot = s.slot FROM unnest(:ids, :slots) AS s(image, slot) "
                                "WHERE embeddings.model_name = :m AND embeddings.image_id = s.image "
                                "AND embeddings.slot <> s.slot"),
                        {"m": model_name, "ids": ids.tolist(), "slots": slot.tolist()})
    members = (sa.select(i.c.category_id, e.c.model_name, e.c.slot, e.c.dim,
                         sa.func.l2_normalize(sa.func.avg(e.c.vector)), sa.func.sum(e.c.vector), sa.func.count())
               .join(i, i.c.id == e.c.image_id)
               .where(e.c.model_name == model_name, i.c.category_id.is_not(None))
               .group_by(i.c.category_id, e.c.model_name, e.c.slot, e.c.dim))
    session.execute(insert(Prototype).from_select(
        ["category_id", "model_name", "slot", "dim", "vector", "vector_sum", "member_count"], members))
    announce(session, model_name, what="prototypes")
    return session.scalar(sa.select(sa.func.count()).select_from(Prototype).where(Prototype.model_name == model_name))


def _split(session: Session, model_name: str, dim: int, category: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, slot of each) of a category's vectors split into k clusters (spherical k-means on at most
    KMEANS_SAMPLE of them, then every vector to its closest centroid, streamed: a category's vectors are never all
    in memory at once); slots are numbered without gaps."""
    from backend.search.kmeans import spherical_kmeans
    from backend.storage.members import copy_members, fetch_members

    # By id: in the table's order the sample, and so the slots, would move with every rewrite of the rows, and a
    # rebuild of unchanged data would write every vector's slot again (each a new row version, in every index).
    ids = np.array(session.scalars(sa.select(Embedding.image_id).join(Image, Image.id == Embedding.image_id)
                                   .where(Embedding.model_name == model_name, Image.category_id == category)
                                   .order_by(Embedding.image_id)).all())
    sample = np.random.default_rng(category).choice(ids, min(len(ids), KMEANS_SAMPLE * k), replace=False)
    centroids = spherical_kmeans(fetch_members(session, model_name, dim, np.sort(sample))[2], k)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    copy_members(session, model_name, dim, lambda i, _, v: found.append((i, (v @ centroids.T).argmax(axis=1))), ids)
    members, cluster = (np.concatenate(column) for column in zip(*found))
    return members, np.unique(cluster, return_inverse=True)[1]


def load_prototypes(session: Session, model_name: str,
                    categories: list[int] | None = None) -> tuple[list[int], np.ndarray, list[int]]:
    """(category ids, prototype vectors (p, d) float32, member counts) of a model (of `categories` only, when given),
    by category id then slot: a category with several prototypes appears once per prototype. Read as binary COPY
    (pgvector's text form would be parsed number by number)."""
    buffer = io.BytesIO()
    only = " AND category_id = ANY(%s)" if categories is not None else ""
    statement = (f"COPY (SELECT category_id, member_count, vector FROM prototypes WHERE model_name = %s{only} "
                 "ORDER BY category_id, slot) TO STDOUT (FORMAT binary)")
    with copy_cursor(session, statement) as cursor:
        cursor.copy_expert(cursor.mogrify(statement, (model_name, list(categories)) if only else (model_name,))
                           .decode(), buffer)
    data = buffer.getvalue()[HEADER:-len(TRAILER)]
    if not data:
        return [], np.zeros((0, 0), np.float32), []
    dim = int(np.frombuffer(data, ">i2", count=1, offset=_DIM_OFFSET)[0])
    rows = np.frombuffer(data, _prototype_row(dim))
    return rows["cat"].tolist(), rows["vec"].astype(np.float32), rows["count"].tolist()


def prototype_versions(session: Session, model_name: str) -> dict[int, str]:
    """Per category of a model: a token that changes whenever any of its prototypes is written (the row versions,
    PostgreSQL's xmin, of its slots), so that a reader reloads only the categories whose prototypes changed."""
    rows = session.execute(sa.text(
        "SELECT category_id, string_agg(slot || ':' || xmin::text, ',' ORDER BY slot) FROM prototypes "
        "WHERE model_name = :m GROUP BY category_id"), {"m": model_name}).all()
    return dict(rows)


def _prototype_row(dim: int) -> np.dtype:
    """One binary COPY row of (category_id, member_count, vector), big-endian."""
    return np.dtype([("fields", ">i2"), ("cat_len", ">i4"), ("cat", ">i4"), ("count_len", ">i4"), ("count", ">i4"),
                     ("vec_len", ">i4"), ("vec_dim", ">i2"), ("vec_unused", ">i2"), ("vec", ">f4", (dim,))])


def category_means(session: Session, model_name: str) -> tuple[list[int], np.ndarray]:
    """(category ids, the normalised mean of each category's vectors (c, d)) of a model, from its prototypes' sums."""
    mean = sa.func.l2_normalize(sa.func.sum(Prototype.vector_sum), type_=Prototype.vector.type)
    rows = session.execute(sa.select(Prototype.category_id, mean)
                           .where(Prototype.model_name == model_name).group_by(Prototype.category_id)
                           .order_by(Prototype.category_id)).all()
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    return [r[0] for r in rows], np.stack([np.asarray(r[1], dtype=np.float32) for r in rows])
