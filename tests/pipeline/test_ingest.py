"""Ingestion into a real PostgreSQL: every dataset kind, de-duplication, resume, prototypes."""
import collections

import numpy as np
import pytest
import sqlalchemy as sa

from backend.pipeline.datasets import Item, load_dataset
from backend.pipeline.ingest import _GroupWriter, ingest
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.tables import Category, Embedding, Image, Prototype
from tests.helpers import CLASSES, PixelEmbedder, write_cifar10_batches, write_fashion_mnist, write_folder_dataset

MODEL = PixelEmbedder.name


def _rows(sessions):
    """Everything stored, keyed by content, without ids or timestamps."""
    with sessions() as s:
        images = s.execute(sa.select(Image.sha256, Image.width, Image.height, Image.format, Image.label,
                                     Image.original_name, Image.source_dataset, Category.name)
                           .join(Category, isouter=True).order_by(Image.sha256)).all()
        vectors = s.execute(sa.select(Image.sha256, Embedding.vector).join(Embedding)
                            .order_by(Image.sha256)).all()
        protos = s.execute(sa.select(Category.name, Prototype.vector, Prototype.member_count)
                           .join(Category).order_by(Category.name)).all()
    return images, vectors, protos


def _prototype_check(sessions):
    """Each stored prototype equals the re-normalised numpy mean of its members' stored vectors."""
    with sessions() as s:
        members = s.execute(sa.select(Image.category_id, Embedding.vector).join(Embedding)
                            .where(Embedding.model_name == MODEL)).all()
        ids, protos, counts = prototype_store.load_prototypes(s, MODEL)
    by_cat = collections.defaultdict(list)
    for cat, vec in members:
        by_cat[cat].append(np.asarray(vec, dtype=np.float64))
    assert sorted(by_cat) == ids
    for cat, proto, count in zip(ids, protos, counts):
        mean = np.mean(by_cat[cat], axis=0)
        np.testing.assert_allclose(proto, mean / np.linalg.norm(mean), atol=1e-5)
        assert count == len(by_cat[cat])
    return len(ids)


@pytest.mark.parametrize("kind", ["cifar10", "fashion-mnist", "folder", "csv"])
def test_ingest_each_dataset_kind(kind, sessions, tmp_path):
    if kind == "cifar10":
        write_cifar10_batches(tmp_path, n_per_batch=6)
        items = load_dataset("cifar10", "train", tmp_path)
    elif kind == "fashion-mnist":
        write_fashion_mnist(tmp_path, n_per_class=3)
        items = load_dataset("fashion-mnist", "train", tmp_path)
    else:
        write_folder_dataset(tmp_path / "f", n_per_class=5)
        if kind == "folder":
            items = load_dataset("folder", data_dir=tmp_path / "f")
        else:
            rows = "".join(f"{c}/{p.name},{c}\n" for c in CLASSES for p in sorted((tmp_path / "f" / c).iterdir()))
            (tmp_path / "list.csv").write_text("file,category\n" + rows + "missing.png,red\n")
            items = load_dataset("csv", data_dir=tmp_path / "list.csv", image_dir=tmp_path / "f")
    report = ingest(sessions, items, PixelEmbedder(), batch_size=7, progress=False)
    expected_failures = 1 if kind == "csv" else 0
    assert report.added == len(items) - expected_failures and len(report.failed) == expected_failures
    with sessions() as s:
        c = image_store.counts(s)
        stored = s.execute(sa.select(Image.original_name, Category.name, Image.label, Image.source_dataset)
                           .join(Category)).all()
    assert c["images"] == report.added and c["embeddings"] == {MODEL: report.added}
    assert c["categories"] == len({it.category for it in items})
    expected = {(it.original_name, it.category, it.label, it.source) for it in items if it.original_name != "missing.png"}
    assert set(stored) == expected
    assert _prototype_check(sessions) == c["categories"]
    if kind == "csv":
        assert "missing.png" in report.failed[0][0] and "cannot read" in report.failed[0][1]


def _folder_items(tmp_path, n_per_class=6):
    write_folder_dataset(tmp_path / "f", n_per_class=n_per_class)
    return load_dataset("folder", data_dir=tmp_path / "f")


def test_rerun_adds_nothing_and_duplicates_within_a_run_are_skipped(sessions, tmp_path):
    items = _folder_items(tmp_path)
    first = ingest(sessions, items + items[:3], PixelEmbedder(), batch_size=5, progress=False)
    assert (first.added, first.duplicates) == (len(items), 3)
    before = _rows(sessions)
    again = ingest(sessions, items, PixelEmbedder(), batch_size=5, progress=False)
    assert (again.added, again.duplicates, again.failed) == (0, len(items), [])
    assert _rows(sessions) == before
    # A person re-running it reads that everything was already there, not a rate of nothing ("0.0 images/s").
    assert again.summary().startswith(f"added 0, {len(items)} already stored, failed 0 in ")
    assert "images/s" not in again.summary() and f"nothing new: all {len(items)} were" in again.summary()
    assert "images/s)" in first.summary()


