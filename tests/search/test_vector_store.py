"""The vector store a compressed index re-ranks from: rows by id across sources, newest row winning."""
from pathlib import Path

import numpy as np
import pytest

from backend.search import id_map, vector_store
from backend.search.vector_store import VectorStore


def test_rows_come_back_by_id_across_sources_and_the_newest_row_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(id_map, "SEAL_CHANGES", 4)  # so that the recent ids are merged into the arrays here
    rng = np.random.default_rng(0)
    snapshot_rows = rng.standard_normal((5, 8)).astype(np.float16)
    store = VectorStore(8, tmp_path)
    store.add_source(np.array([50, 10, 30, 20, 40]), snapshot_rows)  # a snapshot's blob, in its own order
    added = rng.standard_normal((6, 8)).astype(np.float32)
    store.put(np.array([60, 30]), added[:2])  # 30 again: its new row replaces the snapshot's
    store.put(np.array([70, 80, 90]), added[2:5])  # past SEAL_CHANGES: merged
    store.put(np.array([80]), added[5:])  # and replaced again while recent
    got = store.get(np.array([10, 30, 80, 50, 60, 90]))
    expected = np.stack([snapshot_rows[1], added[1], added[5], snapshot_rows[0], added[0], added[4]])
    np.testing.assert_array_equal(got, expected.astype(np.float16).astype(np.float32))
    query = rng.standard_normal(8).astype(np.float32)  # scored across both sources, back in the order asked
    np.testing.assert_allclose(store.scores(np.array([10, 30, 80, 50, 60, 90]), query), got @ query, rtol=1e-6)
    assert len(store) == 11 and store.disk_bytes() == 11 * 8 * 2
    assert list(tmp_path.iterdir()) == []  # the append file is unlinked as soon as it is open
    with pytest.raises(KeyError, match="image 11"):
        store.get(np.array([10, 11]))
    none = np.zeros(0, np.int64)
    assert store.get(none).shape == (0, 8) and store.scores(none, added[0]).shape == (0,)


def test_a_write_that_failed_part_way_is_overwritten_by_the_next(tmp_path, monkeypatch):
    store = VectorStore(4, tmp_path)
    store.put(np.array([1]), np.ones((1, 4)))
    real_write = store._file.write

    def full_disk(data):  # half of the row reaches the file, then the disk is full
        real_write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store._file, "write", full_disk)
    with pytest.raises(OSError):
        store.put(np.array([2]), np.full((1, 4), 2.0))
    monkeypatch.setattr(store._file, "write", real_write)
    store.put(np.array([3]), np.full((1, 4), 3.0))
    assert store.get(np.array([1, 3])).tolist() == [[1.0] * 4, [3.0] * 4]  # not shifted by the half row
    with pytest.raises(KeyError):
        store.get(np.array([2]))


def test_an_index_folder_that_cannot_be_written_falls_back_to_the_temporary_folder(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder would be")
    store = VectorStore(4, blocked / "index")
    store.put(np.array([7]), np.ones((1, 4)))
    assert store.get(np.array([7])).tolist() == [[1.0] * 4]



def test_rows_widen_to_float32_exactly_subnormals_included(tmp_path):
    # Every float16 there is, subnormals (which real embeddings are full of), zeros, infinities and NaNs among them.
    every = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    widened = vector_store.widen(every)
    assert widened.dtype == np.float32
    assert np.array_equal(widened, every.astype(np.float32), equal_nan=True)
    store = VectorStore(64, tmp_path)
    finite = np.nan_to_num(every[:200].astype(np.float32), posinf=0, neginf=0)
    store.put(np.arange(200), finite)
    query = np.random.default_rng(0).normal(size=64).astype(np.float32)
    assert np.allclose(store.scores(np.arange(200), query), finite @ query, rtol=1e-6)


def test_many_rows_are_scored_in_blocks_with_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr("backend.search.vector_store.SCORE_BLOCK", 64)
    rng = np.random.default_rng(5)
    store = VectorStore(8, tmp_path)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    store.put(np.arange(500, dtype=np.int64), vectors)
    ids, query = rng.permutation(500)[:300], rng.normal(size=8).astype(np.float32)
    scores = store.scores(ids, query)
    assert scores.shape == (300,) and len(store._rows32) <= 64  # what it holds at once is one block
    assert np.allclose(scores, vectors.astype(np.float16).astype(np.float32)[ids] @ query, atol=1e-5)


def _rss_file_kib() -> int:
    """This process's resident pages of mapped files (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:")))


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
ROWS_KIB = 100_000 * 256 * 2 // 1024  # the rows below: 50,000 KiB of float16


def _touch_every_row(store: VectorStore, ids: np.ndarray) -> np.ndarray:
    return np.concatenate([store.get(ids[i:i + 10_000], np.float16) for i in range(0, len(ids), 10_000)])


@needs_proc
def test_released_pages_leave_the_rss_and_read_back_the_same(tmp_path):
    rng = np.random.default_rng(9)
    ids, vectors = np.arange(100_000, dtype=np.int64), rng.normal(size=(100_000, 256)).astype(np.float32)
    store = VectorStore(256, tmp_path)
    store.put(ids, vectors)
    before = _rss_file_kib()
    first = _touch_every_row(store, ids)
    touched = _rss_file_kib()
    store.release_pages()
    released = _rss_file_kib()
    assert touched - before > 0.8 * ROWS_KIB and touched - released > 0.8 * ROWS_KIB, (before, touched, released)
    assert np.array_equal(_touch_every_row(store, ids), first)


@needs_proc
def test_a_compressed_snapshot_loads_without_its_full_vectors_in_the_rss(tmp_path):
    from backend.search import snapshot
    from backend.search.category_index import CategoryIndex

    rng = np.random.default_rng(10)
    vectors = rng.normal(size=(100_000, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = CategoryIndex(256, "rabitq", tmp_path)
    index.add(np.arange(100_000, dtype=np.int64), vectors, np.arange(100_000) % 4, optimise=False)
    before = _rss_file_kib()
    index.optimise()  # reads every category's full vectors to learn its lists
    assert _rss_file_kib() - before < 0.2 * ROWS_KIB
    index.set_prototypes(np.arange(4), vectors[:4])
    path = tmp_path / "i.snapshot"
    with open(path, "wb") as f:
        snapshot.write(f, index, {"model": "m"})
    before = _rss_file_kib()
    loaded, _ = snapshot.read(path)  # its checksums read every byte of the file
    assert _rss_file_kib() - before < 0.2 * ROWS_KIB + loaded.nbytes() / 1024
    assert np.array_equal(loaded.search(vectors[:5], 3, use_prototypes=False)[0].ids,
                          index.search(vectors[:5], 3, use_prototypes=False)[0].ids)
