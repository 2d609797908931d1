"""Several prototypes per category: k-means slots stored in PostgreSQL, stage 1 ranking a category by its closest
prototype, and the slots' sums kept exact under additions and deletions."""
import hashlib

import numpy as np
import sqlalchemy as sa

from backend.pipeline.consistency import check
from backend.search.category_index import CategoryIndex
from backend.service.index_manager import IndexManager
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.tables import Embedding, Prototype

MODEL, DIM = "test-slots", 8


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _two_lobed(n: int, seed: int = 0):
    """Category "x" in two lobes (around axes 0 and 1), category "y" between axis 0 and axis 2: for a query on axis
    0, in x's first lobe, the mean of x (45 degrees away) is farther than y's (42 degrees), so one prototype per
    category ranks "y" first; x's prototype of that lobe ranks "x" first."""
    rng = np.random.default_rng(seed)
    lobes = np.where(np.arange(n)[:, None] % 2 == 0, np.eye(DIM)[0], np.eye(DIM)[1])
    x = _unit(lobes + rng.normal(scale=0.05, size=(n, DIM)))
    y = _unit(np.eye(DIM)[0] + 0.9 * np.eye(DIM)[2] + rng.normal(scale=0.05, size=(n, DIM)))
    return x, y


def _store(sessions, vectors: np.ndarray, category: str, salt: str) -> list[int]:
    with sessions() as s, s.begin():
        images = [image_store.NewImage(hashlib.sha256(f"{salt}{n}".encode()).hexdigest(), b"x", 1, 1, "PNG", category)
                  for n in range(len(vectors))]
        ids = image_store.insert_images(s, images)
        ordered = [ids[im.sha256] for im in images]
        image_store.insert_embeddings(s, MODEL, ordered, vectors)
    return ordered


def _slots(sessions) -> dict[int, int]:
    with sessions() as s:
        return dict(s.execute(sa.select(Prototype.slot, Prototype.member_count)
                              .where(Prototype.model_name == MODEL, Prototype.category_id == _category(s, "x"))).all())


def _category(s, name):
    return s.scalar(sa.text("SELECT id FROM categories WHERE name = :n"), {"n": name})


def test_a_category_in_two_lobes_is_found_by_its_closest_prototype(sessions, tmp_path):
    x, y = _two_lobed(120)
    x_ids = _store(sessions, x, "x", "x")
    _store(sessions, y, "y", "y")
    query = np.eye(DIM, dtype=np.float32)[:1]  # in x's first lobe
    with sessions() as s, s.begin():
        assert prototype_store.rebuild_prototypes(s, MODEL, per_category=1) == 2  # one mean per category
    manager = IndexManager(sessions, MODEL, DIM, "flatip", tmp_path)
    manager.rebuild(save=False, prototypes=False)
    with sessions() as s:
        x_id, y_id = _category(s, "x"), _category(s, "y")
    assert manager.index.rank_prototypes(query)[0][0, 0] == y_id

    with sessions() as s, s.begin():
        assert prototype_store.rebuild_prototypes(s, MODEL, per_category=4) == 2 + 2  # 120 members: 2 slots of >= 50 each
    manager.sync([])
    assert manager.index.rank_prototypes(query)[0][0, 0] == x_id
    assert sorted(_slots(sessions).values()) == [60, 60]  # k-means found the two lobes
    with sessions() as s:
        slot_of = dict(s.execute(sa.select(Embedding.image_id, Embedding.slot).where(Embedding.model_name == MODEL)).all())
    assert {slot_of[i] for i in x_ids[0::2]} != {slot_of[i] for i in x_ids[1::2]}  # one lobe per slot
    assert len({slot_of[i] for i in x_ids[0::2]}) == 1
    assert check(sessions, MODEL, manager.index).ok


def test_additions_and_deletions_keep_each_slot_exact(sessions, tmp_path):
    x, y = _two_lobed(120)
    x_ids = _store(sessions, x, "x", "x")
    _store(sessions, y, "y", "y")
    with sessions() as s, s.begin():
        prototype_store.rebuild_prototypes(s, MODEL, per_category=2)
    before = _slots(sessions)
    new = _store(sessions, _unit(np.eye(DIM)[1] + np.random.default_rng(1).normal(scale=0.05, size=(5, DIM))),
                 "x", "new")  # all in the second lobe
    with sessions() as s:
        new_slots = set(s.scalars(sa.select(Embedding.slot).where(Embedding.image_id.in_(new))))
        lobe_slot = s.scalar(sa.select(Embedding.slot).where(Embedding.image_id == x_ids[1]))
    assert new_slots == {lobe_slot}  # each counted towards the closest prototype
    after = _slots(sessions)
    assert after[lobe_slot] == before[lobe_slot] + 5 and sum(after.values()) == 125
    manager = IndexManager(sessions, MODEL, DIM, "flatip", tmp_path)
    manager.rebuild(save=False, prototypes=False)
    assert check(sessions, MODEL, manager.index).ok  # the sums were added to the right slot

    with sessions() as s, s.begin():  # the whole first lobe goes: its prototype goes with it
        image_store.delete_images(s, x_ids[0::2])
    assert list(_slots(sessions).values()) == [65]
    manager.sync()
    assert check(sessions, MODEL, manager.index).ok


