"""Dynamic batching of query embeddings: concurrent queries share one forward pass of the model.

Request threads preprocess their own image (in parallel: PIL and torch release the GIL) and hand the tensor to
one model thread. That thread never waits for company: it takes whatever has queued up, up to `max_batch`, runs
it as one batch and takes the next lot. Under load, the queries that arrive during one pass form the next batch,
so throughput grows with concurrency towards the model's batched speed while no query waits longer than the pass
before it. A query that finds the model idle and nobody waiting runs at once on its own thread, as a batch of
one: handing it to the model thread and back cost two thread wake-ups, on two busy cores half the model's time.
"""
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch
from PIL import Image

from backend.embedding.models import Embedder


class QueryBatcher:
    """Embeds single images from many threads, batching those that arrive together (see the module docstring)."""

    def __init__(self, embedder: Embedder, max_batch: int, preparing: int):
        self.embedder, self.max_batch = embedder, max_batch
        # Decoding and preprocessing hold the most memory per query: at most `preparing` at once.
        self.preparing = threading.BoundedSemaphore(preparing)
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, Future] | None] = queue.SimpleQueue()
        self._running = threading.Lock()  # held by whoever runs a pass: the model thread or a lone query's own
        self._taken = False  # the model thread holds queries it took from the queue: a lone query is not alone
        self.batches = self.queries = 0  # passes run and queries embedded, for /status and the tests
        self._closed = False
        self._closing = threading.Lock()  # close() and a query's put never interleave
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    def embed(self, picture: Callable[[], Image.Image]) -> np.ndarray:
        """The unit vector (d,) of the image picture() decodes (called under the `preparing` bound), computed in a
        batch with whatever other queries are waiting."""
        with self.preparing:
            tensor = self.embedder.prepare([picture()])
        if not self._taken and self._queue.empty() and self._running.acquire(blocking=False):
            try:
                if not self._taken and self._queue.empty() and not self._closed:  # alone: no hand-off (see above)
                    return self._pass([tensor])[0]
            finally:
                self._running.release()
        done: Future = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the query batcher is closed")
            self._queue.put((tensor, done))
        return done.result()

    def _pass(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """One forward pass over prepared single-image batches (call with _running held)."""
        vectors = self.embedder.embed_prepared(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
        self.batches += 1
        self.queries += len(tensors)
        return vectors

    def close(self) -> None:
        """Stop the model thread once the queries already queued are answered; later ones are refused."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # after every query already put: they are all answered first
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            self._taken = True
            # The batch is gathered once the pass is ours: queries that arrive while a lone query's pass runs
            # join this one instead of waiting for the next.
            with self._running:
                batch, stop = self._gather(first)
                try:
                    vectors = self._pass([tensor for tensor, _ in batch])
                except BaseException as exc:  # every waiting query gets the error, and the thread carries on
                    for _, done in batch:
                        done.set_exception(exc)
                else:
                    for (_, done), vector in zip(batch, vectors):
                        done.set_result(vector)
                finally:
                    self._taken = False
            if stop:
                return

    def _gather(self, first) -> tuple[list, bool]:
        """The queries waiting, after `first`, up to max_batch; and whether close() was among them."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False
