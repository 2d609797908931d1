"""Live sync through PostgreSQL: writes announce themselves with NOTIFY, serving processes LISTEN and catch up.

Every write that changes what can be found (vectors stored, images deleted, prototypes recomputed) calls announce()
in its own transaction, so the notification is delivered when, and only if, the write commits, and PostgreSQL
delivers notifications in commit order. A ChangeListener holds one connection of its own, LISTENing; it hands what
arrives to the index, which re-reads those images' rows (so applying a change twice, or late, is harmless). While
it has no connection it can miss notifications, so each time it (re)connects it first LISTENs, then resynchronises
the whole index from the database (the fingerprint): anything committed meanwhile is found either way.
"""
import json
import logging
import selectors
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.storage.engine import application_name

log = logging.getLogger(__name__)

CHANNEL = "imsrc_changes"
MAX_PAYLOAD = 7000  # PostgreSQL refuses payloads of 8000 bytes; a bigger change is announced as a resync
WAIT_SECONDS = 0.25  # how long one wait for a notification lasts: bounds how long stop() takes
PING_SECONDS = 5.0  # a quiet connection is checked this often, so a dead one is noticed
RETRY_SECONDS = (0.2, 5.0)  # first and longest wait between attempts to reconnect
MAX_IDS = 100_000  # ids one notification may name; anything else (a forged or broken payload) means a resync


@dataclass(frozen=True)
class Change:
    """One announced change: images of a model (None: of every model) stored or deleted, or 'prototypes' or
    'resync' (re-read everything) for a model; `at` is the database's clock when it was announced."""

    model: str | None
    what: str
    ids: tuple[int, ...] = ()
    at: float = 0.0
    schema: str | None = None  # the collection's (backend.storage.collections); None: every collection's


def announce(session: Session, model: str | None, image_ids=(), what: str = "images",
             schema: str | None = None) -> None:
    """NOTIFY listeners in the session's transaction: these images of `model` (None: every model) changed, or
    `what` ('prototypes', 'resync', 'model': the collection switched models, 'dropped': it was deleted) changed, in
    the collection of `schema` (default: the session's); sent when the transaction commits, never if it rolls back."""
    ranges = _ranges(sorted({int(i) for i in image_ids}))
    payload = json.dumps({"model": model, "what": what, "ids": ranges}, separators=(",", ":"))
    if len(payload) > MAX_PAYLOAD:  # a huge batch: listeners re-read the index's whole membership instead
        payload = json.dumps({"model": model, "what": "resync", "ids": []})
    session.execute(sa.text("SELECT pg_notify(:channel, (CAST(:payload AS jsonb) || jsonb_build_object("
                            "'at', extract(epoch FROM clock_timestamp()), "
                            "'schema', coalesce(CAST(:schema AS text), current_schema())))::text)"),
                    {"channel": CHANNEL, "payload": payload, "schema": schema})


def parse(payload: str) -> Change:
    """The Change a notification's payload describes (see announce); anything else on the channel (a payload
    another program sent, or one naming absurdly many ids) asks for a resync rather than being trusted."""
    try:
        body = json.loads(payload)
        runs = [(int(first), int(last)) for first, last in body.get("ids", [])]
        if sum(last - first + 1 for first, last in runs) > MAX_IDS or any(last < first for first, last in runs):
            raise ValueError("too many ids")
        model, schema = body.get("model"), body.get("schema")
        return Change(model if isinstance(model, str) else None, str(body.get("what", "images")),
                      tuple(i for first, last in runs for i in range(first, last + 1)), float(body.get("at", 0.0)),
                      schema if isinstance(schema, str) else None)
    except (ValueError, TypeError, AttributeError):
        log.warning("live sync: a notification imsrc did not send (%r...); resynchronising", payload[:80])
        return Change(None, "resync", (), time.time())


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as [first, last] runs: a batch of consecutive ids costs a few bytes however large it is."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