def test_undecodable_files_are_reported_not_stored(sessions):
    items = [Item("x", 0, "junk.png", "test", None, lambda: b"not an image"),
             Item("x", 0, "empty.png", "test", None, lambda: b"")]
    report = ingest(sessions, items, PixelEmbedder(), progress=False)
    assert report.added == 0 and [name for name, _ in report.failed] == ["junk.png", "empty.png"]
    with sessions() as s:
        assert image_store.counts(s)["images"] == 0


def test_interrupted_run_resumed_equals_uninterrupted_run(pg_server, tmp_path, engine):
    from sqlalchemy.orm import sessionmaker

    from backend.storage.engine import create_engine_checked
    from tests.conftest import TEMPLATE, _new_database

    items = _folder_items(tmp_path)
    interrupted = sessionmaker(engine)
    with pytest.raises(KeyboardInterrupt):
        ingest(interrupted, items, PixelEmbedder(fail_after_batches=2), batch_size=4, progress=False)
    with interrupted() as s:
        assert image_store.counts(s)["images"] == 8  # two whole batches, nothing of the third
    _prototype_check(interrupted)
    resumed = ingest(interrupted, items, PixelEmbedder(), batch_size=4, progress=False)
    assert (resumed.added, resumed.duplicates) == (len(items) - 8, 8)

    clean_engine = create_engine_checked(_new_database(pg_server, TEMPLATE))
    clean = sessionmaker(clean_engine)
    ingest(clean, items, PixelEmbedder(), batch_size=4, progress=False)
    (images_a, vectors_a, protos_a), (images_b, vectors_b, protos_b) = _rows(interrupted), _rows(clean)
    assert images_a == images_b
    assert [(sha, list(v)) for sha, v in vectors_a] == [(sha, list(v)) for sha, v in vectors_b]
    assert [(n, c) for n, _, c in protos_a] == [(n, c) for n, _, c in protos_b]
    np.testing.assert_allclose(np.stack([v for _, v, _ in protos_a]), np.stack([v for _, v, _ in protos_b]), atol=1e-6)
    clean_engine.dispose()


def test_prototypes_follow_deletes_and_rebuild_matches(sessions, tmp_path):
    items = _folder_items(tmp_path, n_per_class=5)
    report = ingest(sessions, items, PixelEmbedder(), batch_size=4, progress=False)
    with sessions() as s, s.begin():
        red = s.scalars(sa.select(Image.id).join(Category).where(Category.name == "red")).all()
        assert image_store.delete_images(s, red[:2] + [report.image_ids[-1]]) == 3
    assert _prototype_check(sessions) == 3
    with sessions() as s, s.begin():
        image_store.delete_images(s, red)  # the last red ones: its prototype goes
    assert _prototype_check(sessions) == 2
    with sessions() as s:
        incremental = prototype_store.load_prototypes(s, MODEL)
    with sessions() as s, s.begin():
        assert prototype_store.rebuild_prototypes(s, MODEL) == 2
    with sessions() as s:
        rebuilt = prototype_store.load_prototypes(s, MODEL)
    assert incremental[0] == rebuilt[0] and incremental[2] == rebuilt[2]
    np.testing.assert_allclose(incremental[1], rebuilt[1], atol=1e-6)


def test_an_image_stored_for_one_model_is_embedded_for_another(sessions, tmp_path):
    items = _folder_items(tmp_path, n_per_class=2)
    ingest(sessions, items, PixelEmbedder(), progress=False)

    class OtherModel(PixelEmbedder):
        name = "test-pixels-2"

    report = ingest(sessions, items, OtherModel(), progress=False)
    assert (report.added, report.embedded_existing) == (0, len(items))
    assert report.summary().startswith(f"added 0, embedded {len(items)} stored without a vector for this model, 0 ")
    with sessions() as s:
        c = image_store.counts(s)
    assert c["images"] == len(items) and c["embeddings"] == {MODEL: len(items), "test-pixels-2": len(items)}
    assert c["prototypes"] == {MODEL: 3, "test-pixels-2": 3}


