"""Vectors out of PostgreSQL in bulk (binary COPY parsed by numpy) give exactly what the ORM reads, on a real
PostgreSQL; batch edges and subsets included."""
import numpy as np
import pytest
import sqlalchemy as sa

from backend.storage import images as image_store
from backend.storage.members import copy_members, copy_vectors_in, fetch_members
from backend.storage.tables import Embedding, Image

DIM = 7


@pytest.fixture
def stored(sessions):
    """25 images in 3 categories with DIM-d vectors (one with no category, one with another model's vector only)."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(25, DIM)).astype(np.float32)
    with sessions() as s, s.begin():
        new = [image_store.NewImage(sha256=f"{i:064x}", data=b"x", width=1, height=1, format="PNG",
                              category=None if i == 24 else f"c{i % 3}") for i in range(25)]
        ids = image_store.insert_images(s, new)
        image_ids = [ids[im.sha256] for im in new]
        image_store.insert_embeddings(s, "m", image_ids[:23] + image_ids[24:], np.concatenate([vectors[:23], vectors[24:]]))
        image_store.insert_embeddings(s, "other", image_ids[23:24], vectors[23:24])
    return image_ids


def _orm(sessions, image_ids=None):
    with sessions() as s:
        query = (sa.select(Embedding.image_id, Image.category_id, Embedding.vector)
                 .join(Image, Image.id == Embedding.image_id)
                 .where(Embedding.model_name == "m", Image.category_id.is_not(None)).order_by(Embedding.image_id))
        if image_ids is not None:
            query = query.where(Embedding.image_id.in_(image_ids))
        return s.execute(query).all()


@pytest.mark.parametrize("batch_rows", [1, 4, 4096])
def test_copy_gives_what_the_orm_reads(sessions, stored, monkeypatch, batch_rows):
    monkeypatch.setattr("backend.storage.members.BATCH_ROWS", batch_rows)
    rows = _orm(sessions)
    assert len(rows) == 23  # neither the uncategorised image nor the other model's vector
    with sessions() as s:
        ids, cats, vectors = fetch_members(s, "m", DIM)
        batches = []
        assert copy_members(s, "m", DIM, lambda *batch: batches.append(batch)) == 23
    assert ids.tolist() == [r[0] for r in rows] and cats.tolist() == [r[1] for r in rows]
    np.testing.assert_array_equal(vectors, np.stack([np.asarray(r[2], np.float32) for r in rows]))
    assert vectors.dtype == np.float32 and ids.dtype == cats.dtype == np.int64
    assert max(len(b[0]) for b in batches) <= max(batch_rows, 1) and sum(len(b[0]) for b in batches) == 23
    assert sorted(np.concatenate([b[0] for b in batches]).tolist()) == ids.tolist()


def test_a_subset_by_id(sessions, stored):
    wanted = stored[3:9] + [stored[24], 10**12]  # one without a category, one that does not exist
    with sessions() as s:
        ids, cats, vectors = fetch_members(s, "m", DIM, wanted)
        none = fetch_members(s, "m", DIM, [])
    assert ids.tolist() == sorted(stored[3:9]) and vectors.shape == (6, DIM)
    assert none[0].size == 0 and none[2].shape == (0, DIM)


def test_a_dimension_that_does_not_match_is_refused(sessions, stored):
    with sessions() as s, pytest.raises(ValueError, match="not \\(bigint, integer, 8-d vector\\)"):
        fetch_members(s, "m", DIM + 1)


def test_an_error_while_consuming_stops_the_copy_and_is_raised(sessions, stored, monkeypatch):
    monkeypatch.setattr("backend.storage.members.BATCH_ROWS", 2)
    seen = []

    def consume(ids, cats, vectors):
        seen.append(len(ids))
        if len(seen) == 2:
            raise RuntimeError("index full")

    with sessions() as s, pytest.raises(RuntimeError, match="index full"):
        copy_members(s, "m", DIM, consume)
    assert len(seen) == 2  # nothing handed over after the failure
    with sessions() as s:  # and the connection is fit for use again
        assert fetch_members(s, "m", DIM)[0].size == 23


def test_a_copy_that_fails_raises_sqlalchemys_error_and_a_lost_connection_is_dropped(sessions, engine):
    with sessions() as s:
        with pytest.raises(sa.exc.DataError):  # pgvector refuses a vector of no dimensions
            copy_vectors_in(s, [1], np.zeros((1, 0), np.float32))
    with sessions() as s:
        pid = s.scalar(sa.text("SELECT pg_backend_pid()"))
        with engine.connect() as other:  # what a restart of PostgreSQL does to the session's connection
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa.exc.OperationalError) as lost:
            fetch_members(s, "m", DIM)
        assert lost.value.connection_invalidated  # the pool opens a new one instead of handing this out again