@dataclass
class SyncState:
    """What a listener has done, for /status."""

    listening: bool = False
    changes_applied: int = 0
    resyncs: int = 0  # full resynchronisations: one per (re)connection
    last_change_at: float | None = None  # database clock of the last change applied
    last_applied_at: float | None = None  # local clock when it was applied
    lag_ms: float | None = None  # from the commit of the last change to its being searchable here
    error: str | None = None  # why the listener is not connected, while it is not

    def as_dict(self) -> dict:
        def when(seconds):
            return datetime.fromtimestamp(seconds, timezone.utc).isoformat() if seconds is not None else None

        return {"listening": self.listening, "changes_applied": self.changes_applied, "resyncs": self.resyncs,
                "last_change_at": when(self.last_change_at), "last_applied_at": when(self.last_applied_at),
                "lag_ms": self.lag_ms, "error": self.error}


class ChangeListener:
    """A thread that LISTENs on its own connection and applies announced changes; see the module docstring."""

    def __init__(self, engine: sa.Engine, apply: Callable[[list[Change]], None], resync: Callable[[], None],
                 connect_timeout: float = 2.0):
        self.engine, self.apply, self.resync = engine, apply, resync
        self.connect_timeout = connect_timeout
        self.state = SyncState()
        self._stop = threading.Event()
        self._clock_offset = 0.0  # database clock minus ours, so lags hold where the two machines' clocks differ
        self._thread = threading.Thread(target=self._run, name="imsrc-listener", daemon=True)

    def start(self) -> "ChangeListener":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close the connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def connect(self):
        """A DB-API connection of the listener's own, outside the engine's pool (it is held for as long as we run)."""
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        # Keep-alives and a TCP user timeout make a vanished server over TCP show up as an error within seconds
        # instead of a silent, endless wait (libpq ignores them on a Unix socket).
        cparams = {"connect_timeout": max(1, round(self.connect_timeout)), "keepalives": 1, "keepalives_idle": 5,
                   "keepalives_interval": 2, "keepalives_count": 2, "tcp_user_timeout": 10_000, **cparams,
                   "application_name": application_name("-listener")}
        conn = self.engine.dialect.dbapi.connect(*cargs, **cparams)
        conn.autocommit = True
        return conn

    def _run(self) -> None:
        delay = RETRY_SECONDS[0]
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.connect()
                self._listen(conn)
                delay = RETRY_SECONDS[0]
            except Exception as exc:  # whatever it was, the thread lives on: reconnect, and resync on the way
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                database = isinstance(exc, (self.engine.dialect.dbapi.Error, sa.exc.SQLAlchemyError, OSError))
                if not database:
                    log.exception("live sync: applying changes failed; resynchronising")
                elif self.state.listening or self.state.error is None:
                    log.warning("live sync: lost the database (%s); resynchronising when it is back", reason)
                self.state.listening, self.state.error = False, reason
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_SECONDS[1])
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except self.engine.dialect.dbapi.Error:
                        pass
        self.state.listening = False

    def _listen(self, conn) -> None:
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
            before = time.time()
            cur.execute("SELECT extract(epoch FROM clock_timestamp())")
            self._clock_offset = float(cur.fetchone()[0]) - (before + time.time()) / 2
        # Listening from here on: whatever committed before is in the database, read by the resync.
        self.resync()
        self.state.resyncs += 1
        self.state.listening, self.state.error = True, None
        waiting = selectors.DefaultSelector()  # not select.select: it fails on descriptors past 1023
        waiting.register(conn, selectors.EVENT_READ)
        try:
            self._wait_and_apply(conn, waiting)
        finally:
            waiting.close()

    def _wait_and_apply(self, conn, waiting) -> None:
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            if waiting.select(WAIT_SECONDS):
                conn.poll()
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > PING_SECONDS:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                quiet_since = time.monotonic()
            if conn.notifies:
                changes = [parse(n.payload) for n in conn.notifies]
                conn.notifies.clear()
                self._apply(changes)

    def _apply(self, changes: list[Change]) -> None:
        self.apply(changes)
        now = time.time()
        last = max(c.at for c in changes)
        lag = max(0.0, (now + self._clock_offset - last) * 1000)
        self.state.changes_applied += len(changes)
        self.state.last_change_at, self.state.last_applied_at = last, now
        self.state.lag_ms = round(lag, 1)
