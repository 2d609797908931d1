"""The collections a server serves: its own (COLLECTION's) opened at start-up, the others on their first request
and closed again once idle or least recently used (at most SERVED_COLLECTIONS_MAX open); each opened anew, and
swapped in whole, when its model is switched (backend.pipeline.reembed)."""
import logging
import threading
import time
from typing import Callable

from backend.config import settings
from backend.errors import NotFound, ShuttingDown
from backend.service.image_search import ImageSearch
from backend.service.live_sync import LiveSync
from backend.storage.collections import CollectionSessions, check_name, recorded_model

log = logging.getLogger(__name__)
RETIRE_SECONDS = 60.0  # how long a replaced ImageSearch stays open: searches that began on it finish on it
EVICTED_SECONDS = 5.0  # how long an evicted one stays open: requests that took it a moment ago finish on it
SWEEP_SECONDS = 10.0  # how often collections idle for SERVED_IDLE_SECONDS are looked for


def open_collection(name: str, sessions) -> ImageSearch:
    """A collection's ImageSearch, with its own model (backend.service.model_choice) and the configured index type."""
    return ImageSearch.open(sessions=sessions)


class ServedCollections:
    """Each collection's ImageSearch, opened once and kept, each with query batching, live sync and history; a
    collection deleted by any process is closed on its next request, and one whose model is switched by any process
    is opened again with the new model and swapped in (searches meanwhile run on the old one)."""

    def __init__(self, default: ImageSearch, opener: Callable[[str, object], ImageSearch], batching: tuple[int, int],
                 history_days: int | None):
        self.default, self.opener = default, opener
        self.batching, self.history_days = batching, history_days
        self.sessions = CollectionSessions(default.sessions.kw["bind"])
        # One listener for every collection served here, on the registry's engine (LISTEN is per database).
        self.live_sync = LiveSync(self.sessions.engine, settings.db_timeout, switched=self._switch_soon).start()
        self._open: dict[str, ImageSearch] = {}
        self._used: dict[str, float] = {}  # when each open collection was last asked for (time.monotonic)
        self._retiring: list[tuple[threading.Timer, ImageSearch]] = []
        self._lock = threading.Lock()  # one opening at a time: an index build is heavy, and done once
        self._closed = threading.Event()
        self._prepare(default, history=False)  # the server starts its history after its warm-up search
        threading.Thread(target=self._sweep, name="imsrc-idle-collections", daemon=True).start()

    @property
    def snapshot_base(self):
        """The SNAPSHOT_DIR the collections' snapshots are kept under (backend.storage.collections.snapshot_dir_of)."""
        return self.default.snapshot_base

    def opened(self, name: str | None) -> ImageSearch | None:
        """The ImageSearch of collection `name` (None: the server's own) if it is open, else None; never blocks
        (the API's event loop asks this first); NotFound for the server's own collection once deleted."""
        if name is None or name == self.default.collection:
            if self.default.dropped:
                raise NotFound(f"collection {self.default.collection!r} was deleted: serve another (COLLECTION)")
            return self.default
        check_name(name)
        search = self._open.get(name)
        if search is not None and not search.dropped:
            self._used[name] = time.monotonic()
            return search
        return None

    def get(self, name: str | None) -> ImageSearch:
        """The ImageSearch of collection `name` (None: the server's own), opened now if it was not; NotFound (404)
        for a collection that does not exist (any more)."""
        if (search := self.opened(name)) is not None:
            return search
        with self._lock:
            search = self._open.get(name)
            if search is not None and search.dropped:
                self._close(name)
                search = None
            if self._closed.is_set():
                raise ShuttingDown("the server is shutting down: try again shortly")
            if search is None:
                while len(self._open) >= settings.served_collections_max:
                    self._evict(min(self._open, key=lambda n: self._used.get(n, 0.0)), "least recently used")
                search = self._open[name] = self._prepare(self.opener(name, self.sessions.sessions(name)))
                log.info("serving collection %s: %d images indexed with %s", name, len(search.index),
                         search.embedder.name)
            self._used[name] = time.monotonic()
        return search

    def _sweep(self) -> None:
        """Close the collections nobody asked for in SERVED_IDLE_SECONDS (the server's own stays)."""
        while not self._closed.wait(SWEEP_SECONDS):
            idle_since = time.monotonic() - settings.served_idle_seconds
            with self._lock:
                for name in [n for n in self._open if self._used.get(n, 0.0) < idle_since]:
                    self._evict(name, f"idle for {settings.served_idle_seconds:g} s")

    def _evict(self, name: str, why: str) -> None:
        """Stop serving a collection (call with the lock held); it is closed EVICTED_SECONDS later, and its next
        request opens it again (from its snapshot)."""
        search = self._open.pop(name)
        self._used.pop(name, None)
        self.sessions.forget(name)
        self._retire_later(search, EVICTED_SECONDS)
        log.info("collection %s: no longer served (%s)", name, why)

    def _retire_later(self, old: ImageSearch, delay: float) -> None:
        timer = threading.Timer(delay, self._retire, args=(old,))
        timer.daemon = True
        self._retiring.append((timer, old))
        timer.start()

    def _prepare(self, search: ImageSearch, history: bool = True) -> ImageSearch:
        search.start_batching(*self.batching)
        search.start_live_sync(self.live_sync)
        if history and self.history_days is not None:
            search.start_history(self.history_days)
        return search

    def _switch_soon(self, search: ImageSearch) -> None:
        # Not on the listener's thread: it goes on applying changes to the old index while the new one is built.
        threading.Thread(target=self._switch, args=(search,), name="imsrc-switch", daemon=True).start()

    def _switch(self, old: ImageSearch) -> None:
        """Open `old`'s collection again (with the model now recorded for it) and swap it in, if `old` is still the
        one served; `old` is closed RETIRE_SECONDS later."""
        with self._lock:
            current = self.default if old is self.default else self._open.get(old.collection)
            if current is not old or old.dropped or self._closed.is_set():
                return
            try:
                new = self.opener(old.collection, old.sessions)
            except Exception:  # the old model serves on; the next switch (or a restart) tries again
                log.exception("collection %s: could not open it with its new model; serving %s still",
                              old.collection, old.embedder.name)
                return
            self._prepare(new)
            if old is self.default:
                self.default = new
            else:
                self._open[old.collection] = new
            self._retire_later(old, RETIRE_SECONDS)
        log.info("collection %s: switched from %s to %s (%d images indexed)", old.collection, old.embedder.name,
                 new.embedder.name, len(new.index))
        with new.sessions() as s:  # switched again while the new one was opened (it was not listening yet)?
            recorded = recorded_model(s)
        if recorded is not None and recorded != new.embedder.name:
            self._switch_soon(new)

    def _retire(self, old: ImageSearch) -> None:
        with self._lock:
            if self._closed.is_set():  # close() closed it
                return
            self._retiring = [(t, s) for t, s in self._retiring if s is not old]
        old.close()  # snapshots its index: switching back opens it from there

    def forget(self, name: str) -> None:
        """Stop serving a collection deleted here (its index is not snapshotted)."""
        with self._lock:
            if name in self._open:
                self._open[name].dropped = True
            self._close(name)

    def _close(self, name: str) -> None:
        search = self._open.pop(name, None)
        self._used.pop(name, None)
        if search is not None:
            search.close()  # a deleted collection's index is not snapshotted
        self.sessions.forget(name)

    def served(self) -> list[ImageSearch]:
        """The collections open now, the server's own first."""
        return [self.default, *(s for s in list(self._open.values()) if not s.dropped)]

    def close(self) -> None:
        """Close every collection, the server's own included."""
        with self._lock:
            self._closed.set()
            for timer, old in self._retiring:
                timer.cancel()
                old.close()
            self._retiring = []
            for name in list(self._open):
                self._close(name)
        self.default.close()
        self.live_sync.stop()
