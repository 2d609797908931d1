"""What the database says an index should hold: a fingerprint of its members and counts per category."""
import hashlib
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.search.category_index import CategoryIndex
from backend.storage.tables import Embedding, Image

EXAMPLES = 3  # differences named in one message


def fingerprint(session: Session, model_name: str) -> str:
    """A digest of which images (and in which categories) have vectors for the model."""
    row = session.execute(sa.text(
        "SELECT count(*), md5(coalesce(string_agg(e.image_id::text || ':' || i.category_id::text, ','"
        " ORDER BY e.image_id), '')) FROM embeddings e JOIN images i ON i.id = e.image_id"
        " WHERE e.model_name = :m AND i.category_id IS NOT NULL"), {"m": model_name}).one()
    return f"{row[0]}:{row[1]}"


def index_fingerprint(index: CategoryIndex) -> str:
    """fingerprint() of what an index holds, computed alike, so its contents can be compared with the database."""
    members = sorted((i, c) for c, ids in index.members() for i in ids.tolist())
    text = ",".join(f"{i}:{c}" for i, c in members)
    return f"{len(members)}:{hashlib.md5(text.encode()).hexdigest()}"


def category_counts(session: Session, model_name: str) -> dict[int, int]:
    """Vectors of the model per category: what the index should hold."""
    return dict(session.execute(
        sa.select(Image.category_id, sa.func.count()).join(Embedding, Embedding.image_id == Image.id)
        .where(Embedding.model_name == model_name, Image.category_id.is_not(None))
        .group_by(Image.category_id)).all())


def count_differences(found: dict[int, int], expected: dict[int, int], where: str) -> str | None:
    """'category c: n vectors in <where>, m in PostgreSQL; ...' for the categories whose counts differ, or None."""
    differ = [c for c in sorted(set(found) | set(expected)) if found.get(c, 0) != expected.get(c, 0)]
    if not differ:
        return None
    text = "; ".join(f"category {c}: {found.get(c, 0)} vectors in {where}, {expected.get(c, 0)} in PostgreSQL"
                     for c in differ[:EXAMPLES])
    return text + (f"; and {len(differ) - EXAMPLES} more categories" if len(differ) > EXAMPLES else "")


@contextmanager
def consistent_reads(sessions: sessionmaker):
    """A read-only session whose queries all see one snapshot of the database, so a fingerprint, counts and vectors
    read one after another agree with each other while other writers carry on."""
    with sessions() as s:
        s.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
        yield s
