"""A model's vectors in and out of PostgreSQL in bulk: binary COPY, made and parsed by numpy, no row objects.

Every row of the COPY has the same layout (image id, category id, a pgvector of the model's dimension), so a batch
of rows is one numpy structured array over the bytes PostgreSQL sent: a million 2048-d vectors stream through in
about a minute, where an ORM object per row took nine. Writing goes the same way (copy_vectors_in): pgvector's
text form, a decimal per float made in Python, was most of ingestion's writer.
"""
import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = len(SIGNATURE) + 8  # signature, flags (int32), header extension length (int32; 0 from PostgreSQL)
TRAILER = b"\xff\xff"  # a field count of -1
BATCH_ROWS = 4096

Consumer = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (ids (n,), category ids (n,), vectors (n, dim))


@contextlib.contextmanager
def copy_cursor(session: Session, statement: str) -> Iterator:
    """A psycopg2 cursor on the session's connection for a COPY, whose driver errors reach the caller as
    SQLAlchemy's, as every other statement's do (so that a full disk answers 507, a lost server 503 and the pool
    drops the dead connection)."""
    connection = session.connection()
    dbapi = connection.dialect.loaded_dbapi
    cursor = None
    try:
        cursor = connection.connection.driver_connection.cursor()
        yield cursor
    except dbapi.Error as exc:
        lost = connection.dialect.is_disconnect(exc, connection.connection, cursor)
        if lost:
            connection.invalidate(exc)
        raise sa.exc.DBAPIError.instance(statement, None, exc, dbapi.Error, connection_invalidated=lost) from exc
    finally:
        if cursor is not None:
            with contextlib.suppress(dbapi.Error):  # a closed connection's cursor: the error above is the one
                cursor.close()


def _row_layout(dim: int, category: bool = True) -> np.dtype:
    """One COPY row of (bigint, [integer,] vector): field count, then each field's length and value, big-endian
    (pgvector sends its dimension, an unused int16 and the floats)."""
    return np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8")]
                    + ([("cat_len", ">i4"), ("cat", ">i4")] if category else [])
                    + [("vec_len", ">i4"), ("vec_dim", ">i2"), ("vec_unused", ">i2"), ("vec", ">f4", (dim,))])


class _RowParser:
    """The file object psycopg2's copy_expert writes to: cuts the stream into batches of whole rows, which a second
    thread parses and hands to consume() in order, so that PostgreSQL's sending and our parsing overlap (numpy and
    FAISS release the GIL)."""

    def __init__(self, dim: int, consume: Consumer):
        self.dim, self.consume, self.layout = dim, consume, _row_layout(dim)
        self.pending = bytearray()
        self.header_seen = False
        self.rows = 0
        self._batches: queue.Queue[bytes | None] = queue.Queue(maxsize=2)  # bounds the bytes in flight
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._parse_batches, name="copy-parser", daemon=True)
        self._worker.start()

    def write(self, data) -> int:
        if self._error is not None:
            raise self._error  # aborts the COPY
        self.pending += data
        if not self.header_seen and len(self.pending) >= HEADER:
            if bytes(self.pending[:len(SIGNATURE)]) != SIGNATURE:
                raise ValueError("PostgreSQL did not send binary COPY data")
            del self.pending[:HEADER]
            self.header_seen = True
        if self.header_seen and len(self.pending) >= BATCH_ROWS * self.layout.itemsize:
            self._hand_over()
        return len(data)

    def _hand_over(self) -> None:
        whole = len(self.pending) // self.layout.itemsize * self.layout.itemsize
        if whole:
            self._batches.put(bytes(self.pending[:whole]))
            del self.pending[:whole]

    def _parse_batches(self) -> None:
        while (chunk := self._batches.get()) is not None:
            if self._error is not None:
                continue  # drain, so that the writer never blocks
            try:
                self._parse(chunk)
            except BaseException as exc:  # reported to the COPY's next write and by finish()
                self._error = exc

    def _parse(self, chunk: bytes) -> None:
        rows = np.frombuffer(chunk, dtype=self.layout)
        expected = (3, 8, 4, 4 + 4 * self.dim, self.dim)
        found = [rows[key] for key in ("fields", "id_len", "cat_len", "vec_len", "vec_dim")]
        if not all((column == value).all() for column, value in zip(found, expected)):
            raise ValueError(f"a row that is not (bigint, integer, {self.dim}-d vector)")
        self.rows += len(rows)
        self.consume(rows["id"].astype(np.int64), rows["cat"].astype(np.int64), rows["vec"].astype(np.float32))

    def finish(self, completed: bool = True) -> int:
        """Wait for the last batch; raises what parsing raised, or ValueError for a stream cut inside a row."""
        if completed and self.pending.endswith(TRAILER):
            del self.pending[-len(TRAILER):]
        if completed:
            self._hand_over()
        self._batches.put(None)
        self._worker.join()
        if self._error is not None:
            raise self._error
        if completed and (self.pending or not self.header_seen):
            raise ValueError(f"the COPY stream ended inside a row ({len(self.pending)} bytes left over)")
        return self.rows


