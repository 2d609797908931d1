"""Keeps the embedded PostgreSQL running for a serving process: a server that dies is started again within about
a second, and the engine's pool (pre-ping) and the change listener (reconnect and resync) find it by themselves."""
import logging
import threading

from backend.errors import DatabaseError

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.5  # how often the server's pid is looked at: a cheap read of postmaster.pid and /proc


class Supervisor:
    """A thread that calls `server.revive()` every CHECK_SECONDS until stopped."""

    def __init__(self, server, interval: float = CHECK_SECONDS):
        self.server, self.interval = server, interval
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imsrc-pg-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (before the server is let go, so that a stop on purpose is not undone)."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.restarts += self.server.revive()
                failing = False
            except (DatabaseError, OSError) as exc:  # e.g. orphaned backends still hold its memory: next time
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "embedded PostgreSQL could not be started again yet: %s", str(exc).splitlines()[0])
                failing = True
