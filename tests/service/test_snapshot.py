"""The index snapshot can never stop the service or mislead it: a damaged, inconsistent or foreign file is moved
aside and the index rebuilt from PostgreSQL (real PostgreSQL, stand-in embedder)."""
import logging
import os

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image as PILImage

from backend.search import snapshot
from backend.search.snapshot import read_meta
from backend.service.image_search import ImageSearch
from backend.service.index_manager import IndexManager
from backend.storage.collections import DEFAULT, snapshot_dir_of
from backend.storage.fingerprints import fingerprint, index_fingerprint
from backend.storage.tables import Embedding, Image
from tests.helpers import PixelEmbedder, png_bytes, write_folder_dataset

MODEL, DIM = PixelEmbedder.name, PixelEmbedder.dim


def _open(sessions, folder, index_type="flatip"):
    return ImageSearch(sessions, PixelEmbedder(), index_type, snapshot_dir=folder, batch_size=8)


def _snapshot_file(folder, index_type="flatip"):
    """Where the default collection's snapshot is kept under SNAPSHOT_DIR `folder`: the rule the CLI reads it by."""
    return snapshot.snapshot_path(snapshot_dir_of(folder, DEFAULT), MODEL, index_type)


@pytest.fixture
def built(sessions, tmp_path):
    """A 24-image collection in PostgreSQL with a current snapshot of it in tmp_path/snap; returns that ImageSearch."""
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    search = _open(sessions, tmp_path / "snap")
    search.build_database("folder", tmp_path / "f", progress=False)
    search.save_snapshot()
    assert _open(sessions, tmp_path / "snap").index_source == "snapshot"
    return search


def _results(search):
    queries = PixelEmbedder().embed([PILImage.new("RGB", (32, 32), c) for c in
                                     [(200, 20, 20), (20, 200, 20), (20, 20, 200), (120, 120, 120)]])
    return [[(r.image_id, round(r.score, 5)) for r in search.search_vector(q, 10, top_categories=2).results]
            for q in queries]


def _truncated(path, sessions):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path, sessions):
    path.write_bytes(b"")


def _random_bytes(path, sessions):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _bit_flipped(path, sessions):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle: the zip structure still reads
    path.write_bytes(bytes(data))


def _category_zeroed_old_footer(path, sessions):
    data = bytearray(path.read_bytes())
    _, offset, length, _ = snapshot.read_footer(np.frombuffer(bytes(data), np.uint8))["partitions"][0]
    data[offset:offset + length] = bytes(length)  # the footer still describes the old bytes
    path.write_bytes(bytes(data))


def _footer_edited(path, sessions):
    text = path.read_bytes()
    path.write_bytes(text.replace(b'"vectors": 24', b'"vectors": 25'))  # same length; the footer's CRC no longer fits


def _members(sessions, category):
    """(image id, vector) of a category's images, from PostgreSQL."""
    with sessions() as s:
        return s.execute(sa.select(Embedding.image_id, Embedding.vector).join(Image, Image.id == Embedding.image_id)
                         .where(Image.category_id == category).order_by(Embedding.image_id)).all()


def _self_consistent_but_not_postgres(path, sessions):
    """A well-formed snapshot, checksum and all, that lacks a category while claiming the database's fingerprint."""
    manager = IndexManager(sessions, MODEL, DIM, "flatip", path.parent)
    manager.rebuild(save=False)
    manager.index.remove([i for i, _ in _members(sessions, 1)])
    manager.index.drop_prototypes([1])
    with sessions() as s:
        manager.fingerprint = fingerprint(s, MODEL)  # faked: the contents no longer bear it out
    manager.save_snapshot()


def _categories_swapped_same_counts(path, sessions):
    """Counts per category as in PostgreSQL, checksum fine, fingerprint claimed; but two images trade categories."""
    manager = IndexManager(sessions, MODEL, DIM, "flatip", path.parent)
    manager.rebuild(save=False)
    (a, vector_a), (b, vector_b) = _members(sessions, 1)[0], _members(sessions, 2)[0]
    manager.index.add([a, b], np.stack([vector_a, vector_b]), [2, 1])  # an id already present is replaced
    manager.save_snapshot()  # manager.fingerprint is still the database's


