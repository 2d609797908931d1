"""The summary of a collection's filterable metadata keys, cached: reading it reads every image's metadata."""
import threading
import time
from typing import Callable

from sqlalchemy.orm import sessionmaker

from backend.storage import filters

KEYS_MAX_AGE = 60.0  # seconds a summary of the metadata keys is kept (it reads every image's metadata) ...
KEYS_MIN_AGE = 5.0  # ... and at least this long, whatever is written meanwhile


class MetadataKeys:
    """backend.storage.filters.summarise_keys of a collection, read again after the collection's index changed (a
    write this process made or applied; but not within KEYS_MIN_AGE seconds of the last read), and KEYS_MAX_AGE
    seconds after it. `changes()` counts the index's changes (IndexManager.changes)."""

    def __init__(self, sessions: sessionmaker, changes: Callable[[], int]):
        self.sessions, self.changes = sessions, changes
        self._keys = None  # (changes, monotonic time, summary)
        self._lock = threading.Lock()

    def _fresh(self, cached) -> bool:
        age = time.monotonic() - cached[1]
        return age < KEYS_MIN_AGE or (cached[0] == self.changes() and age < KEYS_MAX_AGE)

    def summary(self) -> list[dict]:
        """The filterable metadata keys stored, with their values or ranges."""
        if self._keys is not None and self._fresh(self._keys):
            return self._keys[2]
        with self._lock:  # one summary at a time: the others wait for it rather than read every image too
            if self._keys is None or not self._fresh(self._keys):
                writes = self.changes()
                with self.sessions() as s:
                    self._keys = (writes, time.monotonic(), filters.summarise_keys(s))
            return self._keys[2]