def test_the_index_holds_several_prototypes_per_category_through_a_snapshot(tmp_path):
    from backend.search import snapshot

    index = CategoryIndex(DIM, "flatip")
    vectors = _unit(np.eye(DIM)[:4])
    index.add(np.arange(4), vectors, np.array([7, 7, 9, 9]))
    index.set_prototypes([7, 7, 9], np.stack([vectors[0], vectors[1], vectors[2]]))
    cats, sims = index.category_similarities(vectors[1:2])
    assert cats.tolist() == [7, 9] and np.allclose(sims, [[1, 0]])  # category 7 by its second prototype
    path = tmp_path / "i.snapshot"
    with open(path, "wb") as f:
        snapshot.write(f, index, {"model": MODEL})
    loaded, _ = snapshot.read(path)
    assert [c.tolist() for c in loaded.prototypes()][0] == [7, 7, 9]
    assert np.array_equal(loaded.prototypes()[1], index.prototypes()[1])
    assert loaded.rank_prototypes(vectors[1:2])[0][0].tolist() == [7, 9]


def test_a_snapshot_takes_its_prototypes_from_postgresql(sessions, tmp_path):
    x, y = _two_lobed(120)
    _store(sessions, x, "x", "x")
    _store(sessions, y, "y", "y")
    with sessions() as s, s.begin():
        prototype_store.rebuild_prototypes(s, MODEL, per_category=1)
    manager = IndexManager(sessions, MODEL, DIM, "flatip", tmp_path)
    manager.rebuild(save=True, prototypes=False)  # a snapshot with one prototype per category
    with sessions() as s, s.begin():  # then the prototypes alone are rebuilt, by another process
        assert prototype_store.rebuild_prototypes(s, MODEL, per_category=2) == 4
    reopened = IndexManager(sessions, MODEL, DIM, "flatip", tmp_path)
    assert reopened.load_or_build() == "snapshot" and len(reopened.index.prototypes()[0]) == 4
    assert check(sessions, MODEL, reopened.index).ok


def test_prototypes_read_as_binary_copy_equal_pgvectors_text(sessions):
    """load_prototypes reads them through COPY's binary form: the same categories, counts and vectors as the ORM's
    row-by-row text parse, bit for bit."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with sessions() as s, s.begin():
        image_store.ensure_model(s, "m", 24)
        new = [image_store.NewImage(sha256=f"{i:064x}", data=b"-", width=1, height=1, format="PNG",
                                    category=f"c{i % 5}") for i in range(40)]
        ids = image_store.insert_images(s, new)
        image_store.insert_embeddings(s, "m", [ids[im.sha256] for im in new], vectors)
    with sessions() as s:
        cats, protos, counts = prototype_store.load_prototypes(s, "m")
        rows = s.execute(sa.select(Prototype.category_id, Prototype.vector, Prototype.member_count)
                         .where(Prototype.model_name == "m").order_by(Prototype.category_id, Prototype.slot)).all()
        none = prototype_store.load_prototypes(s, "other")
    assert none[0] == [] and none[1].shape == (0, 0) and none[2] == []
    assert cats == [r[0] for r in rows] and counts == [r[2] for r in rows] == [8] * 5
    assert protos.dtype == np.float32 and np.array_equal(protos, np.stack([np.asarray(r[1], np.float32) for r in rows]))


def test_recomputing_the_prototypes_of_unchanged_data_rewrites_no_vector(sessions, monkeypatch):
    monkeypatch.setattr(prototype_store, "KMEANS_SAMPLE", 20)  # k-means learns from a sample of the category
    _store(sessions, _unit(np.random.default_rng(2).normal(size=(400, DIM))), "x", "x")  # no clusters: any sample
    # gives other centroids

    def row_versions():
        with sessions() as s:
            return dict(s.execute(sa.text("SELECT image_id, xmin::text FROM embeddings WHERE model_name = :m"),
                                  {"m": MODEL}).all())

    with sessions() as s, s.begin():
        prototype_store.rebuild_prototypes(s, MODEL, per_category=4)
        # Half the rows move to the table's end (an update writes a new row version), as any write may move them.
        s.execute(sa.text("UPDATE embeddings SET slot = slot WHERE image_id % 2 = 0"))
        s.execute(sa.text("UPDATE images SET category_id = category_id WHERE id % 2 = 0"))
    before, slots = row_versions(), _slots(sessions)
    with sessions() as s, s.begin():
        prototype_store.rebuild_prototypes(s, MODEL, per_category=4)
    assert row_versions() == before and _slots(sessions) == slots  # the same sample, the same slots: nothing written


def test_resetting_the_slots_of_unsplit_categories_is_an_anti_join_at_any_size(sessions, engine):
    """With NOT IN, PostgreSQL scanned the split categories' ids once per vector as soon as they outgrew work_mem:
    a million vectors' prototypes never finished recomputing."""
    x, y = _two_lobed(120)
    _store(sessions, x, "x", "x")
    _store(sessions, y[:40], "y", "y")  # under 2 x MIN_SLOT_MEMBERS: one slot, so "y" is reset to slot 0
    statements = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("UPDATE embeddings SET slot="):
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions() as s, s.begin():
            prototype_store.rebuild_prototypes(s, MODEL, per_category=2)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(statements) == 1
    with engine.connect() as conn:
        conn.exec_driver_sql("SET work_mem = '64kB'")  # as if the ids were far too many to hash
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statements[0][0], statements[0][1]))
    assert "Anti Join" in plan and "SubPlan" not in plan, plan
