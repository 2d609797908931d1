"""The vector store a compressed index re-ranks from: rows by id across sources, newest row winning."""
import numpy as np
import pytest

from backend.search import vector_store
from backend.search.vector_store import VectorStore


def test_rows_come_back_by_id_across_sources_and_the_newest_row_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(vector_store, "SEAL_ROWS", 4)  # so that the recent ids are merged into the arrays here
    rng = np.random.default_rng(0)
    snapshot_rows = rng.standard_normal((5, 8)).astype(np.float16)
    store = VectorStore(8, tmp_path)
    store.add_source(np.array([50, 10, 30, 20, 40]), snapshot_rows)  # a snapshot's blob, in its own order
    added = rng.standard_normal((6, 8)).astype(np.float32)
    store.put(np.array([60, 30]), added[:2])  # 30 again: its new row replaces the snapshot's
    store.put(np.array([70, 80, 90]), added[2:5])  # past SEAL_ROWS: merged
    store.put(np.array([80]), added[5:])  # and replaced again while recent
    got = store.get(np.array([10, 30, 80, 50, 60, 90]))
    expected = np.stack([snapshot_rows[1], added[1], added[5], snapshot_rows[0], added[0], added[4]])
    np.testing.assert_array_equal(got, expected.astype(np.float16).astype(np.float32))
    assert len(store) == 11 and store.disk_bytes() == 11 * 8 * 2
    assert list(tmp_path.iterdir()) == []  # the append file is unlinked as soon as it is open
    with pytest.raises(KeyError, match="image 11"):
        store.get(np.array([10, 11]))
    store.close()
    assert store.get(np.array([50])).shape == (1, 8)  # the snapshot's rows stay readable
