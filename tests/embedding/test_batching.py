"""Dynamic batching of queries: concurrent queries share forward passes, a lone query runs at once, and each
query gets exactly the vector it would get on its own."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend.embedding.batching import QueryBatcher
from tests.helpers import PixelEmbedder


class RecordingPixels(PixelEmbedder):
    """Records each forward pass's batch size, and takes `pause` seconds per pass."""

    def __init__(self, pause: float = 0.0, fail: bool = False):
        super().__init__()
        self.pause, self.fail, self.sizes, self.threads = pause, fail, [], []

    def _forward(self, batch, precision=None):
        self.sizes.append(len(batch))
        self.threads.append(threading.current_thread())
        time.sleep(self.pause)
        if self.fail:
            raise RuntimeError("the model broke")
        return super()._forward(batch, precision)


def _pictures(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(n)]


def _concurrently(batcher, pictures):
    results = [None] * len(pictures)

    def one(i):
        results[i] = batcher.embed(lambda: pictures[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pictures))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_queries_share_passes_and_get_their_own_vectors():
    embedder = RecordingPixels(pause=0.2).load()
    batcher = QueryBatcher(embedder, max_batch=16, preparing=2)
    pictures = _pictures(12)
    try:
        results = _concurrently(batcher, pictures)
    finally:
        batcher.close()
    expected = PixelEmbedder().load().embed(pictures)
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-6)  # each query its own vector, in order
    warm_up = 1  # load() runs one pass
    assert batcher.queries == 12 and sum(embedder.sizes[warm_up:]) == 12
    assert batcher.batches < 12 and max(embedder.sizes[warm_up:]) > 1  # queries that waited went together


def test_a_lone_query_runs_at_once_as_a_batch_of_one_on_its_own_thread():
    embedder = RecordingPixels().load()
    batcher = QueryBatcher(embedder, max_batch=16, preparing=1)
    try:
        started = time.perf_counter()
        vector = batcher.embed(lambda: _pictures(1)[0])
        assert time.perf_counter() - started < 5  # no timer to wait out (generous: the machine may be busy)
    finally:
        batcher.close()
    assert embedder.sizes[-1] == 1 and batcher.batches == 1
    assert embedder.threads[-1] is threading.current_thread()  # no hand-off to the model thread and back
    assert vector.shape == (PixelEmbedder.dim,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_queries_that_wait_behind_a_lone_query_share_the_next_pass():
    """The model thread gathers its batch once the pass is its own: queries arriving while a lone query's pass
    runs all go together in the next, not one in a pass of its own and the rest after it."""
    class Gated(RecordingPixels):
        entered, gate = threading.Event(), threading.Event()

        def _forward(self, batch, precision=None):
            if threading.current_thread().name == "lone":
                self.entered.set()
                assert self.gate.wait(20)
            return super()._forward(batch, precision)

    embedder = Gated().load()
    batcher = QueryBatcher(embedder, max_batch=16, preparing=4)
    pictures = _pictures(4)
    lone = threading.Thread(target=batcher.embed, args=(lambda: pictures[0],), name="lone")
    try:
        lone.start()
        assert Gated.entered.wait(20)  # the lone query's pass runs (and waits)
        followers = [threading.Thread(target=batcher.embed, args=(lambda k=k: pictures[k],)) for k in (1, 2, 3)]
        followers[0].start()
        _wait_for(lambda: batcher._queue.empty() and followers[0].is_alive())  # taken by the model thread
        for t in followers[1:]:
            t.start()
        _wait_for(lambda: batcher._queue.qsize() == 2)
        Gated.gate.set()
        for t in [lone, *followers]:
            t.join(20)
    finally:
        Gated.gate.set()
        batcher.close()
    assert embedder.sizes[1:] == [1, 3] and batcher.batches == 2


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_batches_never_exceed_the_limit():
    embedder = RecordingPixels(pause=0.1).load()
    batcher = QueryBatcher(embedder, max_batch=3, preparing=4)
    try:
        _concurrently(batcher, _pictures(10))
    finally:
        batcher.close()
    assert max(embedder.sizes[1:]) <= 3 and sum(embedder.sizes[1:]) == 10


def test_a_failing_pass_fails_its_queries_and_the_batcher_carries_on():
    embedder = RecordingPixels().load()
    batcher = QueryBatcher(embedder, max_batch=4, preparing=1)
    try:
        embedder.fail = True
        with pytest.raises(RuntimeError, match="the model broke"):
            batcher.embed(lambda: _pictures(1)[0])
        embedder.fail = False
        assert batcher.embed(lambda: _pictures(1)[0]).shape == (PixelEmbedder.dim,)
    finally:
        batcher.close()


def test_closing_answers_what_was_queued_and_refuses_the_rest():
    embedder = RecordingPixels(pause=0.3).load()
    batcher = QueryBatcher(embedder, max_batch=1, preparing=4)  # one at a time: some wait in the queue
    pictures = _pictures(3)
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.embed(lambda: pictures[i])))
               for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while batcher._queue.qsize() + batcher.queries < 3 and time.monotonic() < deadline:  # all three handed over
        time.sleep(0.01)
    batcher.close()
    for t in threads:
        t.join(10)
    assert all(r is not None and r.shape == (PixelEmbedder.dim,) for r in results)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.embed(lambda: pictures[0])
