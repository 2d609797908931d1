"""The search history's writer: searches are answered without waiting for their record, written in batches, and
none is lost (real PostgreSQL)."""
import threading
import time

import numpy as np
import sqlalchemy as sa
from PIL import Image

from backend.service.results import SearchResponse, SearchResult
from backend.service import search_history
from backend.service.search_history import BATCH, SearchHistory
from backend.storage.tables import SearchRecord
from tests.helpers import png_bytes


def _answered(n: int) -> SearchResponse:
    hit = SearchResult(image_id=n, score=0.5, rank=1, category="c", category_id=1, file_name=None, label=None)
    return SearchResponse([hit], timings_ms={"search": 1.0})


def test_searches_are_answered_while_the_table_is_locked_and_all_written_in_batches(sessions):
    history = SearchHistory(sessions, "m")
    history.start(30)
    query = png_bytes(Image.new("RGB", (40, 30), (200, 10, 10)))
    total = 100
    with sessions() as blocker, blocker.begin():
        blocker.execute(sa.text("LOCK TABLE search_history IN EXCLUSIVE MODE"))  # every write waits for this
        recorders = [threading.Thread(target=lambda i=i: history.record("upload", {"n": i}, np.ones((1, 4), np.float32),
                                                                       query, _answered(i))) for i in range(total)]
        for thread in recorders:
            thread.start()
        for thread in recorders:
            thread.join(30)
        # All were answered (returned) though nothing could be written yet
        assert not any(thread.is_alive() for thread in recorders)
        assert blocker.scalar(sa.select(sa.func.count()).select_from(SearchRecord)) == 0
    history.flush()  # returns once what was queued is written
    with sessions() as s:
        rows = s.execute(sa.select(SearchRecord.at, SearchRecord.params, SearchRecord.query_thumbnail,
                                   SearchRecord.result_ids)).all()
    assert sorted(r.params["n"] for r in rows) == list(range(total))
    assert all(r.query_thumbnail[:2] == b"\xff\xd8" and r.result_ids == [r.params["n"]] for r in rows)
    # One transaction (one now()) per batch: the first alone, the rest as they queued up behind the lock
    assert len({r.at for r in rows}) <= 1 + -(-(total - 1) // BATCH)


def test_close_writes_what_is_queued_and_later_searches_are_not_recorded(sessions):
    history = SearchHistory(sessions, "m")
    history.start(30)
    with sessions() as blocker, blocker.begin():
        blocker.execute(sa.text("LOCK TABLE search_history IN EXCLUSIVE MODE"))
        for i in range(10):
            history.record("stored", {"n": i}, np.ones((1, 4), np.float32), None, _answered(i))
        closing = threading.Thread(target=history.close)
        closing.start()
    closing.join(60)
    assert not closing.is_alive()
    history.record("stored", {"n": 99}, np.ones((1, 4), np.float32), None, _answered(99))  # after close: dropped
    history.flush()
    with sessions() as s:
        assert sorted(s.scalars(sa.select(SearchRecord.params)).all(), key=lambda p: p["n"]) == \
            [{"n": i} for i in range(10)]


def test_the_query_is_decoded_for_its_thumbnail_by_the_search_not_later_by_the_writer(sessions, monkeypatch):
    """A big upload decoded later by the writer would add to the next request's peak memory, and a queue of raw
    uploads could hold gigabytes: the search makes its thumbnail itself and queues only the small row."""
    from backend.service import search_history

    decoded_in = []
    real_decode = search_history.decode
    monkeypatch.setattr(search_history, "decode",
                        lambda data: decoded_in.append(threading.current_thread().name) or real_decode(data))
    history = SearchHistory(sessions, "m")
    history.start(30)
    query = png_bytes(Image.new("RGB", (40, 30), (10, 200, 10)))
    history.record("upload", {"n": 1}, np.ones((1, 4), np.float32), query, _answered(1))
    history.close()
    assert decoded_in == [threading.current_thread().name]
    with sessions() as s:
        assert s.scalar(sa.select(SearchRecord.query_thumbnail))[:2] == b"\xff\xd8"


def test_a_query_file_gone_before_its_record_is_made_leaves_the_search_answered_and_recorded(sessions, tmp_path):
    history = SearchHistory(sessions, "m")
    history.start(30)
    gone, broken = tmp_path / "gone.png", tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but no longer a picture")
    for n, query in enumerate((gone, broken)):
        history.record("path", {"n": n}, np.ones((1, 4), np.float32), query, _answered(n))  # must not raise
    history.close()
    with sessions() as s:
        rows = s.execute(sa.select(SearchRecord.params, SearchRecord.query_thumbnail, SearchRecord.result_ids)).all()
    assert sorted((r.params["n"], r.query_thumbnail, r.result_ids) for r in rows) == [(0, None, [0]), (1, None, [1])]


def test_searches_a_slow_client_sends_one_by_one_are_written_together_and_a_read_does_not_wait_for_more(
        sessions, monkeypatch):
    monkeypatch.setattr(search_history, "LINGER_S", 30.0)  # a flush must cut this short
    history = SearchHistory(sessions, "m")
    history.start(30)
    for n in range(5):
        history.record("stored", {"n": n}, np.ones((1, 4), np.float32), None, _answered(n))
        time.sleep(0.02)  # each alone in the queue for a moment: without lingering, each its own commit
    started = time.monotonic()
    history.flush()
    assert time.monotonic() - started < 20
    with sessions() as s:
        rows = s.execute(sa.select(SearchRecord.at, SearchRecord.params)).all()
    assert sorted(r.params["n"] for r in rows) == list(range(5)) and len({r.at for r in rows}) == 1
    history.close()


def test_searches_of_a_collection_deleted_before_they_are_written_are_dropped_and_the_writer_goes_on(engine):
    from backend.storage.collections import CollectionSessions, create_collection, delete_collection

    create_collection(engine, "gone")
    history = SearchHistory(CollectionSessions(engine).sessions("gone"), "m")
    history.start(30)
    delete_collection(engine, "gone")  # while its searches were lingering in the writer's queue
    for n in range(2):  # the second shows the writer is still there: a dead one would never take it
        history.record("stored", {"n": n}, np.ones((1, 4), np.float32), None, _answered(n))
        flushed = threading.Thread(target=history.flush, daemon=True)
        flushed.start()
        flushed.join(20)
        assert not flushed.is_alive()
    history.close()


def test_a_writer_that_hits_an_unexpected_error_goes_on_and_flush_returns(sessions, monkeypatch):
    real_record, calls = search_history.history.record, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the writer")
        return real_record(*args)

    monkeypatch.setattr(search_history.history, "record", failing_once)
    history = SearchHistory(sessions, "m")
    history.start(30)
    for n in range(2):  # the first batch is lost to the bug; the second is written by the same writer
        history.record("stored", {"n": n}, np.ones((1, 4), np.float32), None, _answered(n))
        flushed = threading.Thread(target=history.flush, daemon=True)
        flushed.start()
        flushed.join(20)
        assert not flushed.is_alive()
    history.close()
    with sessions() as s:
        assert [r.params["n"] for r in s.execute(sa.select(SearchRecord.params))] == [1]