def _another_index_type(path, sessions):
    other = IndexManager(sessions, MODEL, DIM, "flatl2", path.parent)
    other.rebuild(save=True)
    os.replace(other.snapshot_path, path)


DAMAGE = {
    "truncated": (_truncated, "unreadable"),
    "empty": (_empty, "unreadable (ValueError: cannot mmap an empty file)"),
    "random bytes": (_random_bytes, "unreadable (ValueError: not an imsrc snapshot (no header))"),
    "one bit flipped": (_bit_flipped, "snapshot was "),
    "a category zeroed, old footer": (_category_zeroed_old_footer, "corrupt (checksum mismatch)"),
    "footer edited": (_footer_edited, "unreadable (ValueError: footer checksum mismatch)"),
    "consistent, but not with PostgreSQL": (_self_consistent_but_not_postgres, "out of step with PostgreSQL (category"),
    "categories swapped, same counts": (_categories_swapped_same_counts, "other images or categories"),
    "another index type": (_another_index_type, "for another index"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_snapshot_is_moved_aside_and_the_index_rebuilt(built, sessions, tmp_path, caplog, damage):
    damage_file, reason = DAMAGE[damage]
    path = _snapshot_file(tmp_path / "snap")
    damage_file(path, sessions)
    damaged = path.read_bytes()
    caplog.set_level(logging.INFO, logger="backend.service.index_manager")

    search = _open(sessions, tmp_path / "snap")  # must not raise

    assert search.index_source.startswith("rebuilt: snapshot was ") and reason in search.index_source
    bad = sorted((tmp_path / "snap").glob(f"{path.stem}.bad-*{snapshot.SUFFIX}"))
    assert len(bad) == 1 and f"moved to {bad[0]}" in search.index_source
    assert bad[0].read_bytes() == damaged  # kept for a person to look at, as it was
    assert any(r.levelno == logging.WARNING and reason in r.getMessage() for r in caplog.records)
    fresh = _open(sessions, tmp_path / "fresh")
    assert fresh.index_source == "rebuilt"
    assert _results(search) == _results(fresh) and search.index.categories == fresh.index.categories
    assert search.check().ok
    assert _open(sessions, tmp_path / "snap").index_source == "snapshot"  # a sound snapshot was written


def test_rebuild_says_rebuilt(built, sessions, tmp_path):
    search = _open(sessions, tmp_path / "snap")
    assert search.index_source == "snapshot"
    search.rebuild()
    assert search.index_source == "rebuilt"


def test_the_snapshot_is_one_self_describing_file_written_atomically(built, sessions, tmp_path, monkeypatch):
    folder = tmp_path / "snap"
    path = _snapshot_file(folder)
    files = sorted([path.name, path.with_suffix(".writer").name])  # the snapshot, and who writes it
    assert sorted(p.name for p in folder.iterdir()) == files  # no other sidecar, no temp file
    meta = read_meta(path)  # what the set-up menu's state line reads
    assert (meta["model"], meta["fingerprint"], meta["vectors"]) == (MODEL, index_fingerprint(built.index), 24)
    before = path.read_bytes()

    def crash(file, index, meta):
        file.write(b"half a snapshot")
        raise OSError("disk full")

    monkeypatch.setattr("backend.service.index_manager.snapshot.write", crash)
    with pytest.raises(OSError, match="disk full"):
        built.save_snapshot()
    assert path.read_bytes() == before  # the old snapshot, whole
    assert sorted(p.name for p in folder.iterdir()) == files


def test_a_snapshot_that_cannot_be_written_does_not_stop_start_up(built, sessions, tmp_path, monkeypatch, caplog):
    _snapshot_file(tmp_path / "snap").write_bytes(b"garbage")
    monkeypatch.setattr("backend.service.index_manager.os.fsync", lambda fd: (_ for _ in ()).throw(OSError("read-only")))
    search = _open(sessions, tmp_path / "snap")
    assert search.index_source.startswith("rebuilt: snapshot was unreadable") and len(search.index) == 24
    assert "could not write the snapshot" in caplog.text


def test_a_refresh_after_another_process_wrote_is_snapshotted_at_shutdown(built, sessions, tmp_path):
    """The server's refresh picks up another process's upload; closing must write the snapshot, so that it matches
    PostgreSQL afterwards (a check of it passes, and the next start loads it)."""
    from backend.pipeline.consistency import check_snapshot

    server = _open(sessions, tmp_path / "snap")
    other = _open(sessions, tmp_path / "other")
    other.add_image(png_bytes(PILImage.new("RGB", (32, 32), (3, 140, 70))), "teal")
    assert server.refresh() == (1, 0)
    server.close()
    assert check_snapshot(sessions, MODEL, DIM, "flatip", tmp_path / "snap").ok
    assert _open(sessions, tmp_path / "snap").index_source == "snapshot"


def test_check_calls_a_snapshot_older_than_the_database_stale_and_a_disagreeing_one_wrong(built, sessions, tmp_path):
    from backend.pipeline.consistency import check_snapshot

    folder = tmp_path / "snap"
    _open(sessions, tmp_path / "other").add_image(png_bytes(PILImage.new("RGB", (32, 32), (3, 140, 70))), "teal")
    stale = check_snapshot(sessions, MODEL, DIM, "flatip", folder)  # as after a server that crashed
    assert stale.ok and stale.index is None and stale.images == 25, stale.findings
    assert any("older than the database" in note and "the next start rebuilds it" in note for note in stale.notes)
    _open(sessions, folder).save_snapshot()  # current again
    with sessions.begin() as s:  # a vector changed under the snapshot, its images and categories unchanged
        s.execute(sa.update(Embedding).where(Embedding.image_id == 1).values(vector=np.full(DIM, 0.25, np.float32)))
    wrong = check_snapshot(sessions, MODEL, DIM, "flatip", folder)
    assert not wrong.ok and wrong.index == "snapshot"
    assert any("vector in the index differs from PostgreSQL's: 1 (ids 1)" in f for f in wrong.findings), wrong.findings


def test_a_compressed_index_re_ranks_from_its_snapshot_s_full_vectors_and_grows_past_them(sessions, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    built = _open(sessions, tmp_path / "snap", "rabitq")
    built.build_database("folder", tmp_path / "f", progress=False)
    built.save_snapshot()
    loaded = _open(sessions, tmp_path / "snap", "rabitq")
    assert loaded.index_source == "snapshot" and _results(loaded) == _results(built)
    exact = _results(_open(sessions, tmp_path / "flat", "flatip"))
    # Every candidate is re-scored from the full float16 vectors: the exact top 10 (near-ties may swap), scores
    # within float16's step.
    assert [{i for i, _ in q} for q in _results(loaded)] == [{i for i, _ in q} for q in exact]
    assert np.allclose([s for q in _results(loaded) for _, s in q], [s for q in exact for _, s in q], atol=1e-3)
    path = _snapshot_file(tmp_path / "snap", "rabitq")
    index, meta = snapshot.read(path)
    # Every category's rows, read in place.
    assert index.store.disk_bytes() == 24 * DIM * 2 and len(meta["full_vectors"]) == 3
    query = -index.store.get(np.array([_members(sessions, 1)[0][0]]))  # far from every stored vector
    index.add([10**9], query, [1])  # after the snapshot's rows: this process's own file
    assert index.search(query, 1, use_prototypes=False)[0].ids.tolist() == [10**9]
    index.remove([10**9])
    assert 10**9 not in index.search(query, 24, use_prototypes=False)[0].ids.tolist()


def test_damaged_full_vectors_of_a_compressed_snapshot_are_caught(sessions, tmp_path):
    write_folder_dataset(tmp_path / "f", n_per_class=8)
    built = _open(sessions, tmp_path / "snap", "rabitq")
    built.build_database("folder", tmp_path / "f", progress=False)
    built.save_snapshot()
    path = _snapshot_file(tmp_path / "snap", "rabitq")
    data = bytearray(path.read_bytes())
    *_, rows_at, rows_length, _ = snapshot.read_footer(np.frombuffer(bytes(data), np.uint8))["full_vectors"][0]
    data[rows_at + rows_length // 2] ^= 0x40  # one vector's component changes: the re-rank would score it wrongly
    path.write_bytes(bytes(data))
    reopened = _open(sessions, tmp_path / "snap", "rabitq")
    assert reopened.index_source.startswith("rebuilt: snapshot was corrupt (checksum mismatch)")
    assert _results(reopened) == _results(built)