def copy_vectors_in(session: Session, image_ids, vectors: np.ndarray) -> None:
    """Load (image id, vector) rows into the temporary table incoming_vectors of the session's connection by one
    binary COPY; the caller moves them on in the same transaction by DELETE ... RETURNING, which leaves it empty."""
    vectors = np.asarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    rows = np.zeros(len(vectors), _row_layout(dim, category=False))
    rows["fields"], rows["id_len"], rows["vec_len"], rows["vec_dim"] = 2, 8, 4 + 4 * dim, dim
    rows["id"], rows["vec"] = np.asarray(image_ids, dtype=np.int64), vectors
    # Emptied at each commit (only when used: PostgreSQL skips untouched ones), kept for the connection's next batch.
    session.execute(sa.text("CREATE TEMP TABLE IF NOT EXISTS incoming_vectors (image_id bigint, vector vector) "
                            "ON COMMIT DELETE ROWS"))
    statement = "COPY incoming_vectors FROM STDIN (FORMAT binary)"
    with copy_cursor(session, statement) as cursor:
        cursor.copy_expert(statement, io.BytesIO(SIGNATURE + bytes(8) + rows.tobytes() + TRAILER))


def copy_members(session: Session, model_name: str, dim: int, consume: Consumer, image_ids=None,
                 ordered: bool = False, uncategorised: bool = False) -> int:
    """Hand the (image id, category id, vector) of every image in a category with a vector of the model (or of those
    among `image_ids`; with `uncategorised`, images without a category too, as category 0) to consume(), in
    batches; by image id if `ordered`. Runs in the session's transaction, so it sees what the session's other reads
    see. Returns the rows read."""
    where = "e.model_name = %(model)s" + ("" if uncategorised else " AND i.category_id IS NOT NULL")
    if image_ids is not None:
        where += " AND e.image_id = ANY(%(ids)s)"
    order = " ORDER BY e.image_id" if ordered else ""
    statement = ("COPY (SELECT e.image_id, coalesce(i.category_id, 0), e.vector FROM embeddings e JOIN images i ON "
                 f"i.id = e.image_id WHERE {where}{order}) TO STDOUT (FORMAT binary)")
    parser = _RowParser(dim, consume)
    with copy_cursor(session, statement) as cursor:
        try:
            cursor.copy_expert(cursor.mogrify(statement, {
                "model": model_name,
                "ids": [int(i) for i in image_ids] if image_ids is not None else None}).decode(), parser)
        except BaseException:
            parser.finish(completed=False)  # stop the parser thread; the COPY's own error is the one to report
            raise
    return parser.finish()


def fetch_members(session: Session, model_name: str, dim: int, image_ids=None, uncategorised: bool = False):
    """(ids, category ids, vectors (n, dim) float32) of the images in a category with a vector of the model, by id;
    all of them, or those among `image_ids` (with `uncategorised`, images without a category too, as 0)."""
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    copy_members(session, model_name, dim, lambda *batch: batches.append(batch), image_ids, ordered=True,
                 uncategorised=uncategorised)
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids, cats, vectors = (np.concatenate(column) for column in zip(*batches))
    return ids, cats, vectors