def test_reading_embedding_and_storing_overlap(sessions, monkeypatch):
    """While the model embeds one batch, the next is being read and earlier ones stored: each forward pass waits
    for both to happen, which a one-stage-at-a-time loop never lets happen (it would time out)."""
    import threading

    from PIL import Image as PILImage

    from tests.helpers import png_bytes

    batch_size, batches = 4, 4
    read_batches, stored = set(), []
    changed = threading.Condition()

    def reader(n):
        def read():
            with changed:
                read_batches.add(n // batch_size)
                changed.notify_all()
            return png_bytes(PILImage.new("RGB", (20, 20), (n * 9 % 256, n * 31 % 256, n * 57 % 256)))
        return read

    real_insert = image_store.insert_embeddings

    def insert_embeddings(session, model, ids, vectors):
        inserted = real_insert(session, model, ids, vectors)
        with changed:
            stored.extend(ids)
            changed.notify_all()
        return inserted

    monkeypatch.setattr(image_store, "insert_embeddings", insert_embeddings)
    monkeypatch.setattr(_GroupWriter, "GROUP_IMAGES", batch_size)  # each batch is due to be stored at once

    class Waiting(PixelEmbedder):
        def embed_prepared(self, batch):
            n = self.calls
            # batch n embeds only once batch n+1 was read and batch n-2 stored (n-1 may wait to be stored with n:
            # group commit)
            with changed:
                assert changed.wait_for(lambda: (n + 1 in read_batches or n + 1 == batches)
                                        and len(stored) >= (n - 1) * batch_size, timeout=20), (n, read_batches,
                                                                                               len(stored))
            return super().embed_prepared(batch)

    items = [Item("red", None, f"{n}.png", "test", None, reader(n)) for n in range(batch_size * batches)]
    report = ingest(sessions, items, Waiting(), batch_size=batch_size, progress=False)
    assert report.added == batch_size * batches and not report.failed


def test_of_identical_files_in_different_batches_the_first_wins(sessions):
    """Batches are prepared side by side; which copy is stored must not depend on which thread hashed first."""
    import time

    from PIL import Image as PILImage

    from tests.helpers import png_bytes

    data = png_bytes(PILImage.new("RGB", (20, 20), (200, 30, 30)))

    def slow_read():
        time.sleep(0.5)  # the second copy, in the next batch, is read and hashed first
        return data

    items = [Item("first", None, "a.png", "test", None, slow_read), Item("second", None, "b.png", "test", None,
                                                                         lambda: data)]
    report = ingest(sessions, items, PixelEmbedder(), batch_size=1, progress=False)
    assert (report.added, report.duplicates) == (1, 1)
    with sessions() as s:
        stored = s.execute(sa.select(Image.original_name, Category.name).join(Category)).all()
    assert stored == [("a.png", "first")]


def test_batches_are_stored_group_images_at_a_time_and_the_rest_at_the_end(sessions, monkeypatch):
    """A transaction per 4-image batch cost more CPU than the model at 600 images/s: stored 8 or more at a time."""
    from backend.pipeline import ingest as ingest_module

    sizes = []
    real_store = ingest_module.store_batch

    def store_batch(session_factory, ready, *args):
        sizes.append(len(ready.to_embed))
        return real_store(session_factory, ready, *args)

    monkeypatch.setattr(ingest_module, "store_batch", store_batch)
    monkeypatch.setattr(_GroupWriter, "GROUP_IMAGES", 8)
    items = [Item("red", None, f"{n}.png", "test", None, _png_reader(n)) for n in range(22)]
    report = ingest(sessions, items, PixelEmbedder(), batch_size=4, progress=False)
    assert report.added == 22 and sum(sizes) == 22
    assert all(size >= 8 for size in sizes[:-1]) and len(sizes) < 6, sizes  # the last: what was left at the end


def test_a_run_that_fails_raises_its_own_error_with_what_was_embedded_stored(sessions, monkeypatch):
    """Batches embedded before a failure are stored; a store failing meanwhile must not replace the run's error."""
    import threading

    from backend.pipeline import ingest as ingest_module

    failed, real_store = threading.Event(), ingest_module.store_batch

    class Failing(PixelEmbedder):
        def embed_prepared(self, batch):
            if self.calls == 2:
                failed.set()
                raise ValueError("the model failed")
            return super().embed_prepared(batch)

    items = [Item("red", None, f"{n}.png", "test", None, _png_reader(n)) for n in range(12)]
    monkeypatch.setattr(_GroupWriter, "GROUP_IMAGES", 4)
    with pytest.raises(ValueError, match="the model failed"):
        ingest(sessions, items, Failing(), batch_size=4, progress=False)
    with sessions() as s:
        assert image_store.counts(s)["embeddings"] == {MODEL: 8}

    def store_failing_once_the_model_failed(*args):
        assert failed.wait(20)
        raise RuntimeError("disk gone")

    failed.clear()
    monkeypatch.setattr(ingest_module, "store_batch", store_failing_once_the_model_failed)
    with pytest.raises(ValueError, match="the model failed") as raised:
        ingest(sessions, [Item("red", None, f"{n}.png", "test", None, _png_reader(n)) for n in range(100, 112)],
               Failing(), batch_size=4, progress=False)
    assert "disk gone" in "".join(raised.value.__notes__)
    monkeypatch.setattr(ingest_module, "store_batch", real_store)


def _png_reader(n: int):
    from PIL import Image as PILImage

    from tests.helpers import png_bytes

    return lambda: png_bytes(PILImage.new("RGB", (20, 20), (n * 9 % 256, n * 31 % 256, n * 57 % 256)))
