"""Keeping a collection's searches (backend.storage.history) off the request path, and reading one back to run it
again."""
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy.orm import sessionmaker

from backend.embedding.decode import decode, sha256
from backend.errors import ImsrcError, NotFound
from backend.service.results import SearchResponse
from backend.storage import history
from backend.storage.tables import SearchRecord

log = logging.getLogger(__name__)
BATCH = 64  # searches written in one statement and one commit
# How long the writer waits for more searches after the first of a batch: alone, each search paid a connection
# check, an INSERT and a commit, more CPU than its model on two cores (profiled under bench/load.py).
LINGER_S = 0.25
PENDING = 1024  # searches waiting to be written; a search beyond that waits for room (nothing is dropped)


class SearchHistory:
    """A collection's search history: off until start() (what a server does unless HISTORY_ENABLED is off).

    A search is answered without waiting for its record to be stored: one writer thread turns what queues up
    within LINGER_S into one multi-row INSERT and one commit. Reads of the history flush() first (which writes at
    once), so a search is in the history as soon as its answer is out; close() writes what is still queued."""

    def __init__(self, sessions: sessionmaker, model_name: str):
        self.sessions, self.model_name = sessions, model_name
        self.days: int | None = None  # retention; None: searches are not recorded
        self._pending: queue.Queue = queue.Queue(PENDING)
        self._writer: threading.Thread | None = None
        self._starting = threading.Lock()

    def start(self, retention_days: int) -> None:
        """Record every search from now on, for `retention_days`."""
        with self._starting:
            self.days = retention_days
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="imsrc-history", daemon=True)
                self._writer.start()

    def record(self, kind: str, params: dict, vectors: np.ndarray, uploaded, response: SearchResponse,
               picture: PILImage.Image | None = None) -> None:
        """Queue a search for the history (when it is on); a failure to write it is logged, never the search's.
        `picture`: the upload as the search decoded it, which the thumbnail is made from instead of decoding it
        again."""
        if self.days is None:
            return
        # The query's hash and thumbnail are made here, so the queue holds only small rows and a big upload is
        # decoded within its own request's memory (a writer decoding it later overlapped the next request's peak).
        sha, thumb = None, None
        if uploaded is not None:
            try:
                data = Path(uploaded).read_bytes() if isinstance(uploaded, (str, Path)) else uploaded
                if picture is None:
                    picture = data if isinstance(data, PILImage.Image) else decode(data).image
                sha, thumb = (sha256(data) if isinstance(data, bytes) else None), history.thumbnail(picture)
            except (OSError, ImsrcError) as exc:  # a query file removed or changed since it was searched
                log.warning("search recorded without its query's thumbnail: %s", exc)
        self._pending.put(history.row(kind=kind, model=self.model_name, params=params, vector=vectors,
                                      query_sha256=sha, query_thumbnail=thumb, results=response.results,
                                      timings_ms=dict(response.timings_ms)))

    def flush(self) -> None:
        """Return once every search queued so far is written (or its failure logged)."""
        written = threading.Event()  # queued: the writer stops lingering at it, and sets it once its batch is in
        with self._starting:  # close() cannot stop the writer between this check and the put
            if self._writer is None:
                return
            self._pending.put(written)
        written.wait()

    def close(self) -> None:
        """Write what is queued and stop the writer."""
        with self._starting:
            writer, self._writer, self.days = self._writer, None, None  # searches from now on are not recorded
        if writer is not None:
            self._pending.put(None)
            writer.join()

    def recorded(self, record_id: int, dim: int) -> tuple[dict, np.ndarray]:
        """A recorded search's parameters and its query's base vectors (n, dim); NotFound when it is not kept."""
        self.flush()
        with self.sessions() as s:
            row = s.get(SearchRecord, record_id)
        if row is None or row.query_vector is None:
            raise NotFound(f"search {record_id} not found in the history")
        return row.params, np.frombuffer(row.query_vector, np.float32).reshape(-1, dim)

    def _write(self) -> None:
        while True:
            items = [self._pending.get()]
            deadline = time.monotonic() + LINGER_S
            while len(items) < BATCH and isinstance(items[-1], dict):
                try:
                    items.append(self._pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            batch = [item for item in items if isinstance(item, dict)]
            try:
                with self.sessions() as s, s.begin():
                    history.record(s, batch, self.days)
            except (sa.exc.SQLAlchemyError, ImsrcError) as exc:  # ImsrcError: the collection was deleted meanwhile
                log.warning("%d searches not recorded in the history: %s", len(batch), str(exc).splitlines()[0])
            except Exception:  # a bug must not stop the writer: every later flush() would wait for it forever
                log.exception("%d searches not recorded in the history", len(batch))
            finally:
                for flushed in (item for item in items if isinstance(item, threading.Event)):
                    flushed.set()
            if items[-1] is None:
                return
