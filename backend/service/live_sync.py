"""Live sync: one change listener per process (backend.storage.notify), handing each announced change to the
collections the process serves, so that what any process commits is searchable here within about a second."""
import threading
from typing import Callable

import sqlalchemy as sa

from backend.storage.notify import ChangeListener


class LiveSync:
    """The process's listener and the collections it keeps in step; `switched(search)` is told when a served
    collection's model was switched by any process (its owner opens it anew)."""

    def __init__(self, engine: sa.Engine, connect_timeout: float,
                 switched: Callable[[object], None] | None = None):
        self.switched = switched
        self._served: list = []
        self._lock = threading.Lock()
        self.listener = ChangeListener(engine, self._apply, self._resync, connect_timeout)

    def start(self) -> "LiveSync":
        """Start listening."""
        self.listener.start()
        return self

    def add(self, search) -> None:
        """Keep this ImageSearch in step from now on."""
        with self._lock:
            self._served.append(search)

    def remove(self, search) -> None:
        """Stop keeping this ImageSearch in step."""
        with self._lock:
            self._served = [s for s in self._served if s is not search]

    def stop(self) -> None:
        """Stop listening and close the listener's connection."""
        self.listener.stop()

    def status(self) -> dict:
        """What the listener has applied and how far behind it is (backend.storage.notify.SyncState)."""
        return self.listener.state.as_dict()

    def _apply(self, changes) -> None:
        with self._lock:
            served = list(self._served)
        for search in served:
            ours = [c for c in changes if c.schema in (None, search.schema)]
            if ours and search.apply_changes(ours) and self.switched is not None:
                self.switched(search)

    def _resync(self) -> None:
        with self._lock:
            served = list(self._served)
        for search in served:
            search.refresh()
